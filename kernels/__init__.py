"""MTFM kernels: HSTU attention (full and target) and Group LayerNorm.

Each op is a public dispatcher (`hstu_attention.py`, `group_layer_norm.py`) over two
implementations with the same signature: a PyTorch reference (`*_reference.py`, the
specification) and a Triton kernel (`*_triton.py`). The dispatchers register the ops with
`torch.library` (namespace `mtfm`) so they run under autograd and torch.compile.
Triton is imported only when a Triton implementation is actually used.
"""
