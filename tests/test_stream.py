"""The training stream (pipeline.data.stream): row order and the epoch clock's skipping."""

from pipeline.data import shardset, stream


def test_training_stream_order_and_skip(packed, ray_local):
    """The training reader: each row carries its index in the split; shard and row order
    depend only on (seed, epoch); rows an epoch clock marks consumed are never read out."""
    import numpy as np
    import ray.data


    ctx = ray.data.DataContext.get_current()
    preserve = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # parallel reads otherwise finish in any order
    m = shardset.read_manifest(packed)
    n = m.rows("train")

    def order(seed):
        ds = stream.read_split(m, "train", columns=["image_id"], shuffle_seed=seed, clock_name="test-clock")
        return [r for b in ds.iter_batches(batch_size=None, batch_format="numpy") for r in b["row"]]

    clock = stream.epoch_clock("test-clock")
    try:
        first = order(7)
        assert sorted(first) == list(range(n))
        assert first == order(7) and first != order(8)  # (seed, epoch) -> order
        done = np.zeros(n, dtype=bool)
        done[first[: n // 3]] = True
        ray_local.get(clock.set.remote(0, np.packbits(done)))
        rest = order(7)
        assert sorted(rest) == sorted(first[n // 3:])  # exactly the rows not yet consumed
        ray_local.get(clock.set.remote(1))
        assert order(7) != first  # a new epoch, a new order
    finally:
        ray_local.kill(clock)
        ctx.execution_options.preserve_order = preserve
