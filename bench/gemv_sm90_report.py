"""What the batch-1 fused GEMV (torchchat/kernels/gemv.py) compiles to on an H100, without a GPU: each
tile is compiled for sm_90a with the ptxas and cuobjdump that ship in the triton wheel, at the 7B int4
g128 layer shapes with the prologue/epilogue each layer fuses, and the report gives per tile:

- registers a thread and bytes spilled (ptxas -v);
- the SASS instructions of the main loop (the largest loop body: the weight stream), per weight a
  thread consumes in one trip, and the most frequent opcodes there. Batch-1 int4 decoding on the H100
  is issue-bound long before it is bandwidth-bound, so this is the figure to bring down;
- the bytes a thread loads in one trip of that loop (the widths of its LDG/LDGSTS instructions:
  weights, scales, minimums and the L2-resident input), and of those the weight bytes.

Timings need the GPU (`python -m torchchat.kernels.tune`); this says why a tile may be slow.

    PYTHONPATH=. python3 bench/gemv_sm90_report.py                                # shipped tiles, 4 shapes
    PYTHONPATH=. python3 bench/gemv_sm90_report.py --tiles 32x512w4 32x1024w4s3v2 --roles qkv
    PYTHONPATH=. python3 bench/gemv_sm90_report.py --dump-loop 32x512w4 --roles wo   # the loop's SASS
"""
from __future__ import annotations

import argparse
import collections
import re

from few_rows_sm90_report import assemble_sm90

GROUP = 128
# The 7B int4 g128 decode GEMVs: (N rows stored, K, fused prologue/epilogue) as modules.py runs them.
SHAPES = {
    "qkv": (12288, 4096, dict(NORM=2, SWIGLU=False, RESIDUAL=False)),
    "w13": (22016, 4096, dict(NORM=2, SWIGLU=True, RESIDUAL=False)),
    "wo": (4096, 4096, dict(NORM=0, SWIGLU=False, RESIDUAL=True)),
    "w2": (4096, 11008, dict(NORM=0, SWIGLU=False, RESIDUAL=True)),
}
_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")


def _compile(role: str, tile) -> tuple[str, str]:
    """(ptxas -v output, SASS) of the batch-1 kernel for one layer shape and tile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from torchchat.kernels.gemv import _FMT_CODE, _gemv_kernel, kernel_constexprs

    n_w, k, fused = SHAPES[role]
    names = ["x_ptr", "g_ptr", "w_ptr", "s_ptr", "m_ptr", "r_ptr", "y_ptr", "N", "K", "KW", "KB", "ROWS2",
             "eps", "res_scale"]
    types = ["*bf16", "*bf16", "*i32", "*bf16", "*bf16", "*bf16", "*bf16"] + ["i32"] * 5 + ["fp32", "fp32"]
    consts = dict(FMT=_FMT_CODE["int4"], GROUP=GROUP, PER_ROW=False, **fused, EVEN_K=k % tile.block_k == 0,
                  PDL=True, ASM=True, NORM_BLOCK=min(8192, triton.next_power_of_2(k)),
                  **kernel_constexprs(tile))
    # The signature goes by position: the constexprs in the kernel's own order.
    consts = {c: consts[c] for c in _gemv_kernel.arg_names if c in consts}
    signature = dict(zip(names, types)) | {c: "constexpr" for c in consts}
    # Pointers and the 7B sizes are multiples of 16, which Triton specializes on at a launch.
    aligned = [names.index(a) for a in names[:12]]
    src = ASTSource(fn=_gemv_kernel, signature=signature,
                    constexprs={(list(signature).index(c),): v for c, v in consts.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 64),
                            options={"num_warps": tile.num_warps, "num_stages": tile.num_stages})
    return assemble_sm90(kernel.asm["ptx"])


def _instructions(sass: str) -> list[tuple[int, str]]:
    return [(int(m.group(1), 16), m.group(2)) for m in map(_LINE.match, sass.splitlines()) if m]


def main_loop(sass: str) -> list[str]:
    """The body of the largest loop: the instructions from a backward branch's target to the branch.
    (With SWIGLU the kernel has two equal weight loops; either one stands for both.)"""
    ins = _instructions(sass)
    best: list[str] = []
    for i, (addr, text) in enumerate(ins):
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) <= addr:
            body = [t for a, t in ins[: i + 1] if a >= int(m.group(1), 16)]
            if len(body) > len(best):
                best = body
    return best


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def _load_bytes(op: str) -> int:
    """Bytes a thread reads with one global load (LDG.E.128: 16; LDG.E.U16: 2; LDG.E: 4)."""
    for width, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if width in op:
            return size
    return 4


def report(role: str, tile) -> str:
    from torchchat.kernels.tune import _tile_name

    info, sass = _compile(role, tile)
    regs = re.search(r"Used (\d+) registers", info).group(1)
    spill = re.search(r"(\d+) bytes spill stores", info).group(1)
    loop = main_loop(sass)
    ops = collections.Counter(_opcode(t).split(".")[0] for t in loop)
    loads = [_opcode(t) for t in loop if _opcode(t).startswith(("LDG", "LDGSTS"))]
    all_bytes = sum(map(_load_bytes, loads))
    # One trip covers a [block_n, block_k] weight tile (for w13 in two loops of that size each).
    weights = tile.block_n * tile.block_k / (32 * tile.num_warps)
    top = ", ".join(f"{op} {c}" for op, c in ops.most_common(9))
    return (f"{role:<4} {_tile_name(tile):<14} {regs:>3} regs, {spill:>4} B spilled; loop {len(loop):>4} SASS = "
            f"{len(loop) / weights:.2f}/weight; loads {all_bytes:>3} B/thread/trip "
            f"(weight bytes {weights / 2:.0f})\n      {top}")


def main(argv: list[str] | None = None) -> int:
    from torchchat.kernels.gemv import pick_config
    from torchchat.kernels.tune import _tile_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiles", nargs="*", default=[],
                   help="tiles as tune.py names them (32x512w4, 16x1024w4s3, 32x1024w4s3v2); default: the shipped pick")
    p.add_argument("--roles", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dump-loop", metavar="TILE", help="print the main loop's SASS of this tile (first role)")
    a = p.parse_args(argv)
    if a.dump_loop:
        print("\n".join(main_loop(_compile(a.roles[0], _tile_config(a.dump_loop))[1])))
        return 0
    for role in a.roles:
        n_w, k, fused = SHAPES[role]
        tiles = [_tile_config(t) for t in a.tiles] or [pick_config("int4", n_w // (2 if fused["SWIGLU"] else 1), k,
                                                                   GROUP)]
        for tile in tiles:
            print(report(role, tile), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
