"""The fused LM-head Triton kernel against its pure-torch twin, in the Triton interpreter at small shapes.

Reference: :func:`labelstore_kernels.extract_fused_torch` (row blocks of materialised logits + the twin
extraction), itself checked against ``model(...).logits`` in tests/teacher/test_fused_head.py. Tolerances of
issue 14: identical ids and counts (no near-ties in these random logits), value codes within one step, tails
within 1e-5 relative.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402

from labelstore.errors import InvalidLogitsError  # noqa: E402
from labelstore_kernels import LMHead, extract_fused, extract_fused_torch  # noqa: E402

pytest.importorskip("triton")


def _head(V=300, D=24, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return LMHead(torch.randn(V, D, generator=g) * 0.5, **kw), torch.randn(16, D, generator=g)


@pytest.mark.parametrize("case", ["bias+scale+softcap+mask", "argmax"])
def test_fused_triton_kernel_equals_the_twin(case):
    bias = torch.randn(300, generator=torch.Generator().manual_seed(3)) * 0.2
    kw = {"argmax": {}, "bias+scale+softcap+mask": dict(bias=bias, scale=0.8, softcap=2.5,
                                                                     valid_vocab=290)}[case]
    head, h = _head(**kw)
    sel, codec = ({"mode": "argmax", "k": 1}, "none") if case == "argmax" else ({"mode": "topk", "k": 6}, "log8")
    a = extract_fused(h, head, sel, codec=codec, temperature=0.9, backend="triton")
    r = extract_fused_torch(h, head, sel, codec=codec, temperature=0.9)
    assert torch.equal(a.ids, r.ids) and torch.equal(a.counts, r.counts)
    assert (a.values.int() - r.values.int()).abs().max() <= 1 if a.values.numel() else True
    torch.testing.assert_close(a.tail, r.tail, rtol=1e-5, atol=0)
    torch.testing.assert_close(a.lse, r.lse, rtol=1e-6, atol=1e-5)


def test_fused_triton_kernel_names_a_nan_row_and_refuses_other_modes():
    head, h = _head()
    h[5, 3] = float("nan")
    with pytest.raises(InvalidLogitsError, match="row 5: NaN"):
        extract_fused(h, head, {"mode": "topk", "k": 4}, backend="triton")
    with pytest.raises(ValueError, match="topk and argmax"):
        extract_fused(h, head, {"mode": "sample", "k": 4, "samples": 4}, codec="count8", backend="triton")
