"""Installing labelstore must not make transformers mistake our kernels for Hugging Face's ``kernels`` package.

The repository folder ``kernels/`` is installed as ``labelstore_kernels``. transformers probes
``importlib.util.find_spec("kernels")`` (``is_kernels_available``) and, when it finds a package, imports hub
kernels from it. Each check runs in a fresh interpreter: once from a directory outside the repository (what
users get), once from the repository root, where ``kernels/`` itself is importable as ``kernels``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib.metadata, importlib.util, json, sys, tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils.import_utils import is_kernels_available

import labelstore_kernels

spec = importlib.util.find_spec("kernels")
try:
    hf_kernels_version = importlib.metadata.version("kernels")
except importlib.metadata.PackageNotFoundError:
    hf_kernels_version = None

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
with tempfile.TemporaryDirectory() as d:
    LlamaForCausalLM(cfg).save_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    model.eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 96, (2, 9))).logits

out = labelstore_kernels.extract_topk(logits.reshape(-1, 96).float(), 8)
print(json.dumps({
    "spec_origin": None if spec is None else (spec.origin or str(list(spec.submodule_search_locations or []))),
    "hf_kernels_version": hf_kernels_version,
    "is_kernels_available": is_kernels_available(),
    "labelstore_kernels": labelstore_kernels.__file__,
    "logits_shape": list(logits.shape),
    "ids_shape": list(out.ids.shape),
    "tail_ok": bool(((out.tail >= 0) & (out.tail <= 1)).all()),
}))
"""


def run_probe(cwd: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(info: dict) -> None:
    assert info["labelstore_kernels"] == str(REPO / "kernels" / "__init__.py")
    if info["hf_kernels_version"] is None:  # Hugging Face's package is not installed here
        assert info["is_kernels_available"] is False
    assert info["logits_shape"] == [2, 9, 96]
    assert info["ids_shape"] == [18, 8] and info["tail_ok"]


def test_outside_the_repo_no_kernels_package_of_ours(tmp_path):
    info = run_probe(tmp_path)
    origin = info["spec_origin"]
    assert origin is None or str(REPO) not in origin, origin
    check(info)


def test_inside_the_repo_transformers_still_says_no(tmp_path):
    # `python -c` puts the working directory first on sys.path: `kernels/` is importable as `kernels` here,
    # and transformers must still not take it for the hub package (no version, so no match).
    check(run_probe(REPO))
