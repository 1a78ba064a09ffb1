"""MTFM kernels: HSTU attention (full and target), Group LayerNorm, the projections' backward
(silu and bias gradients) and the token axis's merge of its two halves.

Each op is a public dispatcher (`hstu_attention.py`, `group_layer_norm.py`, `linear_silu.py`,
`merge_rows.py`) over two implementations with the same signature: a PyTorch reference
(`*_reference.py`, the specification) and a Triton kernel (`*_triton.py`). The attention and GLN
dispatchers register their ops with `torch.library` (namespace `mtfm`) so they run under autograd
and torch.compile; `linear_silu` and `linear` are plain autograd Functions, and under torch.compile
they and `merge_rows` are the plain ops.
Triton is imported only when a Triton implementation is actually used.
"""
