"""One process-wide torch.compile per kernel function, with an eager fallback.

The sparse mappings' kernels (and the TV prox's) are plain PyTorch functions; compiling them
gives one vectorised loop per pass. Compilation can be unavailable (no C++ compiler), so a
failure warns once and every later call runs the same function eagerly.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.fx.experimental._config as fx_config

_COMPILED: dict = {}
_COMPILE_FAILED = False


def compile_enabled() -> bool:
    """False when SPARSE_DETR_COMPILE=0, or after compilation failed once in this process."""
    return not _COMPILE_FAILED and os.environ.get("SPARSE_DETR_COMPILE", "1") != "0"


def run_kernel(fn, *args, compiled: bool):
    """fn(*args), or a process-wide torch.compile(fn, dynamic=True) built on first use.

    dynamic=True and no duck sizing (equal sizes are not assumed to stay equal, e.g. 850 queries
    x 850 keys) let one kernel serve every image size. If compilation fails (no C++ compiler,
    unsupported platform) warn once and stay eager: same algorithm, same answer."""
    global _COMPILE_FAILED
    if compiled and compile_enabled():
        try:
            if fn not in _COMPILED:
                _COMPILED[fn] = torch.compile(fn, dynamic=True)
            duck = fx_config.use_duck_shape  # set directly: patch() costs more than the call at small sizes
            fx_config.use_duck_shape = False
            try:
                return _COMPILED[fn](*args)
            finally:
                fx_config.use_duck_shape = duck
        except Exception as err:  # any compiler failure; the eager path below is the same math
            _COMPILE_FAILED = True
            warnings.warn(
                f"sparse_detr: compiling the attention mapping failed ({type(err).__name__}: {err}); "
                "using the eager solver (set SPARSE_DETR_COMPILE=0 to skip compiling).",
                RuntimeWarning,
                stacklevel=2,
            )
    return fn(*args)
