"""Datasets made by models: token shards for the generator, (generated, real) pairs for
post-training; both through the one shard loop of :mod:`tokpost_jax.datagen.shard_loop`."""
