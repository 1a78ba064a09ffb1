"""Host cost of the training step's pieces on the GPU (issue 7): microseconds of host time per call.

    python bench/host_overhead.py [--out FILE] [--iters N] [--device cuda|cpu]

At a tiny batch (64 tokens) the GPU finishes each kernel in a few microseconds, so a loop of
calls runs at the host's pace: time per call = host time (Python, dispatcher, autograd, the
Triton launcher). The large t4 layouts are host-bound at 131K tokens per step (bench/RESULTS.md),
so these costs, times the calls per step, are what the step pays. Rows: one aten op (the floor),
a Triton kernel launched directly, the GLN op forward through its wrapper, and forward+backward
of the GLN and attention ops and of one HSTU layer (full, target; bf16 autocast on CUDA). Each
forward+backward row includes one `backward()` call, i.e. one start of the autograd engine,
which on CUDA hands the graph to its device thread and waits: a cost a training step pays once,
not per op, so read those rows against each other rather than as per-op costs.
`--device cpu` runs the same rows (but the raw Triton launch) with the PyTorch reference ops in
float32, at d_model 32 and head dim 16 so that their compute stays small: a way to compare the
wrappers' host cost on a machine without a GPU.
Prints a table and writes JSON (--out, default $OUT/host_overhead.json).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from checkout import default_out, ensure_mtfm_importable


def per_call_us(fn, iters: int, device: torch.device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    for _ in range(10):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return 1e6 * (time.perf_counter() - start) / iters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON results (default $OUT or bench/out: host_overhead.json, "
                                                    "host_overhead_cpu.json with --device cpu)")
    parser.add_argument("--iters", type=int, default=300, help="calls timed per wrapper (default 300)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (--device cpu times the wrappers on the CPU)")
    if args.out is None:  # a CPU run does not overwrite the recorded GPU one
        args.out = default_out("host_overhead_cpu.json" if args.device == "cpu" else "host_overhead.json")
    ensure_mtfm_importable()
    from mtfm.kernels.group_layer_norm import group_layer_norm
    from mtfm.kernels.hstu_attention import hstu_attention
    from mtfm.kernels.mask import TokenKind
    from mtfm.model.layers import AttentionParams, HSTULayer, JaggedContext

    device, n = torch.device(args.device), 64
    cuda = device.type == "cuda"
    compute, d, dh = (torch.bfloat16, 512, 256) if cuda else (torch.float32, 32, 16)
    groups = ("history", "realtime", "hp", "phf", "sqs")
    x = torch.randn(n, d, device=device, dtype=compute, requires_grad=True)
    group = torch.zeros(n, dtype=torch.int64, device=device)
    weight = torch.ones(len(groups), d, device=device, dtype=compute, requires_grad=True)
    bias = torch.zeros_like(weight, requires_grad=True)
    y = torch.empty_like(x)
    q = torch.randn(n, 2, dh, device=device, dtype=compute, requires_grad=True)
    k = torch.randn(n, 1, dh, device=device, dtype=compute, requires_grad=True)
    v = torch.randn(n, 1, dh, device=device, dtype=compute, requires_grad=True)
    offsets = torch.tensor([0, n // 2, n], device=device)
    kind = torch.full((n,), int(TokenKind.H), dtype=torch.int8, device=device)
    kind[n // 2 - 8:n // 2] = kind[n - 8:] = int(TokenKind.T)
    ts = torch.arange(n, device=device)
    target_index = torch.nonzero(kind == TokenKind.T).squeeze(1)
    group[target_index] = groups.index("hp")
    ctx = JaggedContext(offsets, torch.tensor([0, 8, 16], device=device), kind, ts, target_index,
                        group, groups, torch.zeros_like(target_index), ("hp",))
    attn = AttentionParams(2, 1, dh, alpha=dh ** -0.5, norm=2048.0)

    def launch_gln_kernel():
        from mtfm.kernels import group_layer_norm_triton as gln_triton

        block_r, block_d, warps = gln_triton._blocks(d, gln_triton._MAX_BLOCK_ELEMENTS)
        gln_triton._gln_fwd_kernel[(1,)](x, group, weight, bias, y, n, d, weight.shape[0], d, d, n * d, 1e-5,
                                         SETS=1, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)

    def gln_forward():
        with torch.no_grad():
            group_layer_norm(x, group, weight, bias)

    def gln_forward_backward():
        group_layer_norm(x, group, weight, bias).sum().backward()

    def attention_forward_backward():
        hstu_attention(q, k, v, offsets, kind, ts, alpha=dh ** -0.5, norm=2048.0).sum().backward()

    layers = {kind_: HSTULayer(kind_, groups, groups[2:], d, attn).to(device) for kind_ in ("full", "target")}
    x32 = torch.randn(n, d, device=device, requires_grad=True)

    def layer_forward_backward(layer):
        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                out = layer(x32, ctx)
            out.float().sum().backward()
        return run

    rows = {
        "aten add (one kernel)": lambda: torch.add(y, 1.0),
        **({"GLN Triton kernel, launched directly": launch_gln_kernel} if cuda else {}),
        "group_layer_norm forward (no grad)": gln_forward,
        "group_layer_norm forward + backward": gln_forward_backward,
        "hstu_attention forward + backward": attention_forward_backward,
        "HSTU full layer forward + backward": layer_forward_backward(layers["full"]),
        "HSTU target layer forward + backward": layer_forward_backward(layers["target"]),
    }
    results = {name: per_call_us(fn, args.iters, device) for name, fn in rows.items()}
    info = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "iters": args.iters, "tokens": n}
    print(f"{info}\n{'call':<50} {'host us':>8}")
    for name, us in results.items():
        print(f"{name:<50} {us:>8.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"info": info, "host_us_per_call": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
