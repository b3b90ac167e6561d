"""Datasets: the shard-set format (shardset), naming input images (listings), the pack
job (packing), the training stream (stream) and the embedded demo digits (digits)."""
