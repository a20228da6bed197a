"""DistillKit's layout: `labelstore export --to distillkit` decoded by DistillKit's own decompression code, and
`labelstore import` of captures compressed by DistillKit's own compressor (its code is vendored in tests/_vendor)."""

import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from store_factory import make_meta, write_rows

from labelstore.cli import main
from labelstore.errors import ConfigMismatchError
from labelstore.store.writer import StoreWriter
from labelstore.student.dataset import StoreDataset
from labelstore.student.distillkit import DISTILLKIT_SCHEMA, decompress_logprobs, export_distillkit, import_distillkit

pytest.importorskip("pydantic")  # DistillKit's config classes; a dependency of the test only
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_vendor"))
from distillkit.compression.bitpack import pack_to_bytes, unpack_from_bytes  # noqa: E402
from distillkit.compression.config import DistributionQuantizationConfig  # noqa: E402
from distillkit.compression.monotonic_logprobs import (  # noqa: E402
    compress_monotonic_logprobs,
    decompress_monotonic_logprobs,
)

V, K = 300, 6


def topk_store(path, n=9, seed=0, k=K, selection=None):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        T = int(rng.integers(0, 20))
        counts = np.full(T, k) if selection is None else rng.integers(1, k + 1, size=T)
        rows.append({"sample_id": i, "input_ids": rng.integers(0, V, size=T), "counts": counts,
                     "ids": np.concatenate([rng.choice(V, c, replace=False) for c in counts]) if T else np.zeros(0),
                     "values": rng.integers(0, 120, size=int(counts.sum())).astype(np.uint8),
                     "tail": (rng.random(T) * 0.4).astype(np.float32), "doc_starts": np.zeros(1, np.int32)})
    meta = make_meta(V, k, **({"selection": selection} if selection else {}))
    with StoreWriter(path, meta) as w:
        write_rows(w, rows)
    return path


def distillkit_decode(directory):
    """What DistillKit's LogprobCompressor.decompress_to_sparse does, with its own functions, row by row."""
    cfg = DistributionQuantizationConfig.model_validate(yaml.safe_load((directory / "compression_config.yaml")
                                                                        .read_text()))
    bits = int(torch.log2(torch.tensor(cfg.d, dtype=torch.float32)).ceil().item())
    out = []
    for row in pq.read_table(directory / "data-00000.parquet").to_pylist():
        lp = decompress_monotonic_logprobs(torch.tensor(row["compressed_logprobs"], dtype=torch.uint8)
                                           .reshape(len(row["compressed_logprobs"]), -1), cfg)
        ids = unpack_from_bytes(torch.tensor(row["bytepacked_indices"], dtype=torch.uint8)
                                .reshape(len(row["bytepacked_indices"]), -1), bits, original_num_elements=cfg.k)
        out.append((row["input_ids"], ids.numpy(), lp.double().numpy()))
    return out


def test_export_decodes_with_distillkit_code(tmp_path):
    store = topk_store(tmp_path / "s")
    res = export_distillkit(store, tmp_path / "dk")
    assert res["rows"] == 9
    ds = StoreDataset(store)
    decoded = distillkit_decode(tmp_path / "dk")
    for i, (x, ids, lp) in enumerate(decoded):
        it = ds[i]
        T = len(it["input_ids"])
        assert x == it["input_ids"].tolist() and ids.shape == (max(T - 1, 0), K)
        for t in range(T - 1):  # the last position has no DistillKit row
            order = np.argsort(-it["teacher_probs"][t], kind="stable")
            np.testing.assert_array_equal(ids[t], it["teacher_ids"][t][order])
            np.testing.assert_allclose(np.exp(lp[t]), it["teacher_probs"][t][order], rtol=1e-6)
            assert 1 - np.exp(lp[t]).sum() == pytest.approx(it["teacher_tail"][t], abs=1e-6)
    with pytest.raises(ConfigMismatchError, match="--to parquet"):
        export_distillkit(topk_store(tmp_path / "p", selection={"mode": "topp", "k": K, "p": 0.9, "min_k": 1}),
                          tmp_path / "dk2")


def distillkit_capture(directory, cfg: dict, n=5, seed=0):
    """A capture as DistillKit's sampler writes it: top-k log-probs of a random teacher, compressed by its code."""
    config = DistributionQuantizationConfig.model_validate(cfg)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        L = int(torch.randint(2, 12, (1,), generator=g))
        logp = torch.log_softmax(torch.randn(L - 1, cfg["d"], generator=g, dtype=torch.float64) * 3, -1)
        values, indices = logp.float().topk(cfg["k"], dim=-1)
        bits = int(torch.log2(torch.tensor(cfg["d"], dtype=torch.float32)).ceil().item())
        rows.append({"input_ids": torch.randint(0, cfg["d"], (L,), generator=g).tolist(),
                     "compressed_logprobs": compress_monotonic_logprobs(values[None], config)[0].tolist(),
                     "bytepacked_indices": pack_to_bytes(indices[None], bits)[0].tolist()})
    directory.mkdir()
    (directory / "compression_config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    pq.write_table(pa.Table.from_pylist(rows, schema=DISTILLKIT_SCHEMA), directory / "data-00000.parquet")
    return directory


@pytest.mark.parametrize("cfg", [
    # DistillKit's recommended setting (smaller k) and a setting with deltas and 4-bit residual bins
    {"d": V, "k": 24, "exact_k": 4, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, 2, 3, 4, "sqrt"],
     "term_dtype": "float32", "residual_bins": [], "delta_encoding": False, "error_diffusion": False},
    {"d": V, "k": 12, "exact_k": 2, "exact_dtype": "float32", "polynomial_terms": [0, 1, "sqrt"],
     "term_dtype": "float32", "residual_bins": [{"scale_dtype": "float16", "element_bits": 4, "num_elements": 6},
                                                {"scale_dtype": "bfloat16", "element_bits": 1, "num_elements": 3}],
     "delta_encoding": True, "error_diffusion": False},
])
def test_import_of_a_distillkit_capture(tmp_path, cfg):
    src = distillkit_capture(tmp_path / "dk", cfg)
    theirs = distillkit_decode(src)
    config = yaml.safe_load((src / "compression_config.yaml").read_text())
    raw = pq.read_table(src / "data-00000.parquet").to_pylist()
    for row, (_, _, lp) in zip(raw, theirs):  # our decoder against theirs, on their bytes
        ours = decompress_logprobs(np.array(row["compressed_logprobs"], np.uint8), config)
        np.testing.assert_allclose(ours, lp, rtol=1e-5, atol=1e-5)
    assert main(["import", str(src), str(tmp_path / "store"), "--codec", "fp16"]) == 0
    ds = StoreDataset(tmp_path / "store")
    for i, (x, ids, lp) in enumerate(theirs):
        it = ds[i]
        assert it["input_ids"].tolist() == x
        assert not it["position_mask"][-1] and it["position_mask"][:-1].all()
        order = np.argsort(-lp, axis=1, kind="stable")
        np.testing.assert_array_equal(it["teacher_ids"][:-1], np.take_along_axis(ids, order, 1))
        p = np.exp(np.take_along_axis(lp, order, 1))
        np.testing.assert_allclose(it["teacher_probs"][:-1], p, rtol=2e-3, atol=1e-7)  # fp16 values
        np.testing.assert_allclose(it["teacher_tail"][:-1], np.maximum(0, 1 - p.sum(1)), atol=1e-5)


def test_store_distillkit_store_round_trip(tmp_path):
    store = topk_store(tmp_path / "s", seed=3)
    assert main(["export", str(store), str(tmp_path / "dk"), "--to", "distillkit"]) == 0
    import_distillkit(tmp_path / "dk", tmp_path / "back")
    a, b = StoreDataset(store), StoreDataset(tmp_path / "back")
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        n = len(x["input_ids"]) - 1
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
        order = np.argsort(-x["teacher_probs"][:n], axis=1, kind="stable")
        np.testing.assert_array_equal(np.take_along_axis(x["teacher_ids"][:n], order, 1), y["teacher_ids"][:n])
        np.testing.assert_allclose(np.take_along_axis(x["teacher_probs"][:n], order, 1), y["teacher_probs"][:n],
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(x["teacher_tail"][:n], y["teacher_tail"][:n], atol=2e-6)
