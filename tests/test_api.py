"""The public API: top-level names, the version, a cheap import, and the CLI generated from CompileOptions."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import subprocess
import sys

import pytest

import labelstore
from labelstore.teacher.options import CompileOptions


def test_every_public_name_resolves_to_its_module():
    for name in labelstore.__all__:
        value = getattr(labelstore, name)
        if name != "__version__":
            assert value is getattr(importlib.import_module(labelstore._EXPORTS[name]), name)
    from labelstore import (  # the README's import line
        CompileOptions as CO,
    )
    from labelstore import (
        LabelStore,
        LabelStoreError,
        StoreDataset,
        StoreLoader,
        compile_store,
        distillation_loss,
    )
    from labelstore.errors import LabelStoreError as Base
    from labelstore.store.reader import LabelStore as Reader

    assert LabelStore is Reader and LabelStoreError is Base and CO is CompileOptions
    assert callable(compile_store) and callable(distillation_loss) and StoreDataset and StoreLoader
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        labelstore.NoSuchThing  # noqa: B018


def test_version_is_the_installed_distribution_version():
    assert labelstore.__version__ == importlib.metadata.version("labelstore")


def test_import_labelstore_is_cheap():
    """`import labelstore` imports neither torch nor transformers (public names load on first use)."""
    code = "import sys, labelstore; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _parse(argv):
    parser = argparse.ArgumentParser()
    CompileOptions.add_arguments(parser)
    return CompileOptions.from_args(parser.parse_args(argv))


REQUIRED = ["--teacher", "T", "--data", "a.txt", "b.txt", "--out", "S"]


def test_cli_defaults_are_the_dataclass_defaults():
    assert _parse(REQUIRED) == CompileOptions(teacher="T", data=["a.txt", "b.txt"], out="S")


def test_every_option_has_a_flag_that_sets_it():
    """Each field is reachable from the command line and lands in the field of the same name."""
    argv = REQUIRED + ["--tokenizer", "tok", "--k", "7", "--max-k", "21", "--selection", "topp", "--top-p", "0.5",
                       "--min-k", "2",
                       "--samples", "9", "--k-exact", "3", "--seed", "4", "--temperature", "2.5", "--codec", "e4m3",
                       "--max-length", "99", "--truncate", "--text-field", "body", "--token-field", "ids",
                       "--max-samples", "5", "--hard-labels", "--no-tail-prior", "--tokens-per-batch", "77",
                       "--dtype", "float16", "--device", "cpu", "--shard-mb", "1.5", "--encoding", "zstd",
                       "--trust-remote-code", "--quiet", "--assistant-only", "--chat-template", "t.jinja",
                       "--text-glob", "*.py", "--split", "train", "--streaming", "--overwrite",
                       "--lm-head", "fused", "--head-dtype", "float32", "--mask-vocab-padding", "--device-map", "auto",
                       "--tp-size", "2", "--plan", "units", "--log8-step", "0.25"]
    got = _parse(argv)
    default = CompileOptions(teacher="T", data=["a.txt", "b.txt"], out="S")
    changed = {f.name for f in dataclasses.fields(CompileOptions)
               if getattr(got, f.name) != getattr(default, f.name)}
    unchanged = {f.name for f in dataclasses.fields(CompileOptions)} - changed - {"teacher", "data", "out"}
    assert not unchanged, f"options the CLI could not set: {unchanged}"
    assert (got.k, got.top_p, got.pack, got.tail_prior, got.progress, got.max_samples) == (7, 0.5, False, False,
                                                                                          False, 5)
    assert got.plan == "units" and got.max_k == 21


def test_adaptive_k_is_the_mean_and_max_k_defaults_to_four_times_it():
    opts = _parse(REQUIRED + ["--selection", "adaptive", "--k", "32"])
    opts.validate()
    assert opts.selection_meta(100_000) == {"mode": "adaptive", "k": 128, "mean_k": 32}
    assert opts.selection_meta(100) == {"mode": "adaptive", "k": 100, "mean_k": 32}  # clipped to the vocabulary
    assert _parse(REQUIRED + ["--selection", "adaptive", "--k", "2000"]).selection_meta(10**6)["k"] == 4096
    assert _parse(REQUIRED + ["--selection", "adaptive"]).selection_meta(10**6) == \
        {"mode": "adaptive", "k": 128, "mean_k": 32}
    assert opts.uses_tail_prior
    with pytest.raises(ValueError, match=r"--k 40 \(the mean entries per position\) must be at most --max-k"):
        _parse(REQUIRED + ["--selection", "adaptive", "--k", "40", "--max-k", "20"]).validate()
    with pytest.raises(ValueError, match="--max-k sizes --selection adaptive stores only"):
        _parse(REQUIRED + ["--selection", "topk", "--max-k", "20"]).validate()


def test_pack_and_truncate_are_exclusive():
    with pytest.raises(SystemExit):
        _parse(REQUIRED + ["--pack", "--truncate"])


def test_the_default_selection_is_sixteen_draws_and_k_needs_topk():
    """The compile default follows the student benchmark (README 'Defaults, from this table')."""
    opts = _parse(REQUIRED)
    assert (opts.selection, opts.samples, opts.codec_name) == ("sample", 16, "count8")
    assert opts.selection_meta(1000) == {"mode": "sample", "k": 16, "samples": 16}
    assert not opts.uses_tail_prior  # a sampled store has no tail to spread
    # --k alone used to size the default top-k store: refused with what to pass, never silently ignored
    with pytest.raises(ValueError, match=r"--k 32 sizes --selection topk, topp and adaptive stores.*--selection topk"):
        _parse(REQUIRED + ["--k", "32"]).validate()
    with pytest.raises(ValueError, match="--k 8 sizes"):
        CompileOptions(teacher="T", data=["a"], out="S", selection="topk+sample", k=8).validate()
    topk = _parse(REQUIRED + ["--selection", "topk", "--k", "8"])
    topk.validate()
    assert topk.selection_meta(1000) == {"mode": "topk", "k": 8} and topk.codec_name == "log8"
    assert _parse(REQUIRED + ["--selection", "topk"]).selection_meta(1000) == {"mode": "topk", "k": 32}
    assert _parse(REQUIRED + ["--selection", "topp"]).selection_meta(1000)["k"] == 32
    # --hard-labels alone stores the argmax; with an explicit other selection it is refused as before
    hard = _parse(REQUIRED + ["--hard-labels"])
    hard.validate()
    assert hard.selection_meta(1000) == {"mode": "argmax", "k": 1} and hard.codec_name == "none"
    with pytest.raises(ValueError, match="--hard-labels stores the argmax only"):
        _parse(REQUIRED + ["--hard-labels", "--selection", "sample"]).validate()
    # dataclasses.replace (used by the compile) keeps the resolved settings
    assert dataclasses.replace(topk, max_length=7).selection_meta(1000) == {"mode": "topk", "k": 8}
