"""Tensor parallelism: the option group and the collectives the sharding pass inserts
(``passes/shard_tensor_parallel.py`` splits the graph)."""
