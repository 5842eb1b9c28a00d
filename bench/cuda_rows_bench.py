"""The few-rows GEMV kernels side by side on a CUDA GPU (issues 17, 18): for a model's layer shapes
(default Llama-2-7B) and the int4 (group 128) and int8 (per channel) formats, the time of the one-row
kernel (gemv.py) and of the multi-row kernels, "dot" (gemv_rows.py, tensor cores, a dot per nibble
field), "fma" (gemv_few.py, CUDA cores) and, for int4, "mma" (gemv_mma.py, tensor cores, one dot
per weight tile), at M = 2, 4, 8, 16 input rows, each with a few candidate tiles.

Every time is a CUDA graph of many calls cycling over copies of the weights larger than the L2 (as
the tile sweep torchchat/kernels/tune.py times), so each call reads its weights from memory. Two
passes per format:

1. the sweep: every candidate tile on the plain product (no prologue or epilogue), summed over the
   whole model's step (each layer shape x n_layers, the output projection once), giving the best tile
   per (kernel, M);
2. the table: each kernel at its best tile with the prologue and epilogues the model fuses (qkv and
   w13: RMSNorm folded in, w13: SwiGLU, wo and w2: residual, output: float32 logits), as ms per
   whole-model step, weights GB/s, the step's cost against the one-row step and the aggregate
   speed-up (M / step time against 1 / one-row time). The target of issue 18: x >= 5 at M = 8.
   For fma, w13 (two products a program with SwiGLU) is also timed at half the tile's rows and the
   faster kept (the "fmt:M:swiglu" tile key of gemv_few.py). For mma, every swept tile is timed
   fused on each shape and the best kept per tile class of gemv_mma.py ("int4" for qkv and output,
   "int4:small" for wo and w2, "int4:swiglu" for w13): the step is the sum of the classes' best.

At the end: the faster multi-row kernel per (format, M), for gemv_rows.ROWS_KERNELS, the best
fma tiles as a TORCHCHAT_GEMV_FEW_TILES value (gemv_few._CONFIGS) and the best mma tiles as a
TORCHCHAT_GEMV_MMA_TILES value (gemv_mma._CONFIGS). To time the whole decode step with a choice
forced, bench/cuda_batch_bench.py under TORCHCHAT_ROWS_KERNEL=fma (or dot, or mma).

Every kernel's output (each tile, each M, each fusion) is checked once against F.linear on the
dequantized weight (relative error < 1e-2, as tests/kernels/test_cuda_batch.py bounds it): a
mismatch stops the run with exit status 1 rather than timing a wrong kernel.

    PYTHONPATH=. python3 bench/cuda_rows_bench.py                          # 7B, int4 and int8, ~3 min on an H100
    PYTHONPATH=. python3 bench/cuda_rows_bench.py --formats int4 --rows 8 --out rows.json
    PYTHONPATH=. python3 bench/cuda_rows_bench.py --tiles 4                # every candidate tile (more compiles)
    PYTHONPATH=. python3 bench/cuda_rows_bench.py --formats int4 --kernels dot fma mma   # issue 17's comparison
    TRITON_INTERPRET=1 PYTHONPATH=. python3 bench/cuda_rows_bench.py --smoke  # CPU check, tiny shapes

--smoke runs tiny shapes in float32 on the CPU through Triton's interpreter, each call timed once
without graphs: it checks the script end to end (and the kernels' results), it measures nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

GROUPS = {"int4": 128, "int8": 0}
# Candidate tiles (weight rows per program, inputs per step, warps) per kernel, format and M, best
# guess first. fma: from compiling for sm_90 without a GPU (bench/few_rows_sm90_report.py), tiles of
# 65-170 registers a thread without spills (the accumulator is M' x rows x L float32, M' = M rounded
# up to a power of two, L = inputs / 8 words for int4, / 4 for int8), ordered by fewest instructions
# per weight word (int4, 8 rows, 16x512w4: about 100 in the loop, 64 of them the products' FMAs);
# tiles of more rows per thread than these spill, of fewer reload each input more often. dot: the
# shipped tile and the runner-up of its sweep (gemv_rows.py's comment), the same for every M (its
# programs always take 16 rows).
FMA_TILES = {
    "int4": {2: [(32, 512, 4), (16, 1024, 8), (64, 512, 8), (16, 512, 4)],
             4: [(32, 256, 4), (32, 512, 8), (16, 512, 4), (16, 1024, 8)],
             8: [(16, 512, 4), (32, 512, 8), (8, 512, 4), (16, 256, 4)],
             16: [(16, 256, 4), (32, 256, 8), (16, 512, 8), (8, 256, 4)]},
    "int8": {2: [(32, 256, 4), (32, 256, 8), (16, 512, 8), (16, 256, 4)],
             4: [(16, 256, 4), (32, 256, 8), (16, 512, 8), (8, 256, 4)],
             8: [(16, 256, 4), (32, 256, 8), (8, 256, 4), (16, 128, 4)],
             16: [(16, 128, 4), (8, 256, 4), (16, 256, 8), (8, 128, 4)]},
}
DOT_TILES = {"int4": [(64, 512, 8), (32, 512, 4)], "int8": [(32, 256, 4), (16, 512, 8)]}
# mma (int4 only; the same code for every M <= 16, as its programs always take 16 rows; a 4th field:
# weight steps loaded ahead): from compiling for sm_90a without a GPU (bench/few_rows_sm90_report.py
# --kernel mma), none spilling with or without SwiGLU (w13 takes each tile at half the rows: both
# halves are one product). Warpgroup tiles (4 or 8 warps, 64 rows a group) run 23-31 SASS
# instructions a weight word in the loop, warp tiles (2 warps) 33-36 but give 2-4x the programs for
# a 4096-row layer. A layer's bytes in flight are N * block_k * ahead / 2 whatever the rows (one wave):
# ordered by that, then by instructions a word; --mma-tiles caps the list.
# Sixth session: tiles of one warp and 16 rows give a 4096-row layer 256 programs (the 64-128-row
# first guesses after them give 32-64 for 132 SMs, which is where their 13.55 ms 8-row 7B step went);
# 16x256w1a4 won the first sweep (9.47 ms fused against 11.7-14.5 for the others), its neighbours follow.
MMA_TILES = [(16, 256, 1, 4), (16, 128, 1, 4), (16, 256, 1, 3), (16, 256, 1, 2), (32, 256, 2, 4), (32, 512, 2, 3),
             (16, 512, 1, 4), (64, 512, 4, 3), (64, 256, 4, 2), (128, 256, 8), (128, 128, 8, 4), (64, 128, 4, 4),
             (128, 256, 8, 2), (64, 256, 4, 3), (32, 256, 2, 2), (32, 128, 2, 4)]
MMA_SMOKE_TILES = [(16, 128, 1), (64, 128, 4)]
# --smoke: rows of 128 and 256 inputs (the int4 group and the int8 per-channel block are 128).
SMOKE_SHAPES = [("qkv", 96, 128), ("wo", 32, 128), ("w13", 128, 128), ("w2", 32, 256), ("output", 40, 128)]
SMOKE_TILES = [(16, 128, 4)]
REL_TOL = 1e-2


class Mismatch(RuntimeError):
    """A kernel's output differs from the reference: its timing would mean nothing."""


@dataclass(frozen=True)
class Shape:
    role: str
    n_w: int  # stored weight rows (w1 and w3 stacked for w13)
    k: int
    count: int  # how many times a decode step multiplies by it (one per layer; the output once)


@dataclass(frozen=True)
class Variant:
    kernel: str  # "gemv" (one row), "dot", "fma" or "mma"
    m: int
    tile: tuple[int, ...] | None  # (rows, inputs, warps[, mma: steps ahead]); None: gemv.pick_config's

    @property
    def name(self) -> str:
        return f"{self.kernel} M={self.m} {_tile_name(self.tile)}"


def _tile_name(tile) -> str:
    """64x256w4, or 64x256w4a2 with mma's 4th field (weight steps loaded ahead)."""
    if tile is None:
        return "shipped"
    return "{}x{}w{}".format(*tile) + (f"a{tile[3]}" if len(tile) > 3 else "")


class Bench:
    """One format's weights (all shapes, each with rotating copies), inputs, references and timer."""

    def __init__(self, fmt: str, shapes: list[Shape], rows: list[int], device: str, dtype, rotate_bytes: int):
        import torch

        from torchchat.kernels.formats import dequantize, empty_storage, quantize_into

        self.fmt, self.group, self.shapes, self.device, self.dtype = fmt, GROUPS[fmt], shapes, device, dtype
        self.sets, self.x, self.res, self.norm_rstd, self.refs = {}, {}, {}, {}, {}
        gen = torch.Generator(device=device).manual_seed(0)
        for sh in shapes:
            w = torch.randn(sh.n_w, sh.k, device=device, dtype=dtype, generator=gen) * 0.02
            st = empty_storage(fmt, sh.n_w, sh.k, self.group, dtype, device)
            quantize_into(st, fmt, self.group, 0, w)
            del w
            nbytes = sum(t.numel() * t.element_size() for t in st.values())
            copies = max(1, -(-rotate_bytes // nbytes))
            self.sets[sh] = [st] + [{k: v.clone() for k, v in st.items()} for _ in range(copies - 1)]
            wd = dequantize(fmt, self.group, st["weight"], st.get("scales"), st.get("mins"), dtype).float()
            n = sh.n_w // 2 if sh.role == "w13" else sh.n_w
            for m in [1] + rows:
                x = torch.randn(m, sh.k, device=device, dtype=dtype, generator=gen)
                res = torch.randn(m, n, device=device, dtype=dtype, generator=gen)
                self.x[sh, m], self.res[sh, m] = x, res
                self.refs[sh, m, False] = x.float() @ wd.T
                self.refs[sh, m, True] = self._fused_reference(sh, x, res, wd)
            del wd

    @staticmethod
    def _fused_reference(sh: Shape, x, res, wd):
        """The role's fusion in float32 math (tune.py's _role_args, with residual rows)."""
        import torch.nn.functional as F

        if sh.role in ("qkv", "w13"):  # RMSNorm whose weight is folded into W
            x = x.float() * (x.float().pow(2).mean(-1, keepdim=True) + 1e-5).rsqrt()
        y = x.float() @ wd.T
        if sh.role == "w13":
            n = wd.shape[0] // 2
            y = F.silu(y[:, :n]) * y[:, n:]
        if sh.role in ("wo", "w2"):
            y = res.float() + 0.5 * y
        return y

    def nbytes(self, sh: Shape) -> int:
        return sum(t.numel() * t.element_size() for t in self.sets[sh][0].values())

    def step_bytes(self) -> int:
        return sum(self.nbytes(sh) * sh.count for sh in self.shapes)

    def _call(self, v: Variant, sh: Shape, st: dict, fused: bool):
        import torch

        from torchchat.kernels.gemv import GemvConfig, gemv
        from torchchat.kernels.gemv_rows import gemv_rows

        extra = {}
        if fused:
            if sh.role in ("qkv", "w13"):
                extra.update(rms_only=True, eps=1e-5)
            if sh.role == "w13":
                extra["swiglu"] = True
            if sh.role in ("wo", "w2"):
                extra.update(residual=self.res[sh, v.m][0] if v.kernel == "gemv" else self.res[sh, v.m],
                             res_scale=0.5)
            if sh.role == "output":
                extra["out_dtype"] = torch.float32
        args = (self.fmt, self.group, st["weight"], st.get("scales"), st.get("mins"))
        cfg = GemvConfig(*v.tile) if v.tile is not None else None
        x = self.x[sh, v.m]
        if v.kernel == "gemv":
            return gemv(x[0], *args, config=cfg, **extra).view(1, -1)
        return gemv_rows(x, *args, config=cfg, kernel=v.kernel, **extra)

    def check(self, v: Variant, sh: Shape, fused: bool) -> float:
        """The variant's relative error against the reference; raises Mismatch past REL_TOL."""
        out = self._call(v, sh, self.sets[sh][0], fused).double()
        ref = self.refs[sh, v.m, fused].double()
        err = ((out - ref).norm() / ref.norm()).item()
        if not err < REL_TOL:  # also NaN
            raise Mismatch(f"{self.fmt} {v.name} {sh.role} {sh.n_w}x{sh.k} {'fused' if fused else 'plain'}: "
                           f"relative error {err:.3g} against F.linear on the dequantized weight (bound {REL_TOL})")
        return err

    def seconds(self, v: Variant, sh: Shape, fused: bool) -> float:
        """Seconds per call, weights read from memory (a graph over the rotating copies), or, on the
        CPU, one call's wall time."""
        sets = self.sets[sh]
        if self.device != "cuda":
            t0 = time.perf_counter()
            self._call(v, sh, sets[0], fused)
            return time.perf_counter() - t0
        from torchchat.kernels.tune import graph_time

        def calls():
            for st in sets:
                self._call(v, sh, st, fused)

        return graph_time(calls, 4) / len(sets)

    def shape_ms(self, v: Variant, sh: Shape, fused: bool) -> float:
        """ms this shape takes in one step with this variant (its output checked first)."""
        self.check(v, sh, fused)
        return self.seconds(v, sh, fused) * sh.count * 1e3

    def step_ms(self, v: Variant, fused: bool) -> float:
        """ms of one whole-model step of this variant (every shape, checked first)."""
        return sum(self.shape_ms(v, sh, fused) for sh in self.shapes)


def _shapes(model: str, smoke: bool) -> list[Shape]:
    if smoke:
        return [Shape(role, n, k, 1 if role == "output" else 2) for role, n, k in SMOKE_SHAPES]
    from torchchat.kernels.tune import layer_shapes
    from torchchat.model.registry import params_table

    config = params_table(model)
    return [Shape(role, n, k, 1 if role == "output" else config.n_layers) for role, n, k in layer_shapes(config)]


def _variants(fmt: str, rows: list[int], smoke: bool, tiles: int, kernels: list[str], mma_tiles: int) -> list[Variant]:
    """Every candidate of the sweep: the one-row kernel's shipped tiles, then each of `kernels` per M
    (the first `tiles` candidates of dot and fma, `mma_tiles` of mma, which takes int4 only)."""
    out = [Variant("gemv", 1, None)]
    for m in rows:
        if "dot" in kernels:
            out += [Variant("dot", m, t) for t in (SMOKE_TILES if smoke else DOT_TILES[fmt])[:tiles]]
        if "fma" in kernels:
            fma = FMA_TILES[fmt].get(m) or FMA_TILES[fmt][min(16, 1 << (m - 1).bit_length())]
            out += [Variant("fma", m, t) for t in (SMOKE_TILES if smoke else fma)[:tiles]]
        if "mma" in kernels and fmt == "int4":
            out += [Variant("mma", m, t) for t in (MMA_SMOKE_TILES if smoke else MMA_TILES)[:mma_tiles]]
    return out


def _mma_class(sh: Shape) -> str:
    """gemv_mma's tile key for this shape (pick_mma_config): w13 "int4:swiglu", few outputs "int4:small"."""
    from torchchat.kernels.gemv_mma import SMALL_N

    return "int4:swiglu" if sh.role == "w13" else "int4:small" if sh.n_w <= SMALL_N else "int4"


def _mma_fused(bench: Bench, tiles: list[tuple[int, int, int]], m: int) -> tuple[float, dict[str, tuple]]:
    """The fused step of mma at M rows with the best of `tiles` per tile class: (ms, {class: tile}).
    For w13 each tile's rows are halved (gemv_mma multiplies both halves in one product)."""
    per = {}  # (class, tile) -> ms over the class's shapes
    for sh in bench.shapes:
        for t in tiles:
            cls = _mma_class(sh)
            if cls == "int4:swiglu":  # both halves are one product: half the rows a half, same registers
                t = (t[0] // 2, *t[1:])
            key = (cls, t)
            per[key] = per.get(key, 0.0) + bench.shape_ms(Variant("mma", m, t), sh, fused=True)
    best: dict[str, tuple] = {}
    for (cls, t), ms in per.items():
        if cls not in best or ms < per[cls, best[cls]]:
            best[cls] = t
    return sum(per[cls, t] for cls, t in best.items()), best


def run_format(bench: Bench, rows: list[int], smoke: bool, tiles: int, kernels: list[str],
               mma_tiles: int) -> list[dict]:
    variants = _variants(bench.fmt, rows, smoke, tiles, kernels, mma_tiles)
    gb = bench.step_bytes() / 1e9
    print(f"\n== {bench.fmt} (group {bench.group or 'per channel'}): {gb:.2f} GB of weights per step; "
          f"sweep of {len(variants)} kernel/tile/M candidates on the plain product", flush=True)
    from triton.errors import TritonError

    sweep: dict[Variant, float] = {}
    rejected: dict[tuple[str, int], str] = {}
    for i, v in enumerate(variants, 1):
        t0 = time.perf_counter()
        try:
            sweep[v] = bench.step_ms(v, fused=False)
        except TritonError as e:  # a tile the compiler rejects (registers, shared memory): the next one
            rejected.setdefault((v.kernel, v.m), f"{v.name}: {type(e).__name__}: {str(e)[:300]}")
            print(f"  [{i:>2}/{len(variants)}] {v.name:<24} rejected: {type(e).__name__}", flush=True)
            continue
        print(f"  [{i:>2}/{len(variants)}] {v.name:<24} {sweep[v]:8.3f} ms/step {gb / sweep[v] * 1e3:7.0f} GB/s "
              f"(checked, {time.perf_counter() - t0:.1f} s)", flush=True)
    lost = [msg for key, msg in rejected.items() if not any((v.kernel, v.m) == key for v in sweep)]
    if lost:  # no tile at all of a kernel at some M: a broken kernel, not a tile too big
        raise Mismatch("every candidate tile failed to compile, e.g. " + "; ".join(lost))
    best: dict[tuple[str, int], Variant] = {}
    for v, ms in sweep.items():
        key = (v.kernel, v.m)
        if key not in best or ms < sweep[best[key]]:
            best[key] = v
    print(f"-- {bench.fmt}: each kernel at its best tile, with the model's fused prologue and epilogues", flush=True)
    results = []
    for (kernel, m), v in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ms, swiglu_tile, mma_tiles_best = 0.0, None, None
        if kernel == "mma":
            ms, mma_tiles_best = _mma_fused(bench, [w.tile for w in sweep if (w.kernel, w.m) == (kernel, m)], m)
        for sh in (bench.shapes if kernel != "mma" else []):
            t = bench.shape_ms(v, sh, fused=True)
            if sh.role == "w13" and kernel == "fma" and v.tile[0] >= 2:
                # SwiGLU runs two products in a program, about 1.7x the registers: try half the rows.
                bn, bk, w = v.tile
                half = Variant(kernel, m, (bn // 2, bk, w))
                t_half = bench.shape_ms(half, sh, fused=True)
                swiglu_tile = half.tile if t_half < t else v.tile
                t = min(t, t_half)
            ms += t
        results.append({"format": bench.fmt, "kernel": kernel, "m": m, "tile": v.tile, "swiglu_tile": swiglu_tile,
                        "mma_tiles": mma_tiles_best, "step_ms": ms, "plain_step_ms": sweep[v], "gb_s": gb / ms * 1e3,
                        "sweep": {w.name: sweep[w] for w in sweep if (w.kernel, w.m) == (kernel, m)}})
        note = f" (w13 with SwiGLU at {_tile_name(swiglu_tile)})" if swiglu_tile else ""
        if mma_tiles_best:
            note = " (per class: " + ", ".join(f"{c} {_tile_name(t)}" for c, t in sorted(mma_tiles_best.items())) + ")"
        print(f"  {v.name:<24} {ms:8.3f} ms/step (fused){note}", flush=True)
    one = next(r for r in results if r["kernel"] == "gemv")["step_ms"]
    for r in results:
        r["x_one_row_step"] = r["step_ms"] / one
        r["aggregate_x"] = r["m"] * one / r["step_ms"]
    return results


def print_table(results: list[dict]) -> None:
    print(f"\n{'format':>6} {'kernel':>6} {'M':>3} {'tile':>12} {'ms/step':>8} {'GB/s':>6} {'step/1-row':>10} "
          f"{'aggregate x':>11}")
    for r in results:
        print(f"{r['format']:>6} {r['kernel']:>6} {r['m']:>3} {_tile_name(r['tile']):>12} {r['step_ms']:8.3f} "
              f"{r['gb_s']:6.0f} {r['x_one_row_step']:10.2f} {r['aggregate_x']:11.2f}")
    # What to ship: the faster kernel per (format, M), and the best fma tiles as the environment value.
    few, kernels, mma = {}, {}, {}
    for r in results:
        if r["kernel"] == "mma":
            mma[r["m"]] = r["mma_tiles"]
        if r["kernel"] == "fma":
            key = f"{r['format']}:{min(16, 1 << (r['m'] - 1).bit_length())}"
            few[key] = r["tile"]
            if r["swiglu_tile"] is not None:
                few[key + ":swiglu"] = r["swiglu_tile"]
        if r["kernel"] != "gemv":
            key = (r["format"], r["m"])
            if key not in kernels or r["step_ms"] < kernels[key]["step_ms"]:
                kernels[key] = r
    print("\nfaster multi-row kernel per (format, M): " +
          ", ".join(f"{f} M={m}: {r['kernel']} ({r['aggregate_x']:.2f}x)" for (f, m), r in sorted(kernels.items())))
    print("TORCHCHAT_GEMV_FEW_TILES='" + json.dumps(few) + "'")
    for m, tiles in sorted(mma.items()):  # one kernel for every M: the tiles of the M that matters most
        print(f"mma tiles at M={m}: TORCHCHAT_GEMV_MMA_TILES='" + json.dumps(tiles) + "'")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="7B", help="params table whose layer shapes to time (default 7B)")
    p.add_argument("--formats", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    p.add_argument("--rows", type=int, nargs="+", default=[2, 4, 8, 16], help="input rows M (1..16)")
    p.add_argument("--tiles", type=int, default=3,
                   help="candidate tiles of each kernel per M, at most (default 3; 4: all, ~12 more compiles a format)")
    p.add_argument("--kernels", nargs="+", default=["dot", "fma", "mma"], choices=["dot", "fma", "mma"],
                   help="multi-row kernels to time (the one-row kernel always is; mma: int4 only)")
    p.add_argument("--mma-tiles", type=int, default=len(MMA_TILES),
                   help=f"mma candidate tiles, at most (default all {len(MMA_TILES)}: never swept on a GPU yet)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    a = p.parse_args(argv)
    if any(not 2 <= m <= 16 for m in a.rows):
        p.error("--rows: each M must be in 2..16 (the one-row kernel is always timed)")
    if a.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    if a.smoke:
        device, dtype, rotate = "cpu", torch.float32, 0
    else:
        if not torch.cuda.is_available():
            print("Error: no CUDA device (use --smoke for the CPU interpreter check)", file=sys.stderr)
            return 2
        from torchchat.kernels.tune import ROTATE_BYTES

        device, dtype, rotate = "cuda", torch.bfloat16, ROTATE_BYTES
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    shapes = _shapes(a.model, a.smoke)
    results = []
    try:
        for fmt in a.formats:
            bench = Bench(fmt, shapes, a.rows, device, dtype, rotate)
            results += run_format(bench, a.rows, a.smoke, a.tiles, a.kernels, a.mma_tiles)
            del bench
            if device == "cuda":
                torch.cuda.empty_cache()
    except Mismatch as e:
        print(f"\nMISMATCH: {e}", file=sys.stderr)
        return 1
    print_table(results)
    print(f"\n{'smoke run (interpreter, float32): no timing meaning; ' if a.smoke else ''}"
          f"done in {time.perf_counter() - t0:.0f} s", flush=True)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
