"""Kernel tests run the Triton kernels on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before any @triton.jit kernel is defined, so before
mtfm.kernels' Triton modules are imported; they are imported lazily, on first use.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
