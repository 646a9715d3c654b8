"""Triton twins of mmfast's ops, registered as torch.ops.mmfast_triton.* (one module per op
family, each with a *_kernels.py beside it). mmfast's backend resolution imports this package
the first time backend="triton" is asked for; it imports every family module found here, so a
new family adds its files and no line."""
import importlib as _importlib
import pkgutil as _pkgutil

for _module in _pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and not _module.name.endswith("_kernels"):
        _importlib.import_module(f"{__name__}.{_module.name}")
