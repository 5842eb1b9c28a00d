"""The one-kernel dequantization (torchchat/kernels/dequant.py) against formats.dequantize, which the
prefill path used before. float32 outputs are exact in Triton's interpreter (q * s + m without FMA).
Otherwise the allowance is one unit in the last place of the output dtype plus float32's rounding of
the product q * s: on a GPU the compiler fuses q * s + m into one FMA, which skips that rounding (under
cancellation, q s close to -m, that is many units of the small result: the H100 run of this test
failed float32 int4 / int8_asym on a one-unit bound), and the interpreter rounds float32 -> bfloat16
ties of negative values toward zero (measured: -0.0394287109375 gave -0.039306640625, where
round-to-nearest-even gives -0.03955078125; int8 codes times bf16 scales hit such ties often)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from torchchat.kernels import dequant  # noqa: E402
from torchchat.kernels.formats import dequantize, empty_storage, quantize_into  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _stored(fmt: str, group: int, n: int, k: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n * 7 + k)
    w = (torch.randn(n, k, generator=g) * 0.05).to(DEVICE)
    st = empty_storage("int8" if fmt == "int8_asym" else fmt, n, k, group, dtype, DEVICE)
    quantize_into(st, "int8" if fmt == "int8_asym" else fmt, group, 0, w)
    if fmt == "int8_asym":  # no quantizer makes it (GGUF blocks with minimums): random minimums
        st["mins"] = (torch.randn(st["scales"].shape, generator=g) * 0.01).to(dtype).to(DEVICE)
    return st


# (format, groupsize, rows, inputs): per-channel int8 (packing block 128), grouped int8 incl. GGUF's
# 16-value sub-blocks, int4 of several groups; row and word counts not multiples of the kernel's tile.
CASES = [("int8", 0, 13, 384), ("int8", 32, 9, 256), ("int8_asym", 16, 5, 160), ("int8_asym", 32, 17, 96),
         ("int4", 32, 11, 320), ("int4", 128, 3, 1024)]


@pytest.mark.parametrize("fmt,group,n,k", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequant_matches_reference(fmt, group, n, k, dtype):
    st = _stored(fmt, group, n, k, dtype)
    want = dequantize(fmt, group, st["weight"], st["scales"], st.get("mins"), dtype)
    got = dequant.dequantize(fmt, group, st["weight"], st["scales"], st.get("mins"), dtype)
    assert got.shape == (n, k) and got.dtype == dtype
    if DEVICE == "cpu" and dtype == torch.float32:
        assert torch.equal(got, want)
    else:
        _assert_close(got, want, st)


def _assert_close(got: torch.Tensor, want: torch.Tensor, st: dict[str, torch.Tensor]) -> None:
    """|got - want| <= one unit of want's dtype at want + float32's unit at |q s| (<= |want| + |m|)."""
    ulp = torch.finfo(want.dtype).eps * want.float().abs().clamp(min=torch.finfo(want.dtype).tiny)
    mins = st.get("mins")
    m = mins.float().repeat_interleave(want.shape[1] // mins.shape[1], dim=1).abs() if mins is not None else 0.0
    product = torch.finfo(torch.float32).eps * (want.float().abs() + m)
    assert ((got.float() - want.float()).abs() <= ulp + product).all()


def test_row_slice_of_a_larger_weight():
    """Prefill dequantizes a slice of rows at a time: a view into the middle of the storage."""
    st = _stored("int4", 32, 40, 256, torch.bfloat16)
    rows = slice(8, 29)
    want = dequantize("int4", 32, st["weight"][rows], st["scales"][rows], st["mins"][rows], torch.bfloat16)
    got = dequant.dequantize("int4", 32, st["weight"][rows], st["scales"][rows], st["mins"][rows], torch.bfloat16)
    _assert_close(got, want, {"mins": st["mins"][rows]})
