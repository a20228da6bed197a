"""``shuffle="shards"``: a two-level epoch order (groups of shards, rows within a group) that lets each rank read
its own shards a group at a time, checked against the definition on a real store with many shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from store_factory import make_meta, random_rows, write_rows

from labelstore.errors import ConfigMismatchError
from labelstore.store.writer import StoreWriter
from labelstore.student.dataset import StoreDataset
from labelstore.student.loader import StoreLoader
from labelstore.student.mixture import StoreMixture
from labelstore.student.sampler import StoreSampler


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("shuffle") / "s"
    w = StoreWriter(root, make_meta(), shard_bytes=1500)
    write_rows(w, random_rows(90, seed=2, max_len=30))
    w.close()
    d = StoreDataset(str(root))
    assert d.store.num_shards >= 10
    return d


def shard_of(ds, idx):
    return np.searchsorted(ds.store.shard_starts, idx, side="right") - 1


@pytest.mark.parametrize("world,drop_last", [(1, False), (3, False), (4, True)])
def test_epoch_is_a_permutation_split_in_contiguous_rank_blocks(ds, world, drop_last):
    n = len(ds)
    samplers = [StoreSampler(ds, num_replicas=world, rank=r, shuffle="shards", seed=3, drop_last=drop_last,
                             shard_window=2) for r in range(world)]
    full = samplers[0]._shard_order(0)
    assert sorted(full.tolist()) == list(range(n))  # every row once
    per_rank = [s.epoch_indices() for s in samplers]
    assert len({len(x) for x in per_rank}) == 1
    joined = np.concatenate(per_rank)
    if drop_last:
        np.testing.assert_array_equal(joined, full[: len(joined)])
    else:  # padded with the order's first rows, as DistributedSampler pads
        np.testing.assert_array_equal(joined[:n], full)
        np.testing.assert_array_equal(joined[n:], full[: len(joined) - n])


def test_rows_of_a_group_of_shards_stay_together_and_epochs_differ(ds):
    s = StoreSampler(ds, num_replicas=1, rank=0, shuffle="shards", seed=0, shard_window=3)
    order = s.epoch_indices()
    shards = shard_of(ds, order)
    # walking the order, rows come from one group of (at most) 3 shards at a time, and a group never returns
    groups, current, seen = [], set(), set()
    for sh in shards.tolist():
        if sh in current:
            continue
        assert sh not in seen, f"shard {sh} came back after its group was left"
        if len(current) == 3:
            groups.append(current)
            seen |= current
            current = set()
        current.add(sh)
    groups.append(current)
    assert len(groups) >= 4 and sum(map(len, groups)) == len(set(shards.tolist()))
    assert not np.array_equal(order, StoreSampler(ds, num_replicas=1, rank=0, shuffle="shards", seed=0,
                                                  shard_window=3).epoch_indices(epoch=1))
    again = StoreSampler(ds, num_replicas=1, rank=0, shuffle="shards", seed=0, shard_window=3).epoch_indices()
    np.testing.assert_array_equal(order, again)  # a pure function of seed and epoch


def test_each_rank_reads_about_its_share_of_the_shards(ds):
    S, world = ds.store.num_shards, 4
    for r in range(world):
        idx = StoreSampler(ds, num_replicas=world, rank=r, shuffle="shards", seed=1, shard_window=2).epoch_indices()
        touched = len(set(shard_of(ds, idx).tolist()))
        assert touched <= -(-S // world) + 2  # its block of the order, plus a shard at each edge
    uniform = StoreSampler(ds, num_replicas=world, rank=0, shuffle=True, seed=1).epoch_indices()
    assert len(set(shard_of(ds, uniform).tolist())) > -(-S // world) + 2  # what shuffle=True would touch


def test_loader_resumes_mid_epoch_with_shard_shuffle(ds):
    def run(state=None, stop=None):
        ld = StoreLoader(ds, batch_size=4, shuffle="shards", seed=5, rank=0, world_size=1, shard_window=2)
        if state:
            ld.load_state_dict(state)
        out = []
        for b in ld:
            out.append(b["sample_ids"].clone() if "sample_ids" in b else b["input_ids"].clone())
            if stop is not None and len(out) == stop:
                return out, ld.state_dict()
        return out, None

    full, _ = run()
    head, state = run(stop=3)
    tail, _ = run(state=state)
    assert len(head) + len(tail) == len(full)
    for a, b in zip(head + tail, full):
        assert torch.equal(a, b)
    with pytest.raises(ConfigMismatchError, match="shard_window"):
        StoreLoader(ds, batch_size=4, shuffle="shards", seed=5, rank=0, world_size=1,
                    shard_window=3).load_state_dict(state)


def test_refused_where_shards_do_not_define_the_order(ds):
    with pytest.raises(ValueError, match="one label store"):
        StoreSampler(StoreMixture([ds, ds]), num_replicas=1, rank=0, shuffle="shards")
    with pytest.raises(ValueError, match="shuffle must be"):
        StoreSampler(ds, num_replicas=1, rank=0, shuffle="blocks")


def test_a_rank_builds_only_the_groups_of_its_block(ds, monkeypatch):
    """At the seed's scale a per-row permutation of the store does not fit in memory: with shuffle="shards" a rank
    produces only the groups its block of the order overlaps, one at a time, and a resume starts mid-group."""
    world, window = 4, 2
    ref = StoreSampler(ds, num_replicas=world, rank=0, shuffle="shards", seed=7, shard_window=window)
    shards, goff = ref._groups(0)
    full = ref._shard_order(0)
    for r in range(world):
        s = StoreSampler(ds, num_replicas=world, rank=r, shuffle="shards", seed=7, shard_window=window)
        built = []
        real = StoreSampler._group_rows

        def spy(self, epoch, shards, gi, real=real, built=built):
            built.append(gi)
            return real(self, epoch, shards, gi)

        monkeypatch.setattr(StoreSampler, "_group_rows", spy)
        got = np.fromiter(iter(s), np.int64)
        monkeypatch.setattr(StoreSampler, "_group_rows", real)
        a, b = r * s.num_samples, (r + 1) * s.num_samples
        want = np.resize(full, s.total_size)[a:b]  # the padded order, cut into contiguous blocks
        np.testing.assert_array_equal(got, want)
        # exactly the groups whose rows [goff[g], goff[g+1]) meet this block (positions past n wrap to the start)
        pos = np.arange(a, b) % len(full)
        need = sorted(set((np.searchsorted(goff, pos, side="right") - 1).tolist()))
        assert sorted(set(built)) == need and len(built) == len(set(built)), (built, need)
        assert len(need) < len(goff) - 1  # not every group
        # a resume part-way through the block yields the rest, from the middle of a group
        st = s.state_dict(consumed=5)
        again = StoreSampler(ds, num_replicas=world, rank=r, shuffle="shards", seed=7, shard_window=window)
        again.load_state_dict(st)
        np.testing.assert_array_equal(np.fromiter(iter(again), np.int64), want[5:])


def test_a_mid_epoch_state_from_the_old_shards_order_is_refused(ds):
    s = StoreSampler(ds, num_replicas=1, rank=0, shuffle="shards", seed=7, shard_window=2)
    state = s.state_dict(consumed=5)
    assert state["shards_order"] == 2
    old = {k: v for k, v in state.items() if k != "shards_order"}  # what 0.3.0 wrote
    with pytest.raises(ConfigMismatchError, match="another shuffle='shards' order"):
        StoreSampler(ds, num_replicas=1, rank=0, shuffle="shards", seed=7, shard_window=2).load_state_dict(old)
    fresh = StoreSampler(ds, num_replicas=1, rank=0, shuffle="shards", seed=7, shard_window=2)
    fresh.load_state_dict(dict(old, consumed=0))  # an epoch boundary holds no order: accepted
    assert len(fresh) == fresh.num_samples
