"""What the attention kernels compile to on a Hopper GPU, from a machine without one.

Triton compiles for a target, not for the device it runs on: with a stand-in driver that
names sm_90 and launches nothing, the kernel wrappers run on CPU tensors of the training mix
(`bench/kernels.py`'s `training_mix_batch`: d=256, Hq/Hkv 2/1 and 3/3, full and split target
attention, forward and backward) and every variant they ask for is compiled by the bundled
ptxas. For each: registers per thread, spilled (the stack a thread uses, in 32-bit words: what
Triton's n_spills reads from the driver on the GPU), shared memory, the tensor-core
instructions in its PTX (wgmma for Hopper's warpgroup products, mma.sync for the older ones),
and its tile loops in the machine code: the instructions of one pass, its products and the
spill instructions inside it (a spill outside them runs once per program, not once per tile).
The GPU machine runs triton 3.6; install the same (`pip install triton==3.6.0`) to see its
registers: other versions allocate differently. On a GPU these figures come with timings from
`bench/kernels.py --registers`; this is for trying kernel shapes between GPU sessions.

Usage: python bench/kernel_resources.py [--sweep] [--heads 2 1 3 3] [--arch 90] [--out PATH]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import default_out  # noqa: E402
from kernels import ALPHA, SPLIT_SWEEP, SWEEP, split_halves, training_mix_batch  # noqa: E402

from mtfm.kernels import hstu_attention_triton as attn  # noqa: E402 (kernels.py makes mtfm importable)

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# Which entry of the block-config tables each kernel launches with (the T rows' own dK/dV has none).
_KERNEL_TABLES = {"_fwd_kernel": "fwd", "_dq_kernel": "dq", "_dkdv_kernel": "dkdv"}
# What the H100 and H200 give one block, for the wrappers' checks.
_DEVICE_PROPERTIES = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                      "warpSize": 32}


def _cuobjdump(flag: str, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(_BIN / "cuobjdump"), flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def cubin_resources(cubin: bytes) -> dict:
    """Registers per thread and stack bytes of a cubin's one function."""
    report = _cuobjdump("-res-usage", cubin)
    return {key.lower(): int(re.search(rf"\b{key}:(\d+)", report).group(1)) for key in ("REG", "STACK", "LOCAL")}


def tile_loops(cubin: bytes) -> list[dict]:
    """The innermost loops of the machine code that run tensor-core products (a backward branch
    and the instructions it jumps back over), each with its instruction count, products (HGMMA:
    wgmma, HMMA: mma.sync) and spill traffic (STL/LDL: stores to and loads from local memory).
    Spills outside these loops run once per program; inside, once per tile."""
    code = [(int(address, 16), text) for address, text in
            re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", _cuobjdump("-sass", cubin))]
    index = {address: i for i, (address, _) in enumerate(code)}
    ends: dict[int, int] = {}  # a loop's head -> its last back edge (a loop may close with several)
    for i, (address, text) in enumerate(code):
        jump = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if jump and int(jump.group(1), 16) < address and int(jump.group(1), 16) in index:
            start = index[int(jump.group(1), 16)]
            ends[start] = max(ends.get(start, i), i)
    loops = []
    for start, end in ends.items():
        body = [t for _, t in code[start:end + 1]]
        if any(re.match(r"(@!?U?P\w+\s+)?EXIT\b", t) for t in body):
            continue  # a block placed after the kernel's exit that jumps back (e.g. a barrier's retry): no loop
        counts = {op: sum(bool(re.match(rf"(@!?U?P\w+\s+)?{op}\b", t)) for t in body)
                  for op in ("HGMMA", "HMMA", "STL", "LDL")}
        if counts["HGMMA"] or counts["HMMA"]:
            loops.append(dict(start=start, end=end, instructions=len(body), **counts))
    innermost = [a for a in loops if not any(b is not a and a["start"] <= b["start"] and b["end"] <= a["end"]
                                             for b in loops)]
    return [{key: value for key, value in loop.items() if key not in ("start", "end")}
            for loop in sorted(innermost, key=lambda loop: loop["start"])]


class _StandInUtils:
    def load_binary(self, name, cubin, shared, device):
        usage = cubin_resources(cubin)
        return None, None, usage["reg"], (usage["stack"] + usage["local"]) // 4, 1024

    def get_device_properties(self, device):
        return dict(_DEVICE_PROPERTIES)


class StandInDriver:
    """Enough of Triton's driver to compile for `arch` and "launch" (a no-op) on the CPU."""

    def __init__(self, arch: int):
        self.arch = arch
        self.utils = _StandInUtils()

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def launcher_cls(self, src, metadata):
        return lambda *args, **kwargs: None

    def get_active_torch_device(self):
        return torch.device("cpu")


def attention_ops(hq: int, hkv: int, tokens: int) -> dict:
    """name -> a call of each attention op on a CPU batch of the training mix."""
    batch = training_mix_batch(tokens, hq, hkv, 256, torch.bfloat16, "cpu", seed=3)
    full = (batch["q"], batch["k"], batch["v"], batch["offsets"], batch["offsets"], batch["kind"], batch["ts"],
            ALPHA, float(batch["length"]))
    half = split_halves(batch)
    split = (*half.values(), ALPHA, float(batch["length"]))
    grad_full, grad_split = torch.randn_like(batch["q"]), torch.randn_like(half["q_t"])
    return {"full fwd": lambda: attn.jagged_hstu_attention(*full, key_splits=1),
            "full bwd": lambda: attn.jagged_hstu_attention_backward(grad_full, *full),
            "split fwd": lambda: attn.jagged_split_target_attention(*split, key_splits=1),
            "split bwd": lambda: attn.jagged_split_target_attention_backward(grad_split, *split)}


def blocks_per_sm(registers: int, warps: int, shared: int) -> int:
    """Programs one Hopper SM holds at once: 64K registers (allocated per warp in units of 256), 228 KiB
    of shared memory (1 KiB of it reserved per block), 64 warps, 32 blocks."""
    per_warp = -(-registers * 32 // 256) * 256
    return min(65536 // (per_warp * warps), 233472 // (shared + 1024), 64 // warps, 32)


def variant_resources(kernel) -> dict:
    """A compiled variant's registers, spills, shared memory, tensor-core instructions and tile loops
    (from its cubin: a variant whose launch failed, e.g. on shared memory, has no driver figures)."""
    usage = cubin_resources(kernel.kernel)
    loops = tile_loops(kernel.kernel)
    ptx, shared, warps = kernel.asm["ptx"], kernel.metadata.shared, kernel.metadata.num_warps
    fits = shared <= _DEVICE_PROPERTIES["max_shared_mem"]
    return dict(registers=usage["reg"], spilled=(usage["stack"] + usage["local"]) // 4,
                shared_kib=round(shared / 1024, 1), warps=warps,
                blocks_per_sm=blocks_per_sm(usage["reg"], warps, shared) if fits else 0,
                wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"), loops=loops,
                loop_spills=sum(loop["STL"] + loop["LDL"] for loop in loops))


def _table_config(table: str, split: bool) -> tuple:
    """The config the wrappers launch `table`'s kernel with at d=256 (split target attention: its
    "_split" entry where one exists), as `_launch_params` picks it."""
    return (split and attn._CONFIGS.get(f"{table}_split", {}).get(256)) or attn._CONFIGS[table][256]


def _new_variants(jitted: list, seen: set) -> list:
    """(kernel name, compiled variant) of every variant compiled since `seen` was last updated."""
    new = []
    for fn in jitted:
        for cache, *_ in fn.device_caches.values():
            for kernel in cache.values():
                if id(kernel) not in seen:
                    seen.add(id(kernel))
                    new.append((fn.fn.__name__, kernel))
    return new


def compile_variants(heads: list[tuple[int, int]], sweep: bool, tokens: int) -> list[dict]:
    """Every kernel variant the attention ops compile, per head layout, op and (with `sweep`) candidate
    config of the kernel varied: one row per new variant, one per config that does not fit."""
    jitted = [fn for fn in vars(attn).values() if isinstance(fn, triton.runtime.jit.JITFunction)]
    seen, rows = set(), []
    for hq, hkv in heads:
        for op, call in attention_ops(hq, hkv, tokens).items():
            split = op.startswith("split")
            for name in ("fwd",) if op.endswith("fwd") else ("dq", "dkdv"):
                configs = (SPLIT_SWEEP if split else SWEEP)[name][256] if sweep else [_table_config(name, split)]
                for config in configs:
                    saved = {table: dict(entries) for table, entries in attn._CONFIGS.items()}
                    attn._CONFIGS.setdefault(f"{name}_split" if split else name, {})[256] = config
                    launched = {table: _table_config(table, split) for table in _KERNEL_TABLES.values()}
                    try:
                        call()
                        error = None
                    except OutOfResources as failure:  # a config that does not fit (shared memory)
                        error = f"{type(failure).__name__}: {str(failure)[:120]}"
                    finally:
                        attn._CONFIGS.clear()
                        attn._CONFIGS.update(saved)
                    for kernel_name, kernel in _new_variants(jitted, seen):
                        table = _KERNEL_TABLES.get(kernel_name)
                        rows.append(dict(hq=hq, hkv=hkv, op=op, kernel=kernel_name,
                                         config=list(launched[table]) if table else None, **variant_resources(kernel)))
                        print(json.dumps(rows[-1]), flush=True)
                    if error:
                        rows.append(dict(hq=hq, hkv=hkv, op=op, kernel=name, config=list(config), error=error))
                        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=[90],
                        help="compute capability to compile for (90: H100/H200, whose limits the figures assume)")
    parser.add_argument("--heads", type=int, nargs="+", default=[2, 1, 3, 3], metavar="H",
                        help="pairs of query and kv heads (default: 2 1 3 3)")
    parser.add_argument("--sweep", action="store_true",
                        help="every block config of bench/kernels.py's sweep lists, not only the tables' ones")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of the CPU batch (shapes only matter)")
    parser.add_argument("--out", help="JSON path (default $OUT or bench/out: kernel_resources_triton<version>[_sweep].json)")
    args = parser.parse_args()
    if args.tokens < 1:
        parser.error("--tokens must be at least 1")
    if args.out is None:
        name = f"kernel_resources_triton{triton.__version__}{'_sweep' if args.sweep else ''}.json"
        args.out = default_out(name)
    if len(args.heads) % 2:
        parser.error("--heads takes pairs: query heads then kv heads")
    heads = list(zip(args.heads[::2], args.heads[1::2]))
    for hq, hkv in heads:
        if hkv < 1 or hq % hkv:
            parser.error(f"--heads {hq} {hkv}: the query heads must be a multiple of the kv heads")
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 runs the kernels in Python and compiles nothing: unset it")
    driver.set_active(StandInDriver(args.arch))
    rows = compile_variants(heads, args.sweep, args.tokens)
    print(f"\ntriton {triton.__version__}, sm_{args.arch}")
    print("Hq/Hkv | op | kernel | config | registers | spilled | shared KiB | per SM | wgmma | mma.sync | "
          "tile loops: instructions (products, spill instructions)")
    for r in rows:
        if "error" in r:
            print(f"{r['hq']}/{r['hkv']} | {r['op']} | {r['kernel']} | {tuple(r['config'])} | {r['error']}")
        else:
            config = tuple(r["config"]) if r["config"] else "-"
            loops = ", ".join(f"{loop['instructions']} ({loop['HGMMA'] + loop['HMMA']}, {loop['STL'] + loop['LDL']})"
                              for loop in r["loops"])
            print(f"{r['hq']}/{r['hkv']} | {r['op']} | {r['kernel']} | {config} | {r['registers']} | {r['spilled']} | "
                  f"{r['shared_kib']} | {r['blocks_per_sm']} | {r['wgmma']} | {r['mma_sync']} | {loops}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(triton=triton.__version__, arch=args.arch, variants=rows), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
