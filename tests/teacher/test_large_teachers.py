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
                         "--k", "8", "--max-length", "32", "--tokens-per-batch", "64", "--device", "cpu", "--quiet",
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
