"""`python -m mmfast` prints what this installation can run."""
from ._info import info

info()
