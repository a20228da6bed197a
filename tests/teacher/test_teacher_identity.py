"""The teacher's identity covers every weight; stores that recorded the 0.1 identity still resume."""

import json

import numpy as np
import pytest
import torch

import labelstore.teacher.model as model_mod
from labelstore.teacher.model import _weight_checksum, legacy_teacher_fingerprint, teacher_fingerprint
from labelstore.teacher.resume_checks import accept_older_teacher_hash


class Tiny(torch.nn.Module):
    def __init__(self, n=10_000):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(0)))
        self.b = torch.nn.Parameter(torch.tensor([1.5, -2.0, 3.0], dtype=torch.bfloat16))
        self.config = type("Config", (), {"architectures": ["Tiny"]})()


def reference_checksum(t: torch.Tensor) -> tuple[int, int]:
    """The documented sums in numpy uint64 arithmetic (wrapping modulo 2^64), element by element order."""
    bits = t.detach().reshape(-1).numpy().view({2: np.int16, 4: np.int32}[t.element_size()]).astype(np.int64)
    u = bits.astype(np.uint64)
    w = (np.arange(bits.size, dtype=np.uint64) % np.uint64(65521)) + np.uint64(1)
    with np.errstate(over="ignore"):
        return int(u.sum(dtype=np.uint64)), int((u * w).sum(dtype=np.uint64))


def test_checksum_matches_the_definition_for_any_chunking(monkeypatch):
    m = Tiny(50_001)
    want = reference_checksum(m.w)
    assert _weight_checksum(m.w) == want
    monkeypatch.setattr(model_mod, "CHECKSUM_CHUNK", 997)
    assert _weight_checksum(m.w) == want
    assert _weight_checksum(m.b.float()) != _weight_checksum(m.b)  # the bits of the stored dtype


def test_one_changed_weight_changes_the_identity_where_sampling_missed_it():
    a, b = Tiny(), Tiny()
    with torch.no_grad():
        b.w[1] += 1e-3  # the legacy identity samples every 2nd value of 10,000: index 1 is never looked at
    assert legacy_teacher_fingerprint(a) == legacy_teacher_fingerprint(b)
    assert teacher_fingerprint(a) != teacher_fingerprint(b)
    assert teacher_fingerprint(a) == teacher_fingerprint(Tiny())  # deterministic


def test_a_store_with_the_legacy_identity_resumes_only_with_the_same_teacher(tmp_path):
    m = Tiny()
    old = {"format_version": 2, "teacher": {"hash": legacy_teacher_fingerprint(m)}, "compile_config": {}}
    (tmp_path / "config.json").write_text(json.dumps(old))
    meta = {"teacher": {"hash": teacher_fingerprint(m)}}
    accept_older_teacher_hash(tmp_path, meta, m)
    assert meta["teacher"]["hash"] == legacy_teacher_fingerprint(m)  # the store's identity is kept
    other = Tiny()
    with torch.no_grad():
        other.w[0] += 1.0  # sampled by the legacy identity too
    meta = {"teacher": {"hash": teacher_fingerprint(other)}}
    accept_older_teacher_hash(tmp_path, meta, other)
    assert meta["teacher"]["hash"] == teacher_fingerprint(other)  # left as is: the writer refuses the resume


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_depends_on_the_loaded_dtype(dtype):
    a, b = Tiny(), Tiny()
    b.w.data = b.w.data.to(dtype)
    assert (teacher_fingerprint(a) == teacher_fingerprint(b)) == (dtype == torch.float32)
