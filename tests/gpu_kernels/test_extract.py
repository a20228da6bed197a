"""Extraction kernels: the torch twin against a float64 dense reference, the Triton kernel (CPU interpreter)
against the twin, error reporting and dispatch.

Tolerances, and why:
* ids and counts: exact. Both implementations order by the raw logit then the smaller id; the reference is
  a stable float64 sort.
* tail: relative 2e-5. Float32 sums of exp2 over up to 2^18 terms; each term's exponent (x - m) * log2(e) / T
  is rounded to float32 (<= 43 * 2^-24 absolute for |x - m| <= 30, i.e. ~3e-6 relative in the term).
* lse: 2e-5 absolute + 2e-6 relative, for the same reason.
* value codes, twin vs float64 truth: the decoded weight must be within the codec's own rounding error of
  exp(r): log8 half a step (1/32 nat) in log space; e4m3 / e5m2 / fp16 half an ulp (2^-4, 2^-3, 2^-11
  relative) or half a subnormal step.
* value codes, kernel vs twin: at most one code apart (one rounding step of the codec), because exp() in the
  kernel (numpy in the interpreter, ex2.approx on GPU) can differ from torch's by an ulp and move a value
  across a rounding boundary. In practice they are equal (log8 uses no exp at all).
"""

from __future__ import annotations

import importlib
import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors

import pytest
import torch

import labelstore_kernels as lk
from labelstore.codecs import get_codec
from labelstore.errors import InvalidLogitsError
from labelstore_kernels import Extracted, extract_hard_labels, extract_topk, extract_topk_torch

NEG = float("-inf")
CODEC_HALF_ERR = {  # (relative half-ulp, absolute half subnormal step) of the weight w = exp(r)
    "e4m3": (2.0**-4, 2.0**-10 / 256),
    "e5m2": (2.0**-3, 2.0**-17 / 32768),
    "fp16": (2.0**-11, 2.0**-25 / 1024),
}


# --------------------------------------------------------------------------------------------- reference
def reference(x: torch.Tensor, k: int, temperature: float = 1.0) -> dict:
    """Dense float64 truth: ids by (logit desc, id asc), exact tail over the non-kept entries, lse."""
    xd = x.double()
    k = min(k, x.shape[1])
    z = xd / temperature
    lse = torch.logsumexp(z, -1)
    ids = torch.sort(xd, dim=-1, descending=True, stable=True).indices[:, :k]
    p = torch.exp(z - lse[:, None])
    kept = torch.zeros_like(p, dtype=torch.bool).scatter_(1, ids, True)
    xk = xd.gather(1, ids)
    return {
        "ids": ids,
        "tail": torch.where(kept, 0.0, p).sum(-1),
        "lse": lse,
        "counts": (xk > NEG).sum(-1),
        "r": (xk - xd.amax(-1, keepdim=True)) / temperature,
    }


def check_values(out: Extracted, ref: dict, codec_name: str) -> None:
    """Decoded weights are within the codec's rounding error of exp(r) (float64 truth)."""
    cdc = get_codec(codec_name)
    r = ref["r"]
    if codec_name == "none":
        assert out.values.shape == (r.shape[0], 0)
        return
    w = cdc.decode(out.values).double()  # [N, k] weights (fp16: two bytes each)
    if codec_name == "log8":
        step = cdc.param["step"]
        codes = out.values.long()
        assert torch.equal(codes == 255, torch.isneginf(r))
        inside = (codes < 254) & ~torch.isneginf(r)  # code 254 also holds everything below its range
        assert torch.all((torch.log(w[inside]) - r[inside]).abs() <= step / 2 + 1e-5)
        assert torch.all(-r[codes == 254] >= 253.5 * step - 1e-5)
        return
    rel, absolute = CODEC_HALF_ERR[codec_name]
    truth = torch.exp(r)
    assert torch.all((w - truth).abs() <= rel * truth + absolute + 1e-6 * truth)


def check_against_reference(out: Extracted, x: torch.Tensor, k: int, temperature: float, codec: str):
    ref = reference(x, k, temperature)
    kk = ref["ids"].shape[1]
    assert out.ids.dtype == torch.int32 and out.ids.shape == (x.shape[0], kk)
    assert out.values.dtype == torch.uint8 and out.values.shape == (x.shape[0], kk * get_codec(codec).bytes_per_value)
    assert out.counts.dtype == torch.int32 and out.tail.dtype == torch.float32 and out.lse.dtype == torch.float32
    assert torch.equal(out.ids.long(), ref["ids"])
    assert torch.equal(out.counts.long(), ref["counts"])
    torch.testing.assert_close(out.tail.double(), ref["tail"], rtol=2e-5, atol=1e-30)
    torch.testing.assert_close(out.lse.double(), ref["lse"], rtol=2e-6, atol=2e-5)
    check_values(out, ref, codec)


# --------------------------------------------------------------------------------------------- inputs
def make_rows(V: int, dtype: torch.dtype, seed: int, kinds: list[int] | None = None) -> torch.Tensor:
    """Rows covering the hard cases (all eight kinds by default)."""
    g = torch.Generator().manual_seed(seed)
    rows = [
        torch.randn(V, generator=g) * 3,  # plain
        torch.randint(0, 4, (V,), generator=g).float(),  # heavy ties at the k-th boundary
        torch.where(torch.rand(V, generator=g) < 0.5, NEG, torch.randn(V, generator=g)),  # masked vocabulary
        torch.full((V,), 1.25),  # all equal
        torch.cat([torch.tensor([2.0, -1.0]), torch.full((V - 2,), NEG)])[:V],  # fewer finite than k
        torch.linspace(-8, 8, V),  # ascending: every tile beats the running top-k
        torch.where(torch.rand(V, generator=g) < 0.5, -0.0, 0.0),  # -0.0 and +0.0 tie
        torch.linspace(0, -8, V).index_add_(  # decreasing, with a burst of large logits in a few ids
            0, torch.arange(V // 3, V // 3 + max(1, V // 12)), 20 + torch.rand(max(1, V // 12), generator=g)
        ),
    ]
    return torch.stack(rows if kinds is None else [rows[i] for i in kinds]).to(dtype)


# --------------------------------------------------------------------------------------------- twin
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V,k", [(7, 3), (7, 16), (100, 1), (1000, 8), (4096, 64), (5000, 256)])
def test_twin_matches_reference_small(V, k, dtype):
    x = make_rows(V, dtype, seed=V + k)
    for temperature, codec, chunk in [(1.0, "log8", 1 << 21), (0.7, "e4m3", 3 * V), (2.0, "fp16", V)]:
        out = extract_topk_torch(x, k, temperature=temperature, codec=codec, chunk_elems=chunk)
        check_against_reference(out, x, k, temperature, codec)


@pytest.mark.parametrize("V", [131072, 262144])
def test_twin_matches_reference_large_vocab(V):
    g = torch.Generator().manual_seed(V)
    x = (torch.randn(3, V, generator=g) * 4).to(torch.bfloat16)  # bf16: many ties among the top-k
    x[1, torch.rand(V, generator=g) < 0.3] = NEG
    x[2, 1000] = 40.0  # one dominant token: the tail is ~1e-12, where 1 - sum(kept) would read 0
    for k, codec in [(64, "log8"), (256, "e5m2")]:
        out = extract_topk_torch(x, k, codec=codec, chunk_elems=2 * V)  # two chunks
        check_against_reference(out, x, k, 1.0, codec)
    assert 0 < out.tail[2] < 1e-9


def test_reconstruction_error_is_the_codec_error():
    """p_i = (1 - tail) w_i / sum(w) recovers the kept probabilities within the log8 step."""
    from labelstore.reconstruction import reconstruct

    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 32000, generator=g) * 2.5
    out = extract_topk_torch(x, 32)
    w = get_codec("log8").decode(out.values).numpy()
    p_hat = torch.from_numpy(reconstruct(w, out.tail.numpy())).double()
    ref = reference(x, 32)
    p_true = torch.softmax(x.double(), -1).gather(1, ref["ids"])
    # decoded weights err by <= exp(step/2); normalising by their sum can double it
    assert torch.all((p_hat / p_true - 1).abs() <= math.exp(2 * (1 / 32)) - 1 + 1e-5)


def test_twin_handles_odd_shapes_and_edge_arguments():
    x = torch.randn(5, 10)
    out = extract_topk_torch(x, 50)  # k > V is clipped to V
    assert out.ids.shape == (5, 10) and torch.all(out.tail == 0)
    empty = extract_topk_torch(torch.empty(0, 10), 4)
    assert empty.ids.shape == (0, 4) and empty.tail.shape == (0,)
    strided = torch.randn(10, 40)[::2, ::2]  # non-contiguous input
    check_against_reference(extract_topk_torch(strided, 5), strided, 5, 1.0, "log8")
    with pytest.raises(ValueError, match="k must be"):
        extract_topk_torch(x, 0)
    with pytest.raises(ValueError, match="temperature"):
        extract_topk_torch(x, 2, temperature=0.0)
    with pytest.raises(TypeError, match="dtype"):
        extract_topk_torch(x.long(), 2)
    with pytest.raises(ValueError, match="2-D"):
        extract_topk_torch(x[0], 2)
    with pytest.raises(ValueError, match="unknown value codec"):
        extract_topk_torch(x, 2, codec="int4")


def test_hard_labels():
    x = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.0, 0.0, 0.0, 0.0], [NEG, 5.0, NEG, NEG]])
    out = extract_hard_labels(x, temperature=0.5)
    assert out.ids.flatten().tolist() == [1, 0, 1]
    assert out.values.shape == (3, 0) and out.counts.tolist() == [1, 1, 1]
    ref = reference(x, 1, 0.5)
    torch.testing.assert_close(out.tail.double(), ref["tail"], rtol=2e-5, atol=1e-30)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning", "ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_invalid_rows_raise_naming_the_rows(backend):
    x = torch.randn(9, 300)
    x[2, 17] = float("nan")
    x[5, 3] = float("inf")
    x[7] = NEG
    with pytest.raises(InvalidLogitsError) as err:
        extract_topk(x, 4, backend=backend)
    assert err.value.rows == [2, 5, 7]
    msg = str(err.value)
    assert "row 2: NaN" in msg and "row 5: +inf" in msg and "row 7: no finite entry" in msg


# --------------------------------------------------------------------------------------------- kernel
@pytest.fixture(scope="module")
def xt():
    """The Triton module in interpreter mode (reloaded if something imported it before the env was set)."""
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    import labelstore_kernels.extract_triton as mod

    if not isinstance(mod._extract_topk_kernel, InterpretedFunction):
        mod = importlib.reload(mod)
    return mod


def assert_kernel_matches_twin(got: Extracted, want: Extracted, codec: str):
    assert torch.equal(got.ids, want.ids)
    assert torch.equal(got.counts, want.counts)
    torch.testing.assert_close(got.tail, want.tail, rtol=2e-5, atol=1e-30)
    torch.testing.assert_close(got.lse, want.lse, rtol=2e-6, atol=2e-5)
    if codec == "fp16":  # compare the 16-bit words: ordinal order == value order for positive halfs
        a = got.values.contiguous().view(torch.int16).int() & 0xFFFF
        b = want.values.contiguous().view(torch.int16).int() & 0xFFFF
    else:
        a, b = got.values.int(), want.values.int()
    if a.numel():
        assert (a - b).abs().max().item() <= 1


KERNEL_CASES = [  # (V, k, dtype, temperature, codec): every V x k pair; codecs, dtypes, T cycle through
    (V, k, dt, t, c)
    for i, (V, k) in enumerate([(V, k) for V in (7, 100, 1000, 4096) for k in (1, 3, 8, 16)])
    for dt, t, c in [
        [
            (torch.float32, 1.0, "log8"),
            (torch.bfloat16, 0.7, "e4m3"),
            (torch.float16, 1.5, "fp16"),
            (torch.bfloat16, 1.0, "e5m2"),
            (torch.float32, 0.5, "none"),
        ][i % 5]
    ]
]


@pytest.mark.parametrize("V,k,dtype,temperature,codec", KERNEL_CASES)
def test_kernel_matches_twin_interpreter(xt, V, k, dtype, temperature, codec):
    i = KERNEL_CASES.index((V, k, dtype, temperature, codec))
    x = make_rows(V, dtype, seed=7 * V + k, kinds=[(i + j) % 8 for j in range(5)])  # 5 of the 8 kinds
    kp = max(2, 1 << max(0, (min(k, V) - 1).bit_length()))
    block_v = max(2 * kp, 64, 1 << max(0, (V - 1).bit_length() - 2))  # ~4 tiles: flushes, thinning
    got = xt.extract_topk_triton(x, k, temperature=temperature, codec=codec, block_v=block_v)
    want = extract_topk_torch(x, k, temperature=temperature, codec=codec)
    assert_kernel_matches_twin(got, want, codec)
    check_against_reference(got, x, k, temperature, codec)


def test_kernel_tiny_tail_and_default_tiling(xt):
    """A dominant logit (tail ~1e-13) and the default tile choice, one tile per row."""
    x = torch.randn(3, 1000) * 0.5
    x[:, 123] = 30.0
    got = xt.extract_topk_triton(x, 5)
    check_against_reference(got, x, 5, 1.0, "log8")
    assert torch.all((got.tail > 0) & (got.tail < 1e-9))


def test_fp8_integer_encoder_matches_torch(xt):
    """The kernel's integer float8 rounding (no fp8 casts) equals torch's cast on every boundary."""
    import triton
    import triton.language as tl

    global _XT  # the interpreter resolves a kernel's names in its module globals
    _XT = xt

    @triton.jit
    def probe(W, OUT, n, MBITS: tl.constexpr, EBIAS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        w = tl.load(W + offs, mask=offs < n, other=0.0)
        tl.store(OUT + offs, _XT._fp8_code(w, MBITS, EBIAS), mask=offs < n)

    for dt, mbits, ebias, vmax in [(torch.float8_e4m3fn, 3, 7, 448.0), (torch.float8_e5m2, 2, 15, 57344.0)]:
        grid = torch.arange(256, dtype=torch.uint8).view(dt).float()
        grid = grid[torch.isfinite(grid) & (grid >= 0) & (grid <= vmax)].unique()
        mids = (grid[1:] + grid[:-1]) / 2  # exact ties: round half to even
        near = torch.cat([mids, grid]).double()
        w = torch.cat(
            [
                near,
                torch.nextafter(near, torch.tensor(math.inf, dtype=torch.float64)),
                torch.nextafter(near, torch.tensor(0.0, dtype=torch.float64)),
                torch.rand(3000, dtype=torch.float64) * vmax,
                torch.exp(-torch.rand(3000, dtype=torch.float64) * 30) * vmax,
                torch.tensor([0.0, 1e-45, 1e-30, vmax]),
            ]
        ).float()
        w = w.clamp(0, vmax)
        out = torch.empty_like(w, dtype=torch.int32)
        probe[(triton.cdiv(w.numel(), 1024),)](w, out, w.numel(), MBITS=mbits, EBIAS=ebias, BLOCK=1024)
        want = w.to(dt).view(torch.uint8).int()
        bad = (out != want).nonzero().flatten()
        assert bad.numel() == 0, (dt, w[bad[:5]].tolist(), out[bad[:5]].tolist(), want[bad[:5]].tolist())


def test_kernel_rejects_bad_arguments(xt):
    x = torch.randn(2, 600)
    with pytest.raises(ValueError, match="k <= 256"):
        xt.extract_topk_triton(x, 300)
    with pytest.raises(ValueError, match="block_v"):
        xt.extract_topk_triton(x, 8, block_v=8)


# --------------------------------------------------------------------------------------------- dispatch
def test_dispatch_and_env_override(monkeypatch):
    calls = []
    monkeypatch.setattr(lk, "extract_topk_torch", lambda *a, **kw: calls.append("torch"))
    monkeypatch.setattr(lk, "extract_topk_triton", lambda *a, **kw: calls.append("triton"))
    x = torch.randn(2, 10)
    monkeypatch.delenv(lk.BACKEND_ENV, raising=False)
    extract_topk(x, 2)  # CPU tensor: the twin
    monkeypatch.setenv(lk.BACKEND_ENV, "triton")  # forced; allowed on CPU under TRITON_INTERPRET=1
    extract_topk(x, 2)
    extract_topk(x, 2, backend="torch")  # the argument wins over the environment
    assert calls == ["torch", "triton", "torch"]
    monkeypatch.setenv(lk.BACKEND_ENV, "cuda-magic")
    with pytest.raises(ValueError, match="unknown extraction backend"):
        extract_topk(x, 2)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        extract_topk(x, 2, backend="triton")
