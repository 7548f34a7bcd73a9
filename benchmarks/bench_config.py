"""The config a step benchmark times: one loader for benchmarks/*_step.py and accumulation.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from tokpost_jax.config_lib import load_config_file


def bench_config(
    config_path: str, batch: int, *settings: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """``config_path`` at global batch ``batch``, then each mapping of dotted keys in order (the
    benchmark's own fixes first, the row's variant last, so a variant wins)."""
    cfg = load_config_file(config_path)
    cfg.unlock()
    cfg.batch_size = batch
    for mapping in settings:
        for key, value in mapping.items():
            *parents, last = key.split(".")
            node = cfg
            for part in parents:
                node = node[part]
            node[last] = value
    return cfg
