"""Several stores as one dataset: items equal the parts' own, refusals name the field, weights are honoured."""

import numpy as np
import pytest
import torch
from store_factory import make_meta, random_rows, write_rows

from labelstore import StoreDataset, StoreLoader
from labelstore.errors import ConfigMismatchError
from labelstore.store.writer import StoreWriter
from labelstore.student.mixture import StoreMixture


def build(path, n, seed, **meta):
    with StoreWriter(path, make_meta(**meta), shard_bytes=800) as w:
        write_rows(w, random_rows(n, seed=seed, max_len=12, k=meta.get("k", 8)))
    return path


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    base = tmp_path_factory.mktemp("mix")
    return [build(base / "a", 7, 1), build(base / "b", 5, 2), build(base / "c", 3, 3)]


def same(x, y):
    assert x.keys() == y.keys()
    for key in x:
        np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)


def test_concatenation_yields_every_item_of_every_part_in_order(parts):
    mix = StoreMixture(parts)
    singles = [StoreDataset(p) for p in parts]
    assert len(mix) == 7 + 5 + 3
    expect = [(j, r) for j, d in enumerate(singles) for r in range(len(d))]
    for i, (j, r) in enumerate(expect):
        got = mix[i]
        assert got.pop("store_index") == j
        same(got, singles[j][r])
    with pytest.raises(IndexError):
        mix[len(mix)]


def test_parts_that_disagree_are_refused_naming_the_field(parts, tmp_path):
    other_vocab = build(tmp_path / "v", 2, 4, vocab_size=2000)
    with pytest.raises(ConfigMismatchError, match=r"vocab_size = 2000 .* has 1000"):
        StoreMixture([parts[0], other_vocab])
    other_teacher = build(tmp_path / "t", 2, 5, teacher={"name": "x", "hash": "f" * 16})
    with pytest.raises(ConfigMismatchError, match=r"teacher\.hash"):
        StoreMixture([parts[0], other_teacher])
    other_k = build(tmp_path / "k", 2, 6, k=4)
    with pytest.raises(ConfigMismatchError, match=r"selection\.k"):
        StoreMixture([parts[0], other_k])


def test_weights_set_each_parts_share_of_an_epoch(parts):
    mix = StoreMixture(parts, weights=[1, 1, 2], seed=3)
    total = 15
    assert len(mix) == total and mix.counts.tolist() == [4, 4, 7]  # 3.75, 3.75, 7.5 -> largest remainders
    drawn = [mix.locate(i) for i in range(len(mix))]
    for j, size in enumerate((7, 5, 3)):
        rows = [r for p, r in drawn if p == j]
        assert len(rows) == mix.counts[j]
        # a part drawn more often than its size cycles through a permutation: each row at most ceil(n / size)
        assert max(np.bincount(rows, minlength=size)) <= -(-len(rows) // size)
        if len(rows) >= size:  # every row of the part, before any repeats
            assert set(rows) == set(range(size))
        else:  # a sample of the part without repeats
            assert len(set(rows)) == len(rows)
    assert [StoreMixture(parts, weights=[1, 1, 2], seed=3).locate(i) for i in range(total)] == drawn
    assert [StoreMixture(parts, weights=[1, 1, 2], seed=4).locate(i) for i in range(total)] != drawn
    with pytest.raises(ValueError, match="non-negative"):
        StoreMixture(parts, weights=[1, -1, 1])


def test_a_loader_trains_over_the_mixture_and_resumes(parts):
    mix = StoreMixture(parts)
    loader = StoreLoader(mix, batch_size=4, seed=0, rank=0, world_size=1)
    batches = list(loader)
    assert sum(int(b["input_ids"].shape[0]) for b in batches) == len(mix)
    loader2 = StoreLoader(mix, batch_size=4, seed=0, rank=0, world_size=1)
    it = iter(loader2)
    next(it)
    state = loader2.state_dict()
    loader3 = StoreLoader(mix, batch_size=4, seed=0, rank=0, world_size=1)
    loader3.load_state_dict(state)
    rest = list(loader3)
    for a, b in zip(rest, batches[1:]):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["teacher_probs"], b["teacher_probs"])
