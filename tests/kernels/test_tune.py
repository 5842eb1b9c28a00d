"""`python -m torchchat.kernels.tune`, the GEMV tile sweep: its command line and arithmetic on any
machine, the sweep itself on a CUDA GPU."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, needs_cuda


def test_help_runs_without_a_gpu():
    r = subprocess.run([sys.executable, "-m", "torchchat.kernels.tune", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "TORCHCHAT_GEMV_TILES" in r.stdout and "--formats" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_it_says_what_it_needs(capsys):
    from torchchat.kernels.tune import main

    assert main(["--formats", "int8"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_layer_shapes_are_the_decode_gemvs():
    from torchchat.kernels.tune import layer_shapes
    from torchchat.model.registry import params_table

    assert [(n, k) for _, n, k in layer_shapes(params_table("7B"))] == [
        (12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)]
    assert [(n, k) for _, n, k in layer_shapes(params_table("Meta-Llama-3-8B"))] == [
        (6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]


def test_tile_names_round_trip():
    """The sweep names tiles for its table and reads the winner back into TORCHCHAT_GEMV_TILES fields."""
    from torchchat.kernels.gemv import GemvConfig
    from torchchat.kernels.tune import _tile_fields, _tile_name

    assert _tile_name(GemvConfig(16, 512, 4)) == "16x512w4"
    assert _tile_name(GemvConfig(16, 512, 4, 3)) == "16x512w4s3"
    assert _tile_fields("16x512w4") == [16, 512, 4]
    assert _tile_fields("8x1024w8s4") == [8, 1024, 8, 4]
    assert _tile_name(GemvConfig(32, 512, 4, 1, 2)) == "32x512w4s1v2"
    assert _tile_fields("32x512w4s1v2") == [32, 512, 4, 1, 2]
    assert _tile_fields("32x1024w4s3v1") == [32, 1024, 4, 3, 1]


def test_best_tile_is_time_weighted_over_shapes():
    """Total bytes over total time: a tile fast on a small layer loses to one fast on the big layer,
    and a tile that failed on any shape is not a candidate."""
    from torchchat.kernels.tune import best_tiles

    rows = [{"bytes": 100, "configs": {"a": 100.0, "b": 50.0, "c": 200.0}},
            {"bytes": 1000, "configs": {"a": 100.0, "b": 200.0, "c": "error OutOfResources"}}]
    top = best_tiles(rows)
    assert [name for name, _ in top] == ["b", "a"]
    assert top[0][1] == pytest.approx(1100 / (100 / 50 + 1000 / 200))


@needs_cuda
def test_sweep_finds_a_tile_per_size_class():
    pytest.importorskip("triton")
    from torchchat.kernels.tune import sweep
    from torchchat.model.registry import params_table

    # stories15M's rows of 288 do not take per-channel int8's blocks of 128: those shapes are skipped
    # (the model keeps them in bf16); stories110M's all fit.
    results, tiles = sweep([params_table("stories15M"), params_table("stories110M")], ["int8"])
    assert set(tiles) == {"int8", "int8:small"} and all(len(t) in (3, 4) for t in tiles.values())
    assert {row["k"] for row in results["int8"]} == {768, 2048}
    assert all(row["rel_err"] < 1e-2 for row in results["int8"])
