"""The GEMV tile sweep: `python -m torchchat.kernels.tune` times every candidate tile of the fused
CUDA GEMV (torchchat/kernels/gemv.py) on this GPU, per weight format and per layer shape of the given
models, each with the prologue/epilogue that layer fuses, and prints the best tiles as the
TORCHCHAT_GEMV_TILES value to run with. The shipped tiles were chosen by this sweep on an H100.

    python -m torchchat.kernels.tune                                   # 7B and Llama 3 8B shapes
    python -m torchchat.kernels.tune --models Meta-Llama-3.1-8B --formats int4 --out tiles.json

Needs a CUDA GPU and triton (`pip install -e .[gpu]`)."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROLES = ("qkv", "wo", "w13", "w2", "output")  # the batch-1 GEMVs of one decode step, in layer order
# Candidate tiles per format, (rows per program, inputs per step, warps[, pipeline stages[, int4 loop
# variant]]). One stage:
# the integer loops prefetch the next tile into registers by hand; more: Triton's pipeliner keeps that
# many tiles in flight through shared memory (gemv.py).
GRIDS = {
    "float": [(2, 2048, 8), (2, 2048, 4), (2, 1024, 4), (4, 1024, 8)],
    "int8": [(8, 512, 8), (16, 512, 8), (16, 512, 4), (32, 512, 8), (8, 1024, 8), (16, 1024, 8), (16, 1024, 4),
             (32, 1024, 4), (8, 512, 4, 3), (16, 512, 4, 3), (16, 512, 4, 4), (8, 1024, 4, 3), (32, 512, 4, 3)],
    "int4": [(16, 512, 8), (16, 512, 4), (32, 512, 4), (32, 512, 8), (16, 1024, 8), (16, 1024, 4), (32, 1024, 4),
             (64, 512, 4), (8, 512, 4, 3), (16, 512, 4, 3), (16, 512, 4, 4), (8, 1024, 4, 3), (16, 1024, 4, 3),
             (32, 512, 4, 3), (4, 1024, 4, 4),
             # The vector-tile loops (gemv.py, fifth field: variant 1 float32, 2 packed float16), chosen
             # by their SASS per weight and registers on sm_90a (bench/gemv_sm90_report.py).
             (32, 512, 4, 1, 1), (64, 512, 4, 1, 1),
             (32, 512, 4, 1, 2), (16, 1024, 4, 1, 2), (32, 1024, 4, 1, 2), (32, 1024, 4, 3, 2), (64, 512, 4, 1, 2),
             (32, 512, 4, 3, 2), (16, 1024, 4, 3, 2), (64, 1024, 8, 3, 2), (16, 1024, 8, 1, 2), (16, 512, 2, 1, 2),
             (8, 1024, 4, 1, 2)],
}
GROUPS = {"float": 0, "int8": 0, "int4": 128}
# A tile whose product is further than this from the float64 one is reported as an error, not timed
# into the choice (int4 variant 2 rounds to float16 on purpose: about 1e-3; the others about 1e-6).
MAX_REL_ERR = 1e-2
ROTATE_BYTES = 400_000_000  # weights cycled through per timing: > 8x the L2, so every read comes from memory


def layer_shapes(config) -> list[tuple[str, int, int]]:
    """(role, N, K) of a model's GEMVs: q|k|v stacked, wo, w1|w3 stacked, w2, output."""
    nq, nkv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    n_by_role = {"qkv": (nq + 2 * nkv, config.dim), "wo": (config.dim, nq),
                 "w13": (2 * config.hidden_dim, config.dim), "w2": (config.dim, config.hidden_dim),
                 "output": (config.vocab_size, config.dim)}
    return [(role, *n_by_role[role]) for role in ROLES]


def graph_time(fn, reps: int) -> float:
    """Seconds per call of `fn`, captured `reps` times back to back in one CUDA graph (median of 5 replays)."""
    import torch

    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(times)


def _weights(fmt: str, n: int, k: int, group: int, copies: int):
    import torch

    from torchchat.kernels.formats import empty_storage, quantize_into

    out = []
    for _ in range(copies):
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        st = empty_storage(fmt, n, k, group, torch.bfloat16, "cuda")
        quantize_into(st, fmt, group, 0, w)
        out.append(st)
    return out


def _nbytes(st) -> int:
    return sum(t.numel() * t.element_size() for t in st.values())


def _role_args(role: str, fmt: str, k: int, n: int):
    """The fused prologue/epilogue each layer uses in the model (torchchat/kernels/modules.py)."""
    import torch

    args = {}
    if role in ("qkv", "w13"):
        if fmt == "float":
            args["norm_weight"] = torch.rand(k, dtype=torch.bfloat16, device="cuda") + 0.5
        else:
            args["rms_only"] = True
        args["eps"] = 1e-5
    if role == "w13":
        args["swiglu"] = True
    if role in ("wo", "w2"):
        args["residual"] = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    if role == "output":
        args["out_dtype"] = torch.float32
    return args


def _tile_name(tile) -> str:
    stages = f"s{tile.num_stages}" if tile.num_stages > 1 or tile.variant else ""
    variant = f"v{tile.variant}" if tile.variant else ""
    return f"{tile.block_n}x{tile.block_k}w{tile.num_warps}{stages}{variant}"


def _tile_fields(name: str) -> list[int]:
    """Inverse of _tile_name: [block_n, block_k, num_warps(, num_stages(, variant))]."""
    bn, rest = name.split("x")
    bk, rest = rest.split("w")
    rest, _, variant = rest.partition("v")
    w, _, stages = rest.partition("s")
    return [int(bn), int(bk), int(w)] + ([int(stages)] if stages else []) + ([int(variant)] if variant else [])


def _tile_config(name: str):
    """The GemvConfig a tile name stands for."""
    from torchchat.kernels.gemv import GemvConfig

    return GemvConfig(*_tile_fields(name))


def _time_shape(fmt: str, role: str, n_w: int, k: int) -> dict:
    """GB/s of every candidate tile (and the shipped pick) on one layer shape, and the kernel's error."""
    import torch

    from torchchat.kernels.formats import dequantize, pack_block
    from torchchat.kernels.gemv import GemvConfig, gemv, pick_config

    group = GROUPS[fmt]
    n = n_w // 2 if role == "w13" else n_w
    probe = _weights(fmt, n_w, k, group, 1)[0]
    copies = max(1, -(-ROTATE_BYTES // _nbytes(probe)))
    sets = [probe] + _weights(fmt, n_w, k, group, copies - 1)
    x = torch.randn(k, dtype=torch.bfloat16, device="cuda")
    extra = _role_args(role, fmt, k, n)
    wd = dequantize(fmt, group, probe["weight"], probe.get("scales"), probe.get("mins"), torch.bfloat16)
    ref = wd.double() @ x.double()
    got = gemv(x, fmt, group, probe["weight"], probe.get("scales"), probe.get("mins")).double()
    byt = _nbytes(probe)
    row = {"role": role, "n": n_w, "k": k, "bytes": byt, "rel_err": ((got - ref).norm() / ref.norm()).item(),
           "configs": {}}
    default = pick_config(fmt, n, k, pack_block(fmt, group) if fmt != "float" else 0)
    for tile in dict.fromkeys([GemvConfig(*t) for t in GRIDS[fmt]] + [default]):
        def call(tile=tile):
            for st in sets:
                gemv(x, fmt, group, st["weight"], st.get("scales"), st.get("mins"), config=tile, **extra)
        try:
            t = graph_time(call, 4) / len(sets)
            tiled = gemv(x, fmt, group, probe["weight"], probe.get("scales"), probe.get("mins"), config=tile).double()
        except Exception as e:  # a tile the compiler rejects (resources): report, go on
            row["configs"][_tile_name(tile)] = f"error {type(e).__name__}"
            continue
        # Every tile's product is checked too, so that a loop variant that computes wrong cannot win.
        err = ((tiled - ref).norm() / ref.norm()).item()
        row["configs"][_tile_name(tile)] = byt / t / 1e9 if err < MAX_REL_ERR else f"error rel_err {err:.1e}"
    row["best"] = max((v, c) for c, v in row["configs"].items() if isinstance(v, float))
    row["default"] = row["configs"].get(_tile_name(default))
    return row


def best_tiles(rows: list[dict]) -> list[tuple[str, float]]:
    """Tiles timed on every row, best first by time-weighted GB/s (total bytes / total time)."""
    totals: dict[str, list[float]] = {}
    for row in rows:
        for c, v in row["configs"].items():
            if isinstance(v, float):
                totals.setdefault(c, []).append(row["bytes"] / v)
    whole = {c: sum(r["bytes"] for r in rows) / sum(ts) for c, ts in totals.items() if len(ts) == len(rows)}
    return sorted(whole.items(), key=lambda kv: -kv[1])


def sweep(configs: list, formats: list[str]) -> tuple[dict, dict[str, list[int]]]:
    """(every measurement, the best tile per TORCHCHAT_GEMV_TILES key) over the models' layer shapes."""
    import torch

    from torchchat.kernels.formats import pack_block
    from torchchat.kernels.gemv import SMALL_ROWS

    shapes = list(dict.fromkeys(shape for config in configs for shape in layer_shapes(config)))
    results, tiles = {}, {}
    for fmt in formats:
        rows = []
        for role, n_w, k in shapes:
            if fmt != "float" and k % pack_block(fmt, GROUPS[fmt]):
                # The model keeps such a layer in the float format (LinearQuant.fits), so it has no tile to pick.
                print(f"{fmt:>5} {role:<6} {n_w:>6}x{k:<6} skipped: rows of {k} do not take {fmt}'s "
                      f"blocks of {pack_block(fmt, GROUPS[fmt])}", flush=True)
                continue
            row = _time_shape(fmt, role, n_w, k)
            print(f"{fmt:>5} {role:<6} {n_w:>6}x{k:<6} err {row['rel_err']:.1e}  default {row['default']:.0f} GB/s  "
                  f"best {row['best'][0]:.0f} GB/s ({row['best'][1]})", flush=True)
            rows.append(row)
            torch.cuda.empty_cache()
        results[fmt] = rows
        small = [r for r in rows if r["n"] // (2 if r["role"] == "w13" else 1) <= SMALL_ROWS]
        for label, subset in ((fmt, rows), (fmt + ":small", small)):
            top = best_tiles(subset)[:4]
            print(f"{label:>11} best: " + ", ".join(f"{c} {v:.0f}" for c, v in top), flush=True)
            results[label + "_best"] = top
            if top:
                tiles[label] = _tile_fields(top[0][0])
    return results, tiles


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m torchchat.kernels.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["7B", "Meta-Llama-3-8B"], metavar="PARAMS",
                   help="Params tables whose layer shapes to time (default: 7B Meta-Llama-3-8B)")
    p.add_argument("--formats", nargs="+", default=list(GRIDS), choices=list(GRIDS),
                   help="Weight formats to sweep (default: all)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="Also write the best tiles (the TORCHCHAT_GEMV_TILES value) and every measurement as JSON")
    a = p.parse_args(argv)
    import torch

    from torchchat.kernels import triton_available
    from torchchat.model.registry import params_table

    if not torch.cuda.is_available() or not triton_available():
        print("Error: the tile sweep needs a CUDA GPU and triton (pip install -e '.[gpu]')", file=sys.stderr)
        return 2
    configs = [params_table(name) for name in a.models]
    results, tiles = sweep(configs, a.formats)
    print("TORCHCHAT_GEMV_TILES=" + json.dumps(tiles))
    if a.out is not None:
        a.out.write_text(json.dumps({"tiles": tiles, "results": results}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
