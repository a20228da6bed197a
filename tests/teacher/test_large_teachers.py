"""Teachers larger than one device: ``--device-map auto`` (accelerate's placement), checked on CPU."""

from __future__ import annotations

import numpy as np
import pytest
from _teachers import make_documents, make_tokenizer, raw_store_rows, save_teacher, write_corpus

from labelstore.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("large")
    tok = make_tokenizer()
    write_corpus(base / "corpus", make_documents(8, seed=6))
    return {"teacher": save_teacher(base / "llama", "llama", tok), "corpus": base / "corpus"}


def test_device_map_auto_store_equals_the_plain_store(env, tmp_path):
    stores = {}
    for name, extra in (("plain", []), ("mapped", ["--device-map", "auto"])):
        out = tmp_path / name
        assert cli_main(["compile", "--teacher", str(env["teacher"]), "--data", str(env["corpus"]), "--out", str(out),
                         "--selection", "topk", "--k", "8",
                         "--max-length", "32", "--tokens-per-batch", "64", "--device", "cpu", "--quiet",
                         *extra]) == 0
        stores[name] = raw_store_rows(out)
    a, b = stores["plain"], stores["mapped"]
    assert sorted(a) == sorted(b) and len(a) > 2
    for sid in a:
        np.testing.assert_array_equal(a[sid]["counts"], b[sid]["counts"])
        np.testing.assert_array_equal(a[sid]["ids"], b[sid]["ids"])
        assert np.abs(a[sid]["values"].astype(int) - b[sid]["values"].astype(int)).max() <= 1
        np.testing.assert_allclose(a[sid]["tail"], b[sid]["tail"], rtol=1e-5)


def test_device_map_is_refused_under_torchrun(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "s"
    assert cli_main(["compile", "--teacher", str(env["teacher"]), "--data", str(env["corpus"]), "--out", str(out),
                     "--device-map", "auto", "--device", "cpu", "--quiet"]) == 1
    assert "--device-map auto places one teacher" in capsys.readouterr().err
    assert not out.exists()


def test_device_map_reaches_from_pretrained(env, monkeypatch):
    """The flag is handed to from_pretrained (accelerate's placement); on a CPU-only machine that map has one
    device, so transformers dispatches no hooks: the multi-GPU placement itself is accelerate's, untested here."""
    import torch
    from transformers import AutoModelForCausalLM

    from labelstore.teacher.model import input_device, load_teacher

    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model = load_teacher(str(env["teacher"]), torch.float32, torch.device("meta"), device_map="auto")
    assert seen["device_map"] == "auto"
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # placed by the map, not by .to(meta)
    assert input_device(model, torch.device("meta")).type == "cpu"


def test_tp_size_2_under_torchrun_equals_one_process(env, tmp_path):
    """2 gloo ranks on CPU = one tensor-parallel group (transformers' tp_plan="auto"): its leader writes a store
    equal to the 1-process store within the issue's tolerances; the follower writes nothing."""
    import os
    import subprocess
    import sys

    from labelstore.store.reader import LabelStore

    common = ["compile", "--teacher", str(env["teacher"]), "--data", str(env["corpus"]),
              "--selection", "topk", "--k", "8",
              "--max-length", "32", "--tokens-per-batch", "64", "--device", "cpu", "--quiet"]
    assert cli_main([*common, "--out", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "labelstore",
           *common, "--out", str(tmp_path / "tp"), "--tp-size", "2"]
    p = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # the head really is sharded: the fused path declines it (rank 0 says why, once), model(...).logits is used
    assert p.stderr.count("materialised logits (no fused LM head)") == 1, p.stderr[-3000:]
    assert {s.name[:6] for s in (tmp_path / "tp" / "shards").iterdir()} == {"r00000"}  # one group, one writer
    a, b = raw_store_rows(tmp_path / "one"), raw_store_rows(tmp_path / "tp")
    assert sorted(a) == sorted(b) and len(a) > 2
    for sid in a:
        np.testing.assert_array_equal(a[sid]["counts"], b[sid]["counts"])
        np.testing.assert_array_equal(a[sid]["ids"], b[sid]["ids"])
        assert np.abs(a[sid]["values"].astype(int) - b[sid]["values"].astype(int)).max() <= 1
        np.testing.assert_allclose(a[sid]["tail"], b[sid]["tail"], rtol=1e-5)
    s1, s2 = LabelStore(tmp_path / "one"), LabelStore(tmp_path / "tp")
    assert s1.meta["teacher"]["hash"] == s2.meta["teacher"]["hash"]  # the sharded teacher is the same teacher
    np.testing.assert_allclose(s1.tail_prior(), s2.tail_prior(), rtol=1e-5, atol=1e-12)
