"""Freezing by pattern: which parameters train, named by globs over their paths (big_vision's
``replace_frozen`` / ``trainable`` patterns).

A path is the "/"-joined key path of a leaf (``vit_decoder/transformer/block_0/mlp/fc1/kernel``,
``vae/decoder/up_4/upsample/conv/lora_up``); ``*`` matches across "/" (``fnmatch``). Frozen
leaves get no optimizer state and no update, and are kept bitwise (the select in
:meth:`Partition.keep_frozen`, so not even ``-0.0 + 0.0`` can flip a bit). A pattern that matches
nothing is an error: a typo must not silently freeze everything.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import optax
from flax import traverse_util

from tokpost_jax.config_checks import ConfigError

TRAIN, FREEZE = "train", "freeze"


def _is_leaf(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata | optax.MaskedNode)


def path_name(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def leaf_paths(params: Any) -> list[str]:
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_leaf)[0]
    return [path_name(p) for p, _ in leaves]


def param_at(tree: Any, path: str, what: str = "parameter path") -> Any:
    """The leaf (or subtree) at a "/"-joined ``path``; a wrong path names the missing key."""
    node = tree
    for key in path.split("/"):
        if not isinstance(node, dict) or key not in node:
            keys = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise ConfigError(f"{what}={path!r}: no {key!r} there (has {keys})")
        node = node[key]
    return node


@dataclasses.dataclass(frozen=True)
class Partition:
    """Leaves matching any of ``trainable`` train; every other leaf is frozen.

    ``must_freeze``: patterns a trainable leaf may never match (e.g. everything upstream of the
    tokens during decoder post-training); a conflict is an error naming the leaves.
    """

    trainable: tuple[str, ...]
    must_freeze: tuple[str, ...] = ()
    what: str = "trainable"  # the config key, for error messages

    def is_trainable(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.trainable)

    def check(self, params: Any) -> None:
        names = leaf_paths(params)
        unmatched = [p for p in self.trainable if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            tops = sorted({n.split("/", 1)[0] for n in names})
            raise ConfigError(
                f"{self.what} patterns {unmatched} match no parameter (top-level modules: {tops}; "
                "patterns are globs over '/'-joined paths, e.g. 'vit_decoder/*')"
            )
        bad = [
            n for n in names
            if self.is_trainable(n) and any(fnmatch.fnmatchcase(n, p) for p in self.must_freeze)
        ]
        if bad:
            raise ConfigError(
                f"{self.what} would train {len(bad)} parameters that must stay frozen "
                f"(matching {list(self.must_freeze)}), e.g. {bad[:4]}"
            )

    def labels(self, params: Any) -> Any:
        """``TRAIN`` / ``FREEZE`` per leaf, in ``params``' structure (boxed leaves included)."""
        self.check(params)
        return jax.tree_util.tree_map_with_path(
            lambda p, _: TRAIN if self.is_trainable(path_name(p)) else FREEZE,
            params,
            is_leaf=_is_leaf,
        )

    def optimizer(self, inner: optax.GradientTransformation) -> optax.GradientTransformation:
        """``inner`` on the trainable leaves; frozen leaves get zero updates and no state."""
        return optax.multi_transform({TRAIN: inner, FREEZE: optax.set_to_zero()}, self.labels)

    def keep_frozen(self, new: Any, old: Any) -> Any:
        """``new`` for trainable leaves, ``old`` (bitwise) for frozen ones."""
        return jax.tree.map(
            lambda lab, n, o: n if lab == TRAIN else o, self.labels(old), new, old
        )

    def split(self, params: dict) -> tuple[dict, dict]:
        """(trainable, frozen) nested dicts, so a step can differentiate the trainable part only."""
        self.check(params)
        flat = traverse_util.flatten_dict(params, sep="/")
        train = {k: v for k, v in flat.items() if self.is_trainable(k)}
        frozen = {k: v for k, v in flat.items() if not self.is_trainable(k)}
        return (
            traverse_util.unflatten_dict(train, sep="/"),
            traverse_util.unflatten_dict(frozen, sep="/"),
        )

    @staticmethod
    def merge(trainable: dict, frozen: dict) -> dict:
        flat = {
            **traverse_util.flatten_dict(frozen, sep="/"),
            **traverse_util.flatten_dict(trainable, sep="/"),
        }
        return traverse_util.unflatten_dict(flat, sep="/")
