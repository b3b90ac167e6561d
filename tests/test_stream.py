"""The training stream (pipeline.data.stream): which rows each rank reads, in which
order, and where a resumed stream starts."""

import numpy as np
import pytest

from pipeline.data import shardset, stream


def _positions(slots):
    return [(s.shard, r) for s in slots for r in range(s.start, s.stop)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_slots_partition_each_epoch(world):
    """Every rank gets N // world rows of each epoch, contiguous in its position, no row
    twice across ranks; the remainder (< world) is the only thing dropped."""
    shard_rows = [7, 5, 7, 3]
    n = sum(shard_rows)
    for epoch in range(3):
        taken = []
        for rank in range(world):
            slots = stream.rank_slots(shard_rows, seed=4, epoch=epoch, rank=rank, world=world)
            rows = _positions(slots)
            assert len(rows) == n // world
            assert [s.pos for s in slots] == list(np.cumsum([0] + [s.stop - s.start for s in slots[:-1]]))
            taken += rows
        assert len(set(taken)) == len(taken) == n - n % world
        assert all(0 <= r < shard_rows[s] for s, r in taken)


def test_rank_slots_depend_only_on_seed_and_epoch():
    shard_rows = [10] * 8
    a = stream.rank_slots(shard_rows, seed=1, epoch=0, rank=0, world=2)
    assert a == stream.rank_slots(shard_rows, seed=1, epoch=0, rank=0, world=2)
    assert a != stream.rank_slots(shard_rows, seed=2, epoch=0, rank=0, world=2)
    assert a != stream.rank_slots(shard_rows, seed=1, epoch=1, rank=0, world=2)


def test_epoch_batches_cut_at_epochs_whatever_the_blocking():
    """Batches never straddle an epoch, and do not depend on how blocks arrive."""
    epochs = np.repeat([0, 1, 2], [10, 10, 10])
    rows = np.arange(30)

    def cut(sizes):
        blocks, i = [], 0
        for n in sizes:
            blocks.append({"epoch": epochs[i:i + n], "row": rows[i:i + n]})
            i += n
        return [(e, b["row"].tolist()) for e, b in stream.epoch_batches(blocks, 4)]

    expected = cut([30])
    assert expected == cut([1] * 30) == cut([7, 3, 11, 9]) == cut([10, 10, 10])
    assert [len(r) for _, r in expected] == [4, 4, 2] * 3
    assert [e for e, _ in expected] == [0] * 3 + [1] * 3 + [2] * 3


def test_training_stream_order_and_resume(packed, ray_local):
    """Rank streams hold every training row once per epoch (less the remainder), in an
    order fixed by (seed, epoch, rank, world); a stream resumed at position p of an
    epoch yields exactly what the full stream yields from p on."""
    m = shardset.read_manifest(packed)
    n = m.rows("train")

    def rows(seed, rank, world=2, first=0, epochs=2, skip=0):
        ds = stream.ordered(stream.train_stream(m, seed, rank, world, first, epochs, skip))
        return [(int(e), int(r), int(p)) for b in ds.iter_batches(batch_size=None, batch_format="numpy")
                for e, r, p in zip(b["epoch"], b["row"], b["pos"])]

    r0, r1 = rows(7, 0), rows(7, 1)
    for epoch in (0, 1):
        mine = [r for e, r, _ in r0 if e == epoch], [r for e, r, _ in r1 if e == epoch]
        assert len(mine[0]) == len(mine[1]) == n // 2
        assert len(set(mine[0]) | set(mine[1])) == n - n % 2
        assert [p for e, _, p in r0 if e == epoch] == list(range(n // 2))
    assert r0 == rows(7, 0) and r0 != rows(8, 0)
    assert [r for e, r, _ in r0 if e == 0] != [r for e, r, _ in r0 if e == 1]  # a new epoch, a new order
    skip = n // 2 // 3
    assert rows(7, 0, skip=skip) == [x for x in r0 if x[0] > 0 or x[2] >= skip]
    assert rows(7, 1, first=1, skip=skip) == [x for x in r1 if x[0] == 1 and x[2] >= skip]
