"""torchchat's native CPU kernels (torchchat/kernels/cpu) against gguf-py's numpy dequantization.

Every instruction-set path this CPU runs is tested in-process (cpu.set_isa), every GGUF type, several
activation row counts (decode, odd, prefill) and an odd number of output rows so the 4-row tiles and
the thread split both leave remainders.

Tolerance. The kernels quantize each block of 32 activations to int8 with scale d = max|x| / 127 and
round to nearest, so each activation is off by at most d / 2. Weights are used exactly (their fp16
scales are the file's). The output error of row n is therefore at most
    sum over blocks b of (d_b / 2) * sum_{i in b} |W[n, i]|
(a strict bound, computed per output below), plus float32 accumulation error, bounded generously by
1e-5 * sum_i |x_i W[n, i]|. bfloat16 outputs add their own rounding, 2^-8 relative.

The interleaved K-quant kernels of the SIMD paths (Q4_K, Q5_K, Q6_K) quantize activations per 256 values
instead (one scale per super-block, as llama.cpp's Q8_K): the same bound with 256-value blocks, and
they are also checked against that quantization emulated here in numpy, to float summation order.

The bf16 prefill path (16+ rows: weights dequantized to bf16, dense GEMM) rounds activations and
weights to bf16 instead, each off by at most 2^-9 relative, so the error is at most
2^-8 * sum_i |x_i W[n, i]| (plus the same float32 and output-rounding terms).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GT  # noqa: E402
from gguf import quants  # noqa: E402

from torchchat.kernels import cpu  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"CPU kernels unavailable: {cpu.unavailable_reason()}")

SIMPLE = [cpu.Q4_0, cpu.Q4_1, cpu.Q5_0, cpu.Q5_1, cpu.Q8_0]
KQUANTS = [cpu.Q4_K, cpu.Q5_K, cpu.Q6_K]
N = 67  # odd: leaves a remainder after the 4-row tiles and the thread split


def _supported() -> list[str]:
    return cpu.supported_isas() if cpu.available() else []


@pytest.fixture(params=list(cpu.ISAS))
def isa(request):
    if request.param not in _supported():
        pytest.skip(f"this CPU cannot run the {request.param} path")
    cpu.set_isa(request.param)
    cpu.set_prefill("int8")  # the integer kernels for every row count; the bf16 path is tested apart
    assert cpu.isa() == request.param
    yield request.param
    cpu.set_isa(None)
    cpu.set_prefill(None)


def random_kquant(qtype: int, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """K-quant rows from the format (gguf 0.19 cannot quantize them): random codes and 6-bit / int8
    sub-block scales, with finite positive fp16 super-block scales."""
    elems, nbytes = cpu.formats.BLOCKS[qtype]
    raw = rng.integers(0, 256, size=(n, k // elems, nbytes), dtype=np.uint8)
    d = (rng.random((n, k // elems)) * 0.01 + 1e-3).astype(np.float16).view(np.uint8).reshape(n, -1, 2)
    dmin = (rng.random((n, k // elems)) * 0.01).astype(np.float16).view(np.uint8).reshape(n, -1, 2)
    if qtype == cpu.Q6_K:
        raw[:, :, 208:210] = d
    else:
        raw[:, :, 0:2] = d
        raw[:, :, 2:4] = dmin
    return raw.reshape(n, -1)


def make_weight(qtype: int, n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 (n, row_bytes), dequantized float32 (n, k))."""
    rng = np.random.default_rng(seed)
    if qtype in SIMPLE:
        packed = quants.quantize(rng.standard_normal((n, k)).astype(np.float32), GT(qtype))
    else:
        packed = random_kquant(qtype, n, k, rng)
    assert packed.shape == (n, cpu.row_bytes(qtype, k))
    return packed, quants.dequantize(packed, GT(qtype)).reshape(n, k).astype(np.float32)


def error_bound(x: np.ndarray, w: np.ndarray, blk: int = 32) -> np.ndarray:
    """Per-output bound of the int8 activation quantization error (see the module docstring)."""
    m, k = x.shape
    half_d = np.abs(x).reshape(m, k // blk, blk).max(-1) / 127 / 2  # (M, K/blk)
    w_abs = np.abs(w).reshape(w.shape[0], k // blk, blk).sum(-1)  # (N, K/blk)
    return half_d.astype(np.float64) @ w_abs.T.astype(np.float64) + 1e-5 * (np.abs(x) @ np.abs(w).T)


def check_linear(qtype: int, k: int, m: int, dtype: torch.dtype, bf16_path: bool = False, n: int = N) -> None:
    packed, w = make_weight(qtype, n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    y = cpu.linear(x, torch.from_numpy(packed), qtype, n, k)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_within_bound(y, x, w, bf16_path)


def assert_within_bound(y: torch.Tensor, x: torch.Tensor, w: np.ndarray, bf16_path: bool = False,
                        blk: int = 32) -> np.ndarray:
    """y = x @ w.T within the module docstring's bound for the path taken; returns the float64 reference."""
    xf = x.float().numpy()
    ref = xf.astype(np.float64) @ w.T.astype(np.float64)
    bound = error_bound(xf, w, blk)
    if bf16_path:
        bound = 2.0**-8 * (np.abs(xf) @ np.abs(w).T) + 2.0**-8 * np.abs(ref) + 1e-5 * (np.abs(xf) @ np.abs(w).T)
    if y.dtype == torch.bfloat16:
        bound = bound + np.abs(ref) * 2.0**-8
    err = np.abs(y.float().numpy() - ref)
    assert (err <= bound).all(), f"max err/bound {(err / bound).max():.3f}"
    # and the bound is not vacuous: typical errors are far below it
    assert np.linalg.norm(y.float().numpy() - ref) < 0.02 * np.linalg.norm(ref)
    return ref


@pytest.mark.parametrize("m", [1, 3, 17, 128])
@pytest.mark.parametrize("qtype", SIMPLE + KQUANTS, ids=lambda q: cpu.NAMES[q])
def test_linear_fp32(isa, qtype, m):
    # 288 = 9 blocks: a partial group of 8 blocks (stories15M's dim); K-quants need multiples of 256.
    check_linear(qtype, 288 if qtype in SIMPLE else 512, m, torch.float32)


@pytest.mark.parametrize("qtype", SIMPLE + KQUANTS, ids=lambda q: cpu.NAMES[q])
def test_linear_bf16(isa, qtype):
    check_linear(qtype, 1280, 3, torch.bfloat16)


@pytest.mark.parametrize("qtype", SIMPLE + KQUANTS, ids=lambda q: cpu.NAMES[q])
def test_linear_bf16_prefill_path(isa, qtype):
    cpu.set_prefill("bf16")  # each ISA's bf16 dequantization, then torch's GEMM
    check_linear(qtype, 288 if qtype in SIMPLE else 512, 16, torch.float32, bf16_path=True)
    check_linear(qtype, 288 if qtype in SIMPLE else 512, 16, torch.bfloat16, bf16_path=True)


def test_bf16_prefill_several_slices():
    cpu.set_prefill("bf16")
    try:  # k=2048: 256-row weight slices, so 300 rows take two
        check_linear(cpu.Q4_0, 2048, 16, torch.float32, bf16_path=True, n=300)
    finally:
        cpu.set_prefill(None)


def test_linear_long_k_prefill(isa):
    """K beyond one 1024-value slice and M beyond one 16-row block: the prefill blocking adds slices."""
    check_linear(cpu.Q4_K, 2304, 20, torch.float32)
    check_linear(cpu.Q8_0, 1056, 20, torch.float32)


def test_linear_batch_dims_and_stacked_rows():
    a, wa = make_weight(cpu.Q4_0, 8, 256, seed=1)
    b, wb = make_weight(cpu.Q4_0, 12, 256, seed=2)
    stacked = torch.from_numpy(np.concatenate([a, b]))
    x = torch.randn(2, 3, 256)
    y = cpu.linear(x, stacked, cpu.Q4_0, 20, 256)
    assert y.shape == (2, 3, 20)
    ya = cpu.linear(x, torch.from_numpy(a), cpu.Q4_0, 8, 256)
    torch.testing.assert_close(y[..., :8], ya, rtol=0, atol=0)


@pytest.mark.parametrize("qtype", SIMPLE + KQUANTS, ids=lambda q: cpu.NAMES[q])
def test_embedding_matches_dequantize(qtype):
    k = 512
    packed, w = make_weight(qtype, 50, k)
    ids = torch.tensor([[0, 49, 7], [7, 3, 1]])
    e = cpu.embedding(torch.from_numpy(packed), ids, qtype, k, torch.float32)
    assert e.shape == (2, 3, k)
    torch.testing.assert_close(e, torch.from_numpy(w)[ids], rtol=1e-6, atol=1e-7)
    e16 = cpu.embedding(torch.from_numpy(packed), ids, qtype, k, torch.bfloat16)
    torch.testing.assert_close(e16, torch.from_numpy(w)[ids].bfloat16(), rtol=0, atol=0)


def test_bad_arguments_raise():
    packed, _ = make_weight(cpu.Q4_0, 4, 64)
    with pytest.raises(RuntimeError, match="expected"):
        cpu.linear(torch.randn(1, 64), torch.from_numpy(packed), cpu.Q4_0, 5, 64)
    with pytest.raises(RuntimeError, match="unsupported GGUF type"):
        cpu.linear(torch.randn(1, 64), torch.from_numpy(packed), 9, 4, 64)  # Q8_1: no kernel
    with pytest.raises(RuntimeError, match="out of range"):
        cpu.embedding(torch.from_numpy(packed), torch.tensor([4]), cpu.Q4_0, 64)
    with pytest.raises(ValueError, match="supported"):
        cpu.row_bytes(9, 64)


# ---- packers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("pack,qtype,tol", [(cpu.pack_q8_0, cpu.Q8_0, 0.01), (cpu.pack_q4_0, cpu.Q4_0, 0.15),
                                            (cpu.pack_q4_1, cpu.Q4_1, 0.12)])
def test_packers_roundtrip(pack, qtype, tol, group_size):
    if qtype == cpu.Q8_0 and group_size != 32:
        pytest.skip("Q8_0 packs per 32")
    w = torch.randn(24, 256)
    packed = pack(w) if qtype == cpu.Q8_0 else pack(w, group_size=group_size)
    assert packed.dtype == torch.uint8 and packed.shape == (24, cpu.row_bytes(qtype, 256))
    deq = torch.from_numpy(quants.dequantize(packed.numpy(), GT(qtype)).reshape(24, 256))
    assert ((deq - w).norm() / w.norm()).item() < tol
    if group_size > 32:  # one scale per group, repeated in each of its 32-value blocks
        d = packed.view(24, 8, -1)[:, :, :2].reshape(24, 2, 4, 2)
        assert torch.equal(d, d[:, :, :1].expand_as(d))


def test_pack_codes_exact():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (6, 128), generator=g)
    scales = torch.rand(6, 2, generator=g).half().float()
    mins = -torch.rand(6, 2, generator=g).half().float()
    s_full = scales.repeat_interleave(64, dim=1)
    m_full = mins.repeat_interleave(64, dim=1)
    q41 = cpu.pack_q4_1_codes(codes, scales, mins)
    deq = quants.dequantize(q41.numpy(), GT.Q4_1).reshape(6, 128)
    torch.testing.assert_close(torch.from_numpy(deq), s_full * codes + m_full, rtol=1e-6, atol=1e-6)
    q40 = cpu.pack_q4_0_codes(codes, scales)
    deq = quants.dequantize(q40.numpy(), GT.Q4_0).reshape(6, 128)
    torch.testing.assert_close(torch.from_numpy(deq), s_full * (codes - 8), rtol=1e-6, atol=1e-6)


# ---- compile and export ----------------------------------------------------------------------


class _Tiny(torch.nn.Module):
    def __init__(self, packed: np.ndarray, table: np.ndarray, qtype: int, n: int, k: int):
        super().__init__()
        self.register_buffer("w", torch.from_numpy(packed))
        self.register_buffer("table", torch.from_numpy(table))
        self.qtype, self.n, self.k = qtype, n, k

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.ops.torchchat_cpu.ggml_embedding(self.table, ids, cpu.Q8_0, self.k, torch.float32)
        return torch.ops.torchchat_cpu.ggml_linear(torch.relu(h), self.w, self.qtype, self.n, self.k) * 2


def _tiny() -> _Tiny:
    packed, _ = make_weight(cpu.Q4_K, 36, 256)
    table, _ = make_weight(cpu.Q8_0, 10, 256, seed=3)
    return _Tiny(packed, table, cpu.Q4_K, 36, 256)


def test_torch_compile_fullgraph_matches_eager():
    model = _tiny()
    ids = torch.tensor([[1, 2, 3]])
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_aoti_package_matches_eager(tmp_path):
    model = _tiny()
    ids = torch.tensor([[1, 2, 3, 4]])
    seq = torch.export.Dim("seq", min=1, max=16)
    ep = torch.export.export(model, (ids,), dynamic_shapes=({1: seq},), strict=False)
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "tiny.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    for t in (ids, torch.tensor([[5, 6]])):
        torch.testing.assert_close(loaded(t), model(t), rtol=1e-5, atol=1e-5)


# ---- loading ---------------------------------------------------------------------------------


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    full_env = {**os.environ, "PYTHONPATH": root, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_import_builds_nothing_and_without_compiler_unavailable(tmp_path):
    # Importing touches no cache; with no compiler, available() is False with the reason, no traceback.
    code = (
        "import os, sys; from torchchat.kernels import cpu; "
        "assert not os.listdir(sys.argv[1]), 'import wrote to the cache'; "
        "print(cpu.available()); print(cpu.unavailable_reason())"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root, "TORCHCHAT_CACHE": str(tmp_path), "CXX": "no-such-compiler"}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "False"
    assert "no-such-compiler" in r.stdout and "Traceback" not in r.stderr


def test_env_var_caps_isa():
    cache = str(cpu.library_path().parent.parent.parent)  # the test process's cache: no rebuild
    r = _python("from torchchat.kernels import cpu; print(cpu.isa())", TORCHCHAT_CACHE=cache, TORCHCHAT_CPU_ISA="avx2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("avx2" if "avx2" in _supported() else "scalar")


# ---- row-interleaved layouts (type | X16): made at load time for the kernels ----
INTERLEAVED = SIMPLE + KQUANTS  # every type has one


def check_interleaved(qtype: int, k: int, m: int, n: int, dtype: torch.dtype = torch.float32, bf16_path: bool = False) -> None:
    packed, w = make_weight(qtype, n, k, seed=n + m)
    x16 = cpu.interleave(torch.from_numpy(packed), qtype, k)
    assert x16.shape == (n, cpu.row_bytes(qtype | cpu.X16, k))
    # byte for byte back to the file's layout
    assert torch.equal(cpu.deinterleave(x16, qtype | cpu.X16, k), torch.from_numpy(packed))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    y = cpu.linear(x, x16, qtype | cpu.X16, n, k)
    assert y.dtype == dtype and y.shape == (m, n)
    # (the K-quants take 256 values per activation scale from 8 rows on, the prefill path)
    blk = 256 if qtype in KQUANTS and cpu.isa() != "scalar" and not bf16_path and m >= 8 else 32
    ref = assert_within_bound(y, x, w, bf16_path, blk)
    if bf16_path:
        return
    # the int8 activations emulated: equal up to float summation order
    emulated = torch.from_numpy(quantized(x.float().numpy(), blk, cpu.isa() != "scalar").astype(np.float64)
                                @ w.T.astype(np.float64))
    rtol = 1e-4 if dtype == torch.float32 else 2.0**-8  # bf16 outputs are rounded
    torch.testing.assert_close(y.double(), emulated, rtol=rtol, atol=2e-4 * float(np.abs(ref).max()))
    if blk == 32:  # the same int8 activations as the file layout's kernels
        y_plain = cpu.linear(x, torch.from_numpy(packed), qtype, n, k)
        torch.testing.assert_close(y, y_plain, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def quantized(x: np.ndarray, blk: int, half_even: bool) -> np.ndarray:
    """x (M, K) after the kernels' activation quantization: int8 codes per `blk` values, round to
    nearest, scale max|x| / 127, in float32 arithmetic as the kernels do. Ties (they occur: x / d is
    a float32) go to even in the SIMD paths (cvtps2dq), away from zero in the scalar one."""
    m, k = x.shape
    xb = x.reshape(m, k // blk, blk).astype(np.float32)
    amax = np.abs(xb).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    v = xb * inv
    rounded = np.rint(v) if half_even else np.trunc(v + np.where(v < 0, np.float32(-0.5), np.float32(0.5)))
    codes = np.clip(rounded, -127, 127)
    return (codes * (amax / np.float32(127))).reshape(m, k)


@pytest.mark.parametrize("m", [1, 3, 17, 128])
@pytest.mark.parametrize("qtype", INTERLEAVED, ids=lambda q: cpu.NAMES[q])
def test_interleaved_linear(isa, qtype, m):
    # 288 = 9 blocks (stories15M's dim); 80 rows = 5 groups, split unevenly between threads
    check_interleaved(qtype, 288 if qtype in SIMPLE else 512, m, 80)


@pytest.mark.parametrize("qtype", INTERLEAVED, ids=lambda q: cpu.NAMES[q])
def test_interleaved_bf16_and_dense_prefill(isa, qtype):
    check_interleaved(qtype, 1280, 3, 32, torch.bfloat16)
    cpu.set_prefill("bf16")
    check_interleaved(qtype, 1280 if qtype in SIMPLE else 1536, 20, 48, bf16_path=True)


@pytest.mark.parametrize("qtype", INTERLEAVED, ids=lambda q: cpu.NAMES[q])
def test_interleaved_embedding(qtype):
    k = 512
    packed, w = make_weight(qtype, 48, k)
    x16 = cpu.interleave(torch.from_numpy(packed), qtype, k)
    ids = torch.tensor([[0, 47, 17], [31, 16, 15]])
    e = cpu.embedding(x16, ids, qtype | cpu.X16, k, torch.float32)
    torch.testing.assert_close(e, torch.from_numpy(w)[ids], rtol=1e-6, atol=1e-7)


def test_interleave_refuses_bad_input():
    packed, _ = make_weight(cpu.Q4_0, 40, 256)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu.interleave(torch.from_numpy(packed), cpu.Q4_0, 256)
    packed, _ = make_weight(cpu.Q4_1, 32, 256)
    twice = cpu.interleave(torch.from_numpy(packed), cpu.Q4_1, 256)
    with pytest.raises(RuntimeError, match="no interleaved layout"):
        cpu.interleave(twice, cpu.Q4_1 | cpu.X16, 256)


THP = "/sys/kernel/mm/transparent_hugepage/enabled"

# Run in a fresh process: tensors other tests keep alive could share the chunk and keep it mapped.
_HUGE_CHECK = r"""
import torch
from torchchat.kernels import cpu

def mapping_of(addr):
    entry = None
    for line in open("/proc/self/smaps").read().splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            entry = {"range": (lo, hi)} if lo <= addr < hi else None
        elif entry is not None and head[0] == "VmFlags:":
            entry["VmFlags"] = head[1:]
            return entry
    return entry

g = torch.Generator().manual_seed(0)
packed = [torch.randint(0, 256, (16 * 40, 32 * 18), dtype=torch.uint8, generator=g) for _ in range(3)]
for p in packed:
    p.view(-1, 18)[:, :2] = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)
x16 = [cpu.interleave(p, cpu.Q4_0, 1024) for p in packed]
first = mapping_of(x16[0].data_ptr())
assert first is not None and "hg" in first["VmFlags"], first  # hg: madvise(MADV_HUGEPAGE)
assert first["range"][0] % (2 << 20) == 0, first
for p, t in zip(packed, x16):
    assert t.data_ptr() % 4096 == 0
    assert mapping_of(t.data_ptr())["range"] == first["range"]
    assert torch.equal(cpu.deinterleave(t, cpu.Q4_0 | cpu.X16, 1024), p)
addr = x16[0].data_ptr()
del t
x16.pop(0)
assert mapping_of(addr) is not None  # the other two still live there
x16.clear()
assert mapping_of(addr) is None, "the chunk outlived its tensors"
print("ok")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists(THP)
                    or "[never]" in open(THP).read(), reason="transparent huge pages off or not Linux")
def test_interleaved_weights_share_huge_page_chunks_and_free_them():
    # Small weights (under 2 MiB, as most of stories110M's are) side by side in one 2 MiB-aligned mapping
    # advised for huge pages, unmapped with the last of them.
    out = subprocess.run([sys.executable, "-c", _HUGE_CHECK], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# ---- decode attention: only the positions the mask allows are read ----
def _reference_attention(q, k, v, pos, window):
    """scaled_dot_product_attention with the causal (or sliding-window) mask row of each position."""
    b, h, _, d = q.shape
    s = k.size(2)
    t = torch.arange(s)
    rows = pos.view(-1, 1).expand(b, 1)
    mask = t.view(1, -1) <= rows
    if window:
        mask &= t.view(1, -1) > rows - window
    kk = k.float().repeat_interleave(h // k.size(1), dim=1)
    vv = v.float().repeat_interleave(h // k.size(1), dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=mask.view(b, 1, 1, s), scale=0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,window", [(64, 0), (80, 0), (64, 5), (12, 0)])
def test_decode_attention(isa, dtype, head_dim, window):
    g = torch.Generator().manual_seed(head_dim + window)
    b, h, hkv, s = 3, 8, 2, 40  # grouped-query: 4 query heads per cached head
    q = torch.randn(b, h, 1, head_dim, generator=g).to(dtype)
    k = torch.randn(b, hkv, s, head_dim, generator=g).to(dtype)
    v = torch.randn(b, hkv, s, head_dim, generator=g).to(dtype)
    for pos in (torch.tensor([0]), torch.tensor([39]), torch.tensor([[3], [17], [39]])):
        out = cpu.decode_attention(q, k, v, pos, 0.125, window)
        assert out.dtype == dtype and out.shape == q.shape
        ref = _reference_attention(q, k, v, pos, window)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    # positions past the one being decoded are never read: garbage there changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 18:], v2[:, :, 18:] = float("nan"), float("nan")
    pos = torch.tensor([17])
    torch.testing.assert_close(cpu.decode_attention(q, k2, v2, pos, 0.125, window),
                               cpu.decode_attention(q, k, v, pos, 0.125, window), rtol=0, atol=0)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 12])
def test_decode_attention_reads_a_narrower_cache_exactly(isa, cache_dtype, head_dim):
    """An fp32 query against a float16 / bf16 cache (an fp32 packed model keeps its cache in float16):
    the kernel widens each stored value exactly, so it matches fp32 attention over those same values."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 8, 1, head_dim, generator=g)
    k = torch.randn(2, 2, 30, head_dim, generator=g).to(cache_dtype)
    v = torch.randn(2, 2, 30, head_dim, generator=g).to(cache_dtype)
    pos = torch.tensor([[4], [29]])
    out = cpu.decode_attention(q, k, v, pos, 0.125, 0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _reference_attention(q, k.float(), v.float(), pos, 0), rtol=1e-5, atol=1e-5)


def _attention_float64(q, k, v, pos, scale, window):
    """The same attention in float64 over the cache's stored values, position by position."""
    b, h, _, d = q.shape
    group = h // k.size(1)
    out = torch.empty(b, h, 1, d, dtype=torch.float64)
    rows = pos.view(-1).expand(b) if pos.numel() == 1 else pos.view(-1)
    for i in range(b):
        t1 = int(rows[i])
        t0 = max(0, t1 - window + 1) if window else 0
        for j in range(h):
            kk = k[i, j // group, t0 : t1 + 1].double()
            vv = v[i, j // group, t0 : t1 + 1].double()
            p = torch.softmax(kk @ q[i, j, 0].double() * scale, dim=0)
            out[i, j, 0] = p @ vv
    return out


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [8, 24, 40, 64, 72, 128, 136])
def test_decode_attention_every_block_and_tail(isa, cache_dtype, head_dim):
    """Every count of positions from 1 to 26 (the kernels score 8 positions per step, then a tail) and
    head sizes that take each of their paths (16- and 32-value steps, 64-value chunks of the output
    plus 8-value tails); grouped-query heads and rows with their own positions, so each head's call
    prefetches the next one's keys. Against float64 over the same stored values: the kernels sum in
    another order and take exp from a polynomial (within ~2 ulp), so not bit for bit: at most 9.4e-7
    (scalar), 6.0e-7 (avx2) and 5.1e-7 (avx512) measured, against the 1e-5 allowed."""
    g = torch.Generator().manual_seed(head_dim)
    b, h, hkv, s = 2, 6, 3, 32
    q = torch.randn(b, h, 1, head_dim, generator=g)
    k = torch.randn(b, hkv, s, head_dim, generator=g).to(cache_dtype)
    v = torch.randn(b, hkv, s, head_dim, generator=g).to(cache_dtype)
    scale = head_dim ** -0.5
    for n in range(1, 27):
        pos = torch.tensor([[n - 1], [min(s - 1, n + 4)]])
        out = cpu.decode_attention(q, k, v, pos, scale, 0)
        torch.testing.assert_close(out.double(), _attention_float64(q, k, v, pos, scale, 0), rtol=1e-5, atol=1e-5)
    for window in (1, 7, 8, 9, 17):  # sliding windows that start past position 0
        pos = torch.tensor([30])
        out = cpu.decode_attention(q, k, v, pos, scale, window)
        torch.testing.assert_close(out.double(), _attention_float64(q, k, v, pos, scale, window), rtol=1e-5, atol=1e-5)


def test_decode_attention_far_apart_scores(isa):
    """Scores 100s apart: the exp of the smaller ones underflows (the kernels' exp gives ~1e-38 below
    -87.3 instead of 0), which leaves the output equal to the largest score's value row."""
    d, s = 64, 20
    q = torch.zeros(1, 2, 1, d)
    q[..., 0] = 1.0
    k = torch.zeros(1, 2, s, d)
    k[0, :, :, 0] = torch.arange(s, dtype=torch.float32) * 50.0  # scores 0, 50, ..., 950
    v = torch.randn(1, 2, s, d, generator=torch.Generator().manual_seed(3))
    for kind in (torch.float32, torch.float16):
        out = cpu.decode_attention(q, k.to(kind), v.to(kind), torch.tensor([s - 1]), 1.0, 0)
        torch.testing.assert_close(out, v.to(kind).float()[:, :, s - 1 :], rtol=1e-6, atol=1e-6)


def test_decode_attention_refuses_bad_positions():
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu.decode_attention(q, k, k, torch.tensor([4]), 1.0)
