"""MTFM kernels: HSTU attention (full and target), Group LayerNorm, and the projections' silu.

Each op is a public dispatcher (`hstu_attention.py`, `group_layer_norm.py`, `linear_silu.py`) over
two implementations with the same signature: a PyTorch reference (`*_reference.py`, the
specification) and a Triton kernel (`*_triton.py`). The attention and GLN dispatchers register
their ops with `torch.library` (namespace `mtfm`) so they run under autograd and torch.compile;
`linear_silu` is a plain autograd Function and the plain ops under torch.compile.
Triton is imported only when a Triton implementation is actually used.
"""
