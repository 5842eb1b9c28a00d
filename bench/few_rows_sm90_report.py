"""What the few-rows kernels compile to on an H100, without a GPU: each tile of the CUDA-core kernel
(torchchat/kernels/gemv_few.py, "fma"), the per-field tensor-core kernel (gemv_rows.py, "dot") or the
one-dot int4 tensor-core kernel (gemv_mma.py, "mma") is compiled for sm_90a with the ptxas and
cuobjdump that ship in the triton wheel, and the report gives registers a thread, bytes spilled,
the layout conversions in the TTGIR (`ttg.convert_layout`: through shared memory unless the layouts
differ only within a thread or a warp; `ttg.local_alloc`: a tensor staged in shared memory, e.g. a
dot operand) and SASS instruction counts: the whole kernel (prologue and epilogue included) and the
main loop's body (the largest backward branch), each also per weight word a thread loads in a loop
step. It is how bench/cuda_rows_bench.py's candidate tiles were chosen; the timings need the GPU.

    PYTHONPATH=. python3 bench/few_rows_sm90_report.py                      # fma, int4 g128, 8 rows, a few tiles
    PYTHONPATH=. python3 bench/few_rows_sm90_report.py --format int8 --rows 4 --tiles 16x256w4 32x256w8 --swiglu
    PYTHONPATH=. python3 bench/few_rows_sm90_report.py --kernel dot --tiles 64x512w8
    PYTHONPATH=. python3 bench/few_rows_sm90_report.py --kernel mma --tiles 64x256w4 128x128w8 32x256w2
"""
from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

FMT = {"int8": 1, "int4": 2}
BLOCKS = {"int8": 128, "int4": 128}  # int8 per channel, int4 group 128: the 7B recipes
_SASS_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([^;]*);")


def _kernel(kernel: str, fmt: str, rows: int, tile: tuple[int, ...], swiglu: bool, norm: int, packed: bool = True,
            split: int = 1):
    """The jitted kernel and its constexprs for this tile ((rows, inputs, warps[, mma's steps ahead]))."""
    bn, bk, warps, depth = (*tile, 1)[:4]
    common = dict(NORM=norm, SWIGLU=swiglu, RESIDUAL=False, PDL=True, ASM=True, BLOCK_N=bn, BLOCK_K=bk,
                  NORM_BLOCK=512)
    if kernel == "fma":
        from torchchat.kernels.gemv_few import _gemv_few_kernel, block_m

        return _gemv_few_kernel, dict(FMT=FMT[fmt], GROUP=BLOCKS[fmt], PER_ROW=fmt == "int8", BLOCK_M=block_m(rows),
                                      **common)
    if kernel == "dot":
        from torchchat.kernels.gemv_rows import BLOCK_M, _gemv_rows_kernel

        return _gemv_rows_kernel, dict(FMT=FMT[fmt], GROUP=BLOCKS[fmt], PER_ROW=fmt == "int8", IEEE=False,
                                       BLOCK_M=BLOCK_M, **common)
    if fmt != "int4":
        raise SystemExit("--kernel mma takes int4 only")
    from torchchat.kernels.gemv_mma import BLOCK_M, _gemv_mma_kernel

    return _gemv_mma_kernel, dict(GROUP=BLOCKS[fmt], IEEE=False, PACKED=packed, NW=warps, DEPTH=depth, BLOCK_M=BLOCK_M,
                                  SPLIT=split, **common)


def assemble_sm90(ptx_text: str) -> tuple[str, str]:
    """(ptxas -v's report, cuobjdump's SASS) of PTX assembled for sm_90a with the tools in the triton wheel."""
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = Path(d) / "k.ptx", Path(d) / "k.cubin"
        ptx.write_text(ptx_text)
        info = subprocess.run([str(tools / "ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", str(cubin)],
                              capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    return info, sass


def _loop_body(sass: str) -> list[str]:
    """The instructions of the largest loop: from a backward branch's target to the branch."""
    lines = [(int(m.group(1), 16), m.group(2).strip()) for m in map(_SASS_LINE.match, sass.splitlines()) if m]
    best: list[str] = []
    for addr, ins in lines:
        target = re.match(r"BRA\s+(?:\S+\s+)?0x([0-9a-f]+)", ins)
        if target and int(target.group(1), 16) < addr:
            body = [i for a, i in lines if int(target.group(1), 16) <= a <= addr]
            best = body if len(body) > len(best) else best
    return best


def _opcodes(instructions) -> collections.Counter:
    return collections.Counter(i.split()[0].split(".")[0] for i in instructions)


def compile_report(fmt: str, rows: int, tile: tuple[int, ...], swiglu: bool, norm: int,
                   kernel: str = "fma", packed: bool = True, split: int = 1) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, consts = _kernel(kernel, fmt, rows, tile, swiglu, norm, packed, split)
    consts = {k: consts[k] for k in fn.arg_names if k in consts}  # in the kernel's parameter order
    bn, bk, warps = tile[:3]
    names = ["x_ptr", "g_ptr", "w_ptr", "s_ptr", "m_ptr", "r_ptr", "y_ptr", "M", "N", "K", "KW", "KB", "ROWS2",
             "eps", "res_scale"]
    types = ["*bf16", "*bf16", "*i32", "*bf16", "*bf16", "*bf16", "*bf16"] + ["i32"] * 6 + ["fp32", "fp32"]
    if kernel == "mma":  # its split-K buffers and slice length
        names[7:7] = ["part_ptr", "count_ptr"]
        types[7:7] = ["*fp32", "*i32"]
        names.insert(names.index("KB") + 1, "KSL")
        types.insert(names.index("KSL"), "i32")
    signature = dict(zip(names, types)) | {k: "constexpr" for k in consts}
    # Pointers and the sizes the 7B shapes have are multiples of 16, as Triton specializes them at a launch.
    aligned = [names.index(n) for n in ("x_ptr", "g_ptr", "w_ptr", "s_ptr", "m_ptr", "r_ptr", "y_ptr", "N", "K",
                                        "KW", "ROWS2")]
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(list(signature).index(k),): v for k, v in consts.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})
    info, sass = assemble_sm90(compiled.asm["ptx"])
    regs = re.search(r"Used (\d+) registers", info).group(1)
    spill = re.search(r"(\d+) bytes spill stores", info).group(1)
    ttgir = compiled.asm["ttgir"]
    conversions = collections.Counter(re.search(r": (tensor<[^>]*?)[,>]", line).group(1).split(",")[0] + ">"
                                      for line in ttgir.splitlines() if "ttg.convert_layout" in line)
    ops = _opcodes(i for m in map(_SASS_LINE.match, sass.splitlines()) if m for i in [m.group(2).strip()])
    loop = _opcodes(_loop_body(sass))
    rows = 2 * bn if kernel == "mma" and swiglu else bn  # mma: both SwiGLU halves in one product
    words = rows * bk // (8 if fmt == "int4" else 4) / (32 * warps)
    top = ", ".join(f"{op} {n}" for op, n in loop.most_common(10))
    conv = ", ".join(f"{n}x {t}" for t, n in conversions.items())
    smem = sum(loop[op] for op in ("STS", "LDS", "LDSM", "STSM", "BAR", "SHFL"))
    name = "{}x{}w{}".format(*tile) + (f"a{tile[3]}" if len(tile) > 3 else "")
    return (f"{kernel} {name}: {regs} registers, {spill} bytes spilled; {sum(ops.values())} SASS "
            f"instructions, {sum(ops.values()) / words:.0f} per word a thread loads a step; loop body "
            f"{sum(loop.values())} ({sum(loop.values()) / words:.1f} a word; shared memory, barriers and shuffles "
            f"{smem}): {top}\n    convert_layout: {conv or 'none'}; local_alloc: {ttgir.count('ttg.local_alloc')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", default="fma", choices=["fma", "dot", "mma"])
    p.add_argument("--format", default="int4", choices=list(FMT))
    p.add_argument("--rows", type=int, default=8, help="input rows M (1..16)")
    p.add_argument("--tiles", nargs="+", default=["16x512w4", "32x512w8", "8x512w4", "64x128w8"],
                   help="tiles as ROWSxINPUTSwWARPS, for mma optionally aN (steps loaded ahead, 1 to 4)")
    p.add_argument("--swiglu", action="store_true", help="the w13 variant (two products a program)")
    p.add_argument("--float32-dequant", action="store_true",
                   help="mma: dequantize in float32 (TORCHCHAT_MMA_PACKED=0), not in packed 16-bit pairs")
    p.add_argument("--norm", type=int, default=0, choices=[0, 1, 2], help="the NORM prologue (2: folded RMSNorm)")
    a = p.parse_args(argv)
    for text in a.tiles:
        tile = tuple(int(v) for v in re.fullmatch(r"(\d+)x(\d+)w(\d+)(?:a(\d))?", text).groups() if v)
        print(f"{a.format} M={a.rows} " + compile_report(a.format, a.rows, tile, a.swiglu, a.norm, a.kernel,
                                                         not a.float32_dequant), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
