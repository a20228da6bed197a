"""A small run of benchmarks/chaos_compile.py: SIGKILL a compile at three moments, resume, compare.

The full run (>= 20 trials, random and chosen kill moments) is `python benchmarks/chaos_compile.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import chaos_compile  # noqa: E402


def test_sigkill_at_a_rename_mid_shard_and_at_random_then_resume_equals_uninterrupted(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # the sampled mode: a resumed compile must also draw exactly the same samples
        res = chaos_compile.run(3, 1, ["topk+sample"], False, tmp_path, log=lambda *a: None,
                                kinds=["after-replace", "mid-shard", "poll-commit"])
    finally:
        torch.set_num_threads(n)
    rows = res["trials"]
    assert len(rows) == 3
    for r in rows:
        assert r["killed"], r  # chosen kill points inside the compile always land
        assert r["ok"], chaos_compile.format_row(r)
    assert any(r["resumed_samples"] > 0 and r["skipped"] > 0 for r in rows)  # real resumes, not restarts
