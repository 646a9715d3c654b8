"""`python -m mmfast` prints what this installation can run."""
import argparse
import json
import os
import sys

from ._info import collect, info


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mmfast",
        description="Print what this installation of mmfast can run: versions, which ops have CPU and CUDA "
                    "kernels, the CPU instruction set the kernels dispatch to, CUDA archs and Triton. "
                    "Paste its output into bug reports.")
    parser.add_argument("--json", action="store_true", help="print the same facts as one JSON object")
    args = parser.parse_args(argv)
    try:
        if args.json:
            print(json.dumps(collect(), indent=2, default=str))
        else:
            info()
        sys.stdout.flush()
    except BrokenPipeError:  # `python -m mmfast --json | head`: the reader left early; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's own advice)
        sys.exit(1)


if __name__ == "__main__":
    main()
