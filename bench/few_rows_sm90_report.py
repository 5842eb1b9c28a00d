"""What the few-rows CUDA-core kernel (torchchat/kernels/gemv_few.py) compiles to on an H100, without a
GPU: each tile is compiled for sm_90a with the ptxas and cuobjdump that ship in the triton wheel, and
the report gives registers a thread, bytes spilled, the layout conversions the compiler inserted
(`ttg.convert_layout` in the TTGIR: each goes through shared memory, the cost that gemv_few's tile
shapes avoid on the weights) and the SASS instruction count (the whole kernel, prologue and epilogue
included: a rough measure) per weight word a thread loads in a loop step. It is
how bench/cuda_rows_bench.py's candidate tiles were chosen; the timings themselves need the GPU.

    PYTHONPATH=. python3 bench/few_rows_sm90_report.py                      # int4 g128, 8 rows, a few tiles
    PYTHONPATH=. python3 bench/few_rows_sm90_report.py --format int8 --rows 4 --tiles 16x256w4 32x256w8 --swiglu
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


def compile_report(fmt: str, rows: int, tile: tuple[int, int, int], swiglu: bool, norm: int) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from torchchat.kernels.gemv_few import _gemv_few_kernel, block_m

    bn, bk, warps = tile
    names = ["x_ptr", "g_ptr", "w_ptr", "s_ptr", "m_ptr", "r_ptr", "y_ptr", "M", "N", "K", "KW", "KB", "ROWS2",
             "eps", "res_scale"]
    types = ["*bf16", "*bf16", "*i32", "*bf16", "*bf16", "*bf16", "*bf16"] + ["i32"] * 6 + ["fp32", "fp32"]
    consts = dict(FMT=FMT[fmt], GROUP=BLOCKS[fmt], PER_ROW=fmt == "int8", NORM=norm, SWIGLU=swiglu, RESIDUAL=False,
                  PDL=True, ASM=True, BLOCK_M=block_m(rows), BLOCK_N=bn, BLOCK_K=bk, NORM_BLOCK=512)
    signature = dict(zip(names, types)) | {k: "constexpr" for k in consts}
    # Pointers and the sizes the 7B shapes have are multiples of 16, as Triton specializes them at a launch.
    aligned = [names.index(n) for n in ("x_ptr", "g_ptr", "w_ptr", "s_ptr", "m_ptr", "r_ptr", "y_ptr", "N", "K",
                                        "KW", "ROWS2")]
    src = ASTSource(fn=_gemv_few_kernel, signature=signature,
                    constexprs={(list(signature).index(k),): v for k, v in consts.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = Path(d) / "k.ptx", Path(d) / "k.cubin"
        ptx.write_text(kernel.asm["ptx"])
        info = subprocess.run([str(tools / "ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", str(cubin)],
                              capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    regs = re.search(r"Used (\d+) registers", info).group(1)
    spill = re.search(r"(\d+) bytes spill stores", info).group(1)
    conversions = collections.Counter(re.search(r": (tensor<[^>]*?)[,>]", line).group(1).split(",")[0] + ">"
                                      for line in kernel.asm["ttgir"].splitlines() if "ttg.convert_layout" in line)
    ops = collections.Counter(re.sub(r"^\s+/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?", "", line).split()[0].split(".")[0]
                              for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line))
    words = bn * bk // (8 if fmt == "int4" else 4) / (32 * warps)
    top = ", ".join(f"{op} {n}" for op, n in ops.most_common(8))
    conv = ", ".join(f"{n}x {t}" for t, n in conversions.items())
    return (f"{bn}x{bk}w{warps}: {regs} registers, {spill} bytes spilled; {sum(ops.values())} SASS instructions, "
            f"{sum(ops.values()) / words:.0f} per word a thread loads a step ({top})\n    conversions: {conv}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", default="int4", choices=list(FMT))
    p.add_argument("--rows", type=int, default=8, help="input rows M (1..16)")
    p.add_argument("--tiles", nargs="+", default=["16x512w4", "32x512w8", "8x512w4", "64x128w8"],
                   help="tiles as ROWSxINPUTSwWARPS")
    p.add_argument("--swiglu", action="store_true", help="the w13 variant (two products a program)")
    p.add_argument("--norm", type=int, default=0, choices=[0, 1, 2], help="the NORM prologue (2: folded RMSNorm)")
    a = p.parse_args(argv)
    for text in a.tiles:
        bn, rest = text.split("x")
        bk, warps = rest.split("w")
        print(f"{a.format} M={a.rows} " + compile_report(a.format, a.rows, (int(bn), int(bk), int(warps)), a.swiglu,
                                                         a.norm), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
