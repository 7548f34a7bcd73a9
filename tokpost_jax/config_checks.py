"""Config validation before anything is built, and one-line errors for bad ``--config.*`` flags.

Why up front: a bad value found by the code that reads it costs minutes (model build, dataset
open) or fails silently (a negative learning rate trains uphill; pFID with every δ = 1 equals
rFID). The checks read config values only, plus the device and host counts for batch
divisibility; the dataset *name* is checked by asking the data layer how it would open it
(:func:`tokpost_jax.data.pipeline.dataset_kind`), without opening anything.

The rules are tables (dotted key → what is allowed), one per trainer in :data:`TRAINER_RULES`; a
new trainer adds its table with :func:`register_trainer`. All violations are reported at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = [
    "PIPELINE_LINKS",
    "TRAINER_RULES",
    "ConfigError",
    "ConfigErrors",
    "ConfigValueError",
    "Rule",
    "UnknownConfigKey",
    "Within",
    "check_config",
    "check_pipeline_config",
    "flag_error",
    "parse_flags",
    "register_trainer",
]


# --------------------------------------------------------------------------- errors


class ConfigError(ValueError):
    """A config the user must fix; its message is one line that names the key."""

    key: str | None = None  # the dotted key, where one key is to blame


def _show(value: Any) -> str:
    """A value on one line (a ConfigDict's repr is multi-line YAML)."""
    return repr(value.to_dict() if hasattr(value, "to_dict") else value)


class ConfigValueError(ConfigError):
    """One key holds a value that is not allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config.{key}={_show(value)}: {allowed}")


class UnknownConfigKey(ConfigError):
    """A ``--config.<key>`` override names a key the (locked) config does not have."""

    def __init__(self, key: str, reason: str, closest: Sequence[str]):
        self.key, self.closest = key, tuple(closest)
        hint = f"; closest valid keys: {', '.join(closest)}" if closest else ""
        super().__init__(f"unknown config key {key!r}: {reason}{hint}")


class ConfigErrors(ConfigError):
    """Several violations, reported together (one line, '; '-separated)."""

    def __init__(self, errors: Sequence[ConfigError]):
        self.errors = tuple(errors)
        super().__init__(f"{len(errors)} config errors: " + "; ".join(map(str, errors)))


def _raise_all(errors: Sequence[ConfigError]) -> None:
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)


# --------------------------------------------------------------------------- config access

_MISSING = object()


def lookup(config: Any, key: str) -> Any:
    """The value at dotted ``key``, or ``_MISSING`` where any part is absent."""
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return _MISSING
        node = node[part]
    return node


@dataclasses.dataclass(frozen=True)
class Env:
    """What a rule may read: the config (rules' keys are relative to it) and the machine size."""

    config: Any
    num_devices: int
    num_hosts: int
    for_evaluation: bool = False
    prefix: str = ""  # prepended to keys in messages (a nested config, e.g. "tokenizer.")
    skip: tuple[str, ...] = ()  # keys (and what is under them) left unchecked

    def get(self, key: str, default: Any = None) -> Any:
        value = lookup(self.config, key)
        return default if value is _MISSING else value

    def show(self, key: str) -> str:
        """``key=value`` as a message names it (with the nested config's prefix)."""
        return f"{self.prefix}{key}={_show(self.get(key))}"

    def within(self, key: str) -> Env:
        inner = tuple(s[len(key) + 1 :] for s in self.skip if s.startswith(key + "."))
        return dataclasses.replace(
            self, config=self.get(key), prefix=f"{self.prefix}{key}.", skip=inner
        )

    def skipped(self, key: str) -> bool:
        return any(key == s or key.startswith(s + ".") for s in self.skip)

    @functools.cached_property
    def mesh_sizes(self) -> dict[str, int] | None:
        """``config.mesh`` with -1 resolved as :func:`tokpost_jax.sharding.make_mesh` does;
        None when it cannot fit the devices (the mesh rule reports that)."""
        mesh = self.get("mesh")
        if not hasattr(mesh, "items"):
            return None
        sizes = dict(mesh.items())
        if not all(_is_int(s) and (s >= 1 or s == -1) for s in sizes.values()):
            return None
        free = [k for k, s in sizes.items() if s == -1]
        known = math.prod(s for s in sizes.values() if s != -1)
        if len(free) > 1 or self.num_devices % known:
            return None
        if free:
            sizes[free[0]] = self.num_devices // known
        return sizes if math.prod(sizes.values()) == self.num_devices else None

    @functools.cached_property
    def batch_shards(self) -> int | None:
        """How many ways the batch is split (the mesh axes of the ``act_batch`` rule)."""
        from tokpost_jax import sharding

        sizes = self.mesh_sizes
        if sizes is None:
            return None
        try:
            axes = sharding.batch_axes(None, self.get("sharding_rules", ()))
        except (TypeError, ValueError):
            return None
        return math.prod(sizes.get(a, 1) for a in axes)


# --------------------------------------------------------------------------- rules

Bound = float | int | str | None  # a number or a dotted key whose value is the bound
Condition = str | Callable[[Env], bool] | None  # a dotted key that must be truthy, or a test


def _is_int(v: Any) -> bool:
    """Python and numpy ints; not bools (``True`` as a step count is a mistake)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class Rule:
    """``key`` must pass ``test(value, env)``; ``allowed`` says what passes ("must be ...")."""

    key: str
    test: Callable[[Any, Env], bool]
    allowed: str | Callable[[Env], str]
    when: Condition = None
    # An absent key is skipped by default: configs gain and lose fields as stages change, and a
    # key the code reads but the config lacks fails at once anyway. Required: absence = unset.
    required: bool = False
    none_ok: bool = False

    def errors(self, env: Env) -> list[ConfigError]:
        if env.skipped(self.key) or not _holds(self.when, env):
            return []
        value = lookup(env.config, self.key)
        if value is _MISSING:
            if not self.required:
                return []
            return [ConfigError(f"config.{env.prefix}{self.key} is missing; the stage reads it")]
        if value is None and self.none_ok:
            return []
        if self.test(value, env):
            return []
        allowed = self.allowed(env) if callable(self.allowed) else self.allowed
        return [ConfigValueError(env.prefix + self.key, value, allowed)]


@dataclasses.dataclass(frozen=True)
class Weights:
    """Every loss weight under ``key`` (a ``*_weight`` field, or any field of a ``*_weights``
    block) must be a number >= 0: a negative weight rewards the loss it names."""

    key: str

    def errors(self, env: Env) -> list[ConfigError]:
        block = env.get(self.key)
        if env.skipped(self.key) or not hasattr(block, "keys"):
            return []
        out = []
        for name in block:
            path = f"{self.key}.{name}"
            if name.endswith("_weights") and hasattr(block[name], "keys"):
                out += Weights(path).errors_all(env)
            elif name.endswith("_weight"):
                out += number(path, lo=0).errors(env)
        return out

    def errors_all(self, env: Env) -> list[ConfigError]:
        """Every field of the block is a weight."""
        block = env.get(self.key)
        return [e for name in block for e in number(f"{self.key}.{name}", lo=0).errors(env)]


@dataclasses.dataclass(frozen=True)
class Within:
    """``rules`` applied to the nested config at ``key`` (their keys and bounds relative to it)."""

    key: str
    rules: tuple[Any, ...]
    when: Condition = None

    def errors(self, env: Env) -> list[ConfigError]:
        if env.skipped(self.key) or not _holds(self.when, env):
            return []
        if not hasattr(env.get(self.key), "keys"):
            return [ConfigError(f"config.{env.prefix}{self.key} is missing; the stage reads it")]
        inner = env.within(self.key)
        return [e for rule in self.rules for e in rule.errors(inner)]


def _holds(when: Condition, env: Env) -> bool:
    if when is None:
        return True
    return bool(env.get(when)) if isinstance(when, str) else bool(when(env))


def _resolve(bound: Bound, env: Env) -> Any:
    return env.get(bound) if isinstance(bound, str) else bound


def _interval_text(lo: Bound, hi: Bound, lo_open: bool, hi_open: bool, env: Env) -> str:
    def show(b: Bound) -> str:
        return env.show(b) if isinstance(b, str) else f"{b:g}"

    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{show(lo)}, {show(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {show(lo)}"
    return f"{'<' if hi_open else '<='} {show(hi)}"


def _in_interval(
    v: float, lo: Bound, hi: Bound, lo_open: bool, hi_open: bool, env: Env
) -> bool:
    lo_v, hi_v = _resolve(lo, env), _resolve(hi, env)
    if lo is not None and _is_number(lo_v) and (v <= lo_v if lo_open else v < lo_v):
        return False
    return not (hi is not None and _is_number(hi_v) and (v >= hi_v if hi_open else v > hi_v))


def integer(key: str, lo: Bound = None, hi: Bound = None, **kw: Any) -> Rule:
    """An int (not a bool) in [lo, hi]; a bound may be another key."""

    def test(v: Any, env: Env) -> bool:
        return _is_int(v) and _in_interval(v, lo, hi, False, False, env)

    text = "an int" + ("" if lo is None and hi is None else " " + "{}")
    return Rule(key, test, lambda env: "must be " + text.format(
        _interval_text(lo, hi, False, False, env)), **kw)


def number(
    key: str,
    lo: Bound = None,
    hi: Bound = None,
    *,
    above: Bound = None,
    below: Bound = None,
    **kw: Any,
) -> Rule:
    """A finite number in [lo, hi], or with ``above``/``below`` an open end."""
    low, lo_open = (above, True) if above is not None else (lo, False)
    high, hi_open = (below, True) if below is not None else (hi, False)

    def test(v: Any, env: Env) -> bool:
        return _is_number(v) and _in_interval(float(v), low, high, lo_open, hi_open, env)

    return Rule(key, test, lambda env: "must be a number " + _interval_text(
        low, high, lo_open, hi_open, env), **kw)


def each_number(key: str, lo: Bound = None, hi: Bound = None, **kw: Any) -> Rule:
    """A non-empty sequence of finite numbers, each in [lo, hi]."""

    def test(v: Any, env: Env) -> bool:
        return (
            isinstance(v, Sequence) and not isinstance(v, str) and len(v) > 0
            and all(_is_number(x) and _in_interval(float(x), lo, hi, False, False, env)
                    for x in v)
        )

    return Rule(key, test, lambda env: "must be a non-empty sequence of numbers, each "
                + _interval_text(lo, hi, False, False, env), **kw)


def one_of(key: str, options: Iterable[Any] | Callable[[], Iterable[Any]], **kw: Any) -> Rule:
    """``key`` is one of `options` (or of what the callable returns: read at check time, so the
    tables import nothing heavy)."""

    def allowed() -> tuple[Any, ...]:
        return tuple(options() if callable(options) else options)

    return Rule(key, lambda v, env: v in allowed(), lambda env: f"must be one of {list(allowed())}",
                **kw)


def boolean(key: str, **kw: Any) -> Rule:
    return Rule(key, lambda v, env: isinstance(v, bool), "must be True or False", **kw)


def text(key: str, **kw: Any) -> Rule:
    return Rule(key, lambda v, env: isinstance(v, str) and bool(v), "must be a non-empty string",
                **kw)


def is_set(key: str, why: str, **kw: Any) -> Rule:
    return Rule(key, lambda v, env: v is not None and v != "", f"must be set: {why}",
                required=True, **kw)


def equals(key: str, other: str, **kw: Any) -> Rule:
    """``key`` must hold the same value as the key ``other`` (two views of one fact)."""
    return Rule(key, lambda v, env: v == env.get(other),
                lambda env: f"must equal {env.show(other)}", **kw)


def multiple_of(key: str, other: str, **kw: Any) -> Rule:
    """``key`` must be a multiple of the int at ``other`` (checked once ``other`` is valid)."""

    def test(v: Any, env: Env) -> bool:
        d = env.get(other)
        return not (_is_int(d) and d >= 1) or (_is_int(v) and v % d == 0)

    return Rule(key, test, lambda env: f"must be a multiple of {env.show(other)}", **kw)


def batch(key: str, **kw: Any) -> Rule:
    """A global batch size: a positive int divisible by the hosts and by the batch shards."""

    def test(v: Any, env: Env) -> bool:
        if not _is_int(v) or v < 1 or v % env.num_hosts:
            return False
        return env.batch_shards is None or v % env.batch_shards == 0

    def allowed(env: Env) -> str:
        shards = "" if env.batch_shards is None else f" and by the {env.batch_shards} batch shards"
        return (f"must be a positive int divisible by the {env.num_hosts} host(s){shards} "
                f"(mesh {env.mesh_sizes} over {env.num_devices} devices)")

    return Rule(key, test, allowed, **kw)


def _mesh_rule() -> Rule:
    return Rule(
        "mesh",
        lambda v, env: env.mesh_sizes is not None,
        lambda env: (f"must give axis sizes >= 1 (at most one -1: all remaining devices) whose "
                     f"product is the {env.num_devices} devices"),
    )


def _dataset_name_ok(name: Any, env: Env) -> bool:
    from tokpost_jax.data.pipeline import dataset_kind
    from tokpost_jax.data.sources import DataError

    if not isinstance(name, str):
        return False
    try:
        dataset_kind(name)
    except DataError:
        return False
    return True


def _dataset_names_text(env: Env) -> str:
    from tokpost_jax.data.pipeline import DATASET_KINDS_TEXT

    return f"must be {DATASET_KINDS_TEXT}"


def _pipeline_constant(name: str) -> Callable[[], Any]:
    def get() -> Any:
        from tokpost_jax.data import pipeline

        return getattr(pipeline, name)

    return get


def _diffusion_constant(name: str) -> Callable[[], Any]:
    """A tuple of the diffusion model or sampler (read at check time: no jax import here)."""

    def get() -> Any:
        from tokpost_jax import sampling_ode
        from tokpost_jax.models import diffusion

        return getattr(diffusion, name, None) or getattr(sampling_ode, name)

    return get


def data_rules() -> tuple[Any, ...]:
    """A ``data`` block as tokpost_jax.data.pipeline reads it."""

    def needs_dir(env: Env) -> bool:
        return env.get("name") in (_pipeline_constant("FOLDER_NAME")(),
                                   _pipeline_constant("SHARDS_NAME")(),
                                   _pipeline_constant("JSONL_NAME")())

    def not_shards(env: Env) -> bool:  # shards and token files are final views: no crop fields
        return env.get("name") not in (_pipeline_constant("SHARDS_NAME")(),
                                       _pipeline_constant("JSONL_NAME")())

    return (
        Rule("name", _dataset_name_ok, _dataset_names_text),
        text("train_split"),
        text("eval_split"),
        integer("image_size", lo=1),
        Rule("data_dir", lambda v, env: v is not None and v != "",
             lambda env: f"must be set: {env.show('name')} reads from a directory (jsonl: a file)",
             when=needs_dir, required=True),
        number("min_crop_frac", above=0, hi=1, when=not_shards),
        number("max_crop_frac", lo="min_crop_frac", hi=1, when=not_shards),
        integer("num_eval_examples", lo=1, none_ok=True),
        integer("worker_count", lo=0),
        integer("prefetch_threads", lo=0),
        one_of("scan", _pipeline_constant("SCAN_MODES")),
        one_of("on_bad_image", _pipeline_constant("ON_BAD_IMAGE")),
    )


def optim_rules(prefix: str) -> tuple[Rule, ...]:
    """AdamW + warmup/cosine (tokpost_jax.train.optim)."""
    return (
        number(f"{prefix}.lr", above=0),
        number(f"{prefix}.warmup_init_lr", lo=0),
        integer(f"{prefix}.warmup_steps", lo=0),
        number(f"{prefix}.min_lr", lo=0),
        number(f"{prefix}.b1", lo=0, below=1),
        number(f"{prefix}.b2", lo=0, below=1),
        number(f"{prefix}.weight_decay", lo=0),
        number(f"{prefix}.clip_grad_norm", lo=0),
    )


def vit_rules(prefix: str, **kw: Any) -> tuple[Rule, ...]:
    return (
        integer(f"{prefix}.width", lo=1, **kw),
        integer(f"{prefix}.depth", lo=1, **kw),
        integer(f"{prefix}.num_heads", lo=1, **kw),
        integer(f"{prefix}.mlp_dim", lo=1, **kw),
        multiple_of(f"{prefix}.width", f"{prefix}.num_heads", **kw),
    )


def _runs(block: str) -> Callable[[Env], bool]:
    """An evaluator block (fid_eval, gfid) is used: periodically in training (``every_steps``
    > 0), or by an evaluator of this config (``for_evaluation``)."""

    def test(env: Env) -> bool:
        every = env.get(f"{block}.every_steps", 0)
        return env.for_evaluation or (_is_int(every) and every > 0)

    return test


def _pfid_runs(env: Env) -> bool:
    return bool(env.get("fid_eval.pfid")) and _runs("fid_eval")(env)


def _scaled(deltas: Any, env: Env) -> tuple[int, ...] | None:
    from tokpost_jax.metrics.tokenizer import scaled_deltas

    k = env.get("model.codebook_size")
    ok = isinstance(deltas, Sequence) and deltas and all(_is_int(d) and d >= 1 for d in deltas)
    return scaled_deltas(deltas, k) if ok and _is_int(k) and k >= 1 else None


def _pfid_deltas_rule() -> Rule:
    def test(deltas: Any, env: Env) -> bool:
        scaled = _scaled(deltas, env)
        k = env.get("model.codebook_size")
        return scaled is not None and all(2 <= d <= k for d in scaled)

    def allowed(env: Env) -> str:
        from tokpost_jax.metrics.tokenizer import PFID_REFERENCE_CODEBOOK

        k = env.get("model.codebook_size")
        scaled = _scaled(env.get("pfid.deltas_at_16384"), env)
        return (f"must be positive ints whose δ scaled to {env.show('model.codebook_size')} "
                f"(round(δ·{k}/{PFID_REFERENCE_CODEBOOK}), now {scaled}) lie in [2, {k}]: δ = 1 "
                "perturbs nothing (that pFID point equals rFID) and δ > K exceeds the codebook")

    return Rule("pfid.deltas_at_16384", test, allowed, when=_pfid_runs)


def _fid_eval_rules() -> tuple[Rule, ...]:
    return (
        integer("fid_eval.every_steps", lo=0),
        integer("fid_eval.num_images", lo=1, when=_runs("fid_eval")),
        batch("fid_eval.batch_size", when=_runs("fid_eval")),
        boolean("fid_eval.pfid"),
        integer("fid_eval.seed", lo=0),
        one_of("fid_eval.frechet_method", ("eigh", "sqrtm")),
        each_number("pfid.alphas", lo=0, hi=1, when=_pfid_runs),
        _pfid_deltas_rule(),
        one_of("pfid.neighbours", ("feature", "code"), when=_pfid_runs),
    )


def _not_epochs(env: Env) -> bool:
    return not env.get("num_epochs")


DTYPES = ("float32", "bfloat16", "float16")
PARAMS_KEYS = ("params", "ema_params")


def _remat_policies() -> tuple[str, ...]:
    from tokpost_jax.models.remat import REMAT_POLICIES  # the models own them (imports jax)

    return REMAT_POLICIES


def _microbatch(env: Env) -> int | None:
    """batch_size / grad_accum_steps (tokpost_jax.train.accumulate), or None while either is
    invalid or they do not divide (their own rules report that)."""
    b, k = env.get("batch_size"), env.get("grad_accum_steps", 1)
    if not (_is_int(b) and b >= 1 and _is_int(k) and k >= 1) or b % k:
        return None
    return b // k


def _accumulation_rule() -> Rule:
    """k microbatches, each split evenly over the batch shards: batch_size % (k·shards) == 0.
    Reported only where k is the cause (a batch the shards cannot split is the batch rule's)."""

    def test(k: Any, env: Env) -> bool:
        b, shards = env.get("batch_size"), env.batch_shards or 1
        if not (_is_int(k) and k >= 1 and _is_int(b) and b >= 1) or b % shards:
            return True
        return b % (k * shards) == 0

    def allowed(env: Env) -> str:
        shards = env.batch_shards or 1
        return (f"must split {env.show('batch_size')} into microbatches that divide over the "
                f"{shards} batch shard(s): batch_size must be a multiple of grad_accum_steps x "
                f"{shards} (mesh {env.mesh_sizes})")

    return Rule("grad_accum_steps", test, allowed)


def _divides_microbatch(key: str, what: str, zero_ok: bool = False, **kw: Any) -> Rule:
    """``key`` (a count of samples or groups) divides the microbatch; with ``zero_ok`` 0 means
    the whole microbatch."""

    def test(v: Any, env: Env) -> bool:
        micro = _microbatch(env)
        if micro is None or not _is_int(v) or v < 0 or (v == 0 and zero_ok):
            return True
        return v >= 1 and micro % v == 0

    def allowed(env: Env) -> str:
        return (f"must divide the microbatch batch_size / grad_accum_steps = {_microbatch(env)} "
                f"({env.show('batch_size')}, {env.show('grad_accum_steps')}): {what}")

    return Rule(key, test, allowed, **kw)


def _perturbs_someone_rule() -> Rule:
    """⌊β·G⌋ >= 1 per group of G samples of a microbatch (G = group_size, 0: the microbatch);
    the stage refuses the same (train/perturb_schedule.py), here before anything is built."""

    def group(env: Env) -> int | None:
        g, micro = env.get("perturbation.group_size"), _microbatch(env)
        if not _is_int(g) or g < 0 or micro is None:
            return None
        return g or micro

    def test(beta: Any, env: Env) -> bool:
        g = group(env)
        if g is None or not _is_number(beta) or not 0 <= beta <= 1:
            return True
        return math.floor(float(beta) * g) >= 1

    def allowed(env: Env) -> str:
        g = group(env)
        return (f"selects ⌊β·{g}⌋ = 0 samples per group of {g} ({env.show('batch_size')}, "
                f"{env.show('grad_accum_steps')}, {env.show('perturbation.group_size')}), so the "
                "perturbation would never act; raise beta or group_size, lower grad_accum_steps, "
                "or set perturbation.enabled=False")

    return Rule("perturbation.beta", test, allowed, when=_enabled("perturbation"))

#: Every trainer: the loop (tokpost_jax.train.loop) and the optimizer.
COMMON_RULES: tuple[Any, ...] = (
    integer("seed", lo=0),
    one_of("dtype", DTYPES),
    integer("total_steps", lo=1, when=_not_epochs),
    number("num_epochs", above=0, none_ok=True),
    batch("batch_size"),
    integer("log_every_steps", lo=1),
    integer("eval_every_steps", lo=1),
    integer("checkpoint_every_steps", lo=1),
    integer("keep_checkpoints", lo=1),
    integer("num_grid_images", lo=1),
    _mesh_rule(),
    boolean("eval_at_start"),
    one_of("init_from.params_key", PARAMS_KEYS),
    Within("data", data_rules()),
    *optim_rules("optim"),
    number("optim.ema_decay", lo=0, below=1),
    integer("grad_accum_steps", lo=1),
    _accumulation_rule(),
)


def _enabled(block: str) -> str:
    return f"{block}.enabled"


def _enabled_in(env: Env, block: str) -> bool:
    return bool(env.get(f"{block}.enabled"))


def _kind(kind: str, *more: str) -> Callable[[Env], bool]:
    return lambda env: env.get("model.kind", "vit_vq") in (kind, *more)


def _square_sides(v: Any, env: Env) -> bool:
    ok = isinstance(v, Sequence) and len(v) > 0 and all(_is_int(s) and s >= 1 for s in v)
    return ok and list(v) == sorted(v)


#: The GAN side (tokpost_jax.train.gan), for every autoencoder stage.
GAN_RULES: tuple[Any, ...] = (
    boolean("gan.enabled"),
    one_of("gan.discriminator", ("dino", "patch"), when=_enabled("gan")),
    number("gan.start", lo=0, when=_enabled("gan")),
    number("gan.weight", lo=0, when=_enabled("gan")),
    number("gan.adaptive_max", above=0, when=_enabled("gan")),
    number("gan.adaptive_eps", above=0, when=_enabled("gan")),
    integer("gan.adaptive_weight_groups", lo=1, when=_enabled("gan")),
    _divides_microbatch("gan.adaptive_weight_groups", "λ is computed per contiguous group of "
                        "each microbatch", when=lambda env: _enabled_in(env, "gan")
                        and bool(env.get("gan.adaptive_weight"))),
    number("gan.lecam_weight", lo=0, when=_enabled("gan")),
    number("gan.lecam_decay", lo=0, hi=1, when=_enabled("gan")),
    integer("gan.dino_image_size", lo=1, when=_enabled("gan")),
    integer("gan.patch_channels", lo=1, when=_enabled("gan")),
    integer("gan.patch_layers", lo=1, when=_enabled("gan")),
    one_of("gan.ramp", ("none", "linear"), when=_enabled("gan")),
    text("gan.adaptive_param", when=_enabled("gan")),
    Within("gan", optim_rules("optim"), when=_enabled("gan")),
)


def _levels_ok(v: Any, env: Env) -> bool:
    return isinstance(v, Sequence) and len(v) > 0 and all(_is_int(m) and m >= 1 for m in v)


def _cnn_vq_divides(v: Any, env: Env) -> bool:
    """image_size is a multiple of the downsampling 2^(levels−1)."""
    mult = lookup(env.config, "model.ch_mult")
    if not _levels_ok(mult, env) or not _is_int(v):
        return True  # reported by the ch_mult / image_size rules
    return v % 2 ** (len(mult) - 1) == 0


def _cnn_vq_groups(v: Any, env: Env) -> bool:
    """norm_groups divides every level's width ch·m (GroupNorm's requirement)."""
    ch, mult = lookup(env.config, "model.ch"), lookup(env.config, "model.ch_mult")
    if not _is_int(v) or v < 1:
        return False
    if not _is_int(ch) or not _levels_ok(mult, env):
        return True
    return all((ch * m) % v == 0 for m in mult)


def _klvae_param_groups() -> tuple[str, ...]:
    from tokpost_jax.models.klvae import PARAM_GROUPS  # the model owns its groups (imports jax)

    return PARAM_GROUPS


#: The tokenizer families' own fields (models/build.py), by ``model.kind``.
TOKENIZER_MODEL_RULES: tuple[Any, ...] = (
    one_of("model.kind", ("vit_vq", "coda", "cnn_vq", "maskgit_vq")),
    one_of("model.remat", _remat_policies),
    integer("model.codebook_size", lo=1),
    # ViT VQ (models/tokenizer.py)
    integer("model.patch_size", lo=1, when=_kind("vit_vq")),
    multiple_of("data.image_size", "model.patch_size", when=_kind("vit_vq")),
    integer("model.num_latent_tokens", lo=1, when=_kind("vit_vq")),
    integer("model.code_dim", lo=1, when=_kind("vit_vq")),
    number("model.commit_weight", lo=0, when=_kind("vit_vq")),
    *vit_rules("model.encoder", when=_kind("vit_vq")),
    *vit_rules("model.decoder", when=_kind("vit_vq")),
    # CNN VQ (models/cnn_vq.py, the LlamaGen layout; models/maskgit_vq.py shares the fields
    # but z_channels)
    integer("model.ch", lo=1, when=_kind("cnn_vq", "maskgit_vq")),
    Rule("model.ch_mult", _levels_ok, "must be a non-empty sequence of positive integers",
         when=_kind("cnn_vq", "maskgit_vq")),
    Rule("data.image_size", _cnn_vq_divides,
         "must be a multiple of the downsampling 2^(len(model.ch_mult) − 1)",
         when=_kind("cnn_vq", "maskgit_vq")),
    integer("model.num_res_blocks", lo=1, when=_kind("cnn_vq", "maskgit_vq")),
    integer("model.z_channels", lo=1, when=_kind("cnn_vq")),
    integer("model.code_dim", lo=1, when=_kind("cnn_vq", "maskgit_vq")),
    Rule("model.norm_groups", _cnn_vq_groups,
         "must be a positive integer dividing every level width model.ch × model.ch_mult[i]",
         when=_kind("cnn_vq", "maskgit_vq")),
    number("model.commit_weight", lo=0, when=_kind("cnn_vq", "maskgit_vq")),
    # CODA (models/coda.py): the VAE preset, the pyramid and the quantizer.
    equals("model.vae.resolution", "data.image_size", when=_kind("coda")),
    integer("model.vae.lora_rank", lo=0, when=_kind("coda")),
    Rule("model.scales", _square_sides,
         "must be ascending positive square-grid sides, the last one the latent side",
         when=_kind("coda")),
    integer("model.quantizer.attn_dim", lo=1, when=_kind("coda")),
    one_of("model.quantizer.norm", ("rms", "layer", "none"), when=_kind("coda")),
    one_of("model.quantizer.assignment", ("attention", "nearest"), when=_kind("coda")),
    number("model.quantizer.beta", lo=0, when=_kind("coda")),
    number("model.quantizer.entropy_temperature", above=0, when=_kind("coda")),
    integer("model.quantizer.entropy_groups", lo=1, when=_kind("coda")),
    one_of("model.eval_posterior", ("mean", "sample"), when=_kind("coda")),
    number("model.latent_scale", lo=0, when=_kind("coda")),
    integer("model.latent_stats_images", lo=1, when=_kind("coda")),
)

#: What every tokenizer stage shares (tokpost_jax.train.reconstruction).
RECONSTRUCTION_RULES: tuple[Any, ...] = (
    *COMMON_RULES,
    *TOKENIZER_MODEL_RULES,
    one_of("schedule_unit", ("step", "epoch")),
    batch("eval_batch_size"),
    Weights("loss"),
    number("loss.lpips_dropout", lo=0, below=1),
    boolean("perturbation.enabled"),
    number("perturbation.beta", lo=0, hi=1, when=_enabled("perturbation")),
    number("perturbation.alpha0", lo=0, hi=1, when=_enabled("perturbation")),
    integer("perturbation.delta0", lo=1, hi="model.codebook_size", when=_enabled("perturbation")),
    number("perturbation.anneal_start", lo=0, when=_enabled("perturbation")),
    number("perturbation.anneal_end", lo="perturbation.anneal_start",
           when=_enabled("perturbation")),
    number("perturbation.end_ratio", lo=0, hi=1, when=_enabled("perturbation")),
    one_of("perturbation.neighbours", ("feature", "code"),
           when=lambda env: _enabled_in(env, "perturbation") and _kind("vit_vq")(env)),
    one_of("perturbation.neighbours", ("feature", "value", "key"),
           when=lambda env: _enabled_in(env, "perturbation") and _kind("coda")(env)),
    integer("perturbation.group_size", lo=0, when=_enabled("perturbation")),
    _divides_microbatch("perturbation.group_size", "⌊β·G⌋ samples are perturbed per contiguous "
                        "group of G samples of each microbatch (0: the whole microbatch)",
                        zero_ok=True, when=_enabled("perturbation")),
    _perturbs_someone_rule(),
    integer("perturbation.min_side", lo=1, when=_enabled("perturbation")),
    *GAN_RULES,
    *_fid_eval_rules(),
)

#: ViT VQ main training (tokpost_jax.train.tokenizer).
TOKENIZER_RULES: tuple[Any, ...] = (
    *RECONSTRUCTION_RULES,
    integer("semantic.teacher_patch_size", lo=1, when="loss.semantic_weight"),
    number("semantic.logit_scale", above=0, when="loss.semantic_weight"),
    integer("dead_code_restart.every_steps", lo=0),
    number("dead_code_restart.usage_decay", lo=0, below=1, when="dead_code_restart.every_steps"),
    number("dead_code_restart.min_usage", lo=0, when="dead_code_restart.every_steps"),
)

#: The continuous KL-VAE CODA starts from (tokpost_jax.train.vae).
VAE_RULES: tuple[Any, ...] = (
    *COMMON_RULES,
    one_of("model.kind", ("klvae",)),
    one_of("model.remat", _remat_policies),
    equals("model.resolution", "data.image_size"),
    integer("model.ch", lo=1),
    integer("model.norm_groups", lo=1),
    multiple_of("model.ch", "model.norm_groups"),
    Rule("model.ch_mult", lambda v, env: isinstance(v, Sequence) and len(v) > 0
         and all(_is_int(m) and m >= 1 for m in v), "must be a non-empty sequence of ints >= 1"),
    Rule("data.image_size", lambda v, env: _is_int(v) and isinstance(
        env.get("model.ch_mult"), Sequence) and v % 2 ** (len(env.get("model.ch_mult")) - 1) == 0,
        "must be divisible by 2^(len(model.ch_mult) - 1), the VAE's stride"),
    integer("model.z_channels", lo=1),
    integer("model.num_res_blocks", lo=1),
    integer("model.lora_rank", lo=0),
    boolean("model.use_quant_conv"),
    boolean("model.use_post_quant_conv"),
    one_of("schedule_unit", ("step", "epoch")),
    batch("eval_batch_size"),
    Weights("loss"),
    number("loss.lpips_dropout", lo=0, below=1),
    *GAN_RULES,
    Rule("gan.adaptive_param", lambda v, env: isinstance(v, str) and v.split("/")[0] in
         _klvae_param_groups(), "must be a KL-VAE parameter path, e.g. 'decoder/conv_out/kernel'",
         when=_enabled("gan")),
    Rule("fid_eval.pfid", lambda v, env: v is False,
         "must be False: pFID perturbs discrete tokens, a continuous VAE has none"),
    integer("fid_eval.every_steps", lo=0),
    integer("fid_eval.num_images", lo=1, when=_runs("fid_eval")),
    batch("fid_eval.batch_size", when=_runs("fid_eval")),
    integer("fid_eval.seed", lo=0),
    one_of("fid_eval.frechet_method", ("eigh", "sqrtm")),
)

#: CODA (tokpost_jax.train.coda): LoRA + quantizer on a frozen VAE.
CODA_RULES: tuple[Any, ...] = (
    *RECONSTRUCTION_RULES,
    one_of("model.kind", ("coda",)),
    _divides_microbatch("model.quantizer.entropy_groups", "the entropy's batch distribution is "
                        "taken per group of each microbatch"),
    one_of("optim.decay_mask", ("all", "default")),
    one_of("optim.ema_schedule", ("constant", "coda")),
    number("optim.ema_start", lo=0),
    Rule("optim.trainable", lambda v, env: isinstance(v, Sequence) and not isinstance(v, str)
         and len(v) > 0 and all(isinstance(x, str) for x in v),
         "must be a non-empty sequence of parameter-path globs (e.g. \"quantizer/*\")"),
)

#: Decoder post-training (tokpost_jax.train.post_train), for either family: on the pairs.
POST_RULES: tuple[Any, ...] = (
    Within("eval_data", data_rules()),
    Rule("perturbation.enabled", lambda v, env: v is False,
         "must be False: post-training uses no latent perturbation (robustok.md §9.2)"),
    is_set("init_from.workdir", "post-training starts from the main tokenizer run's checkpoint"),
    Rule("post.trainable", lambda v, env: isinstance(v, Sequence) and not isinstance(v, str)
         and len(v) > 0 and all(isinstance(x, str) for x in v),
         "must be a non-empty sequence of parameter-path globs (e.g. \"vit_decoder/*\")"),
    boolean("post.reuse_discriminator"),
    number("post.sigma", lo=0, hi=1),
    integer("post.num_images", lo=1),
    integer("post.seed", lo=0),
    text("post.source_split"),
    batch("post.batch_size"),
    integer("post.gt_max_side", lo=0),
)

POST_TRAIN_RULES: tuple[Any, ...] = (
    *TOKENIZER_RULES,
    *POST_RULES,
    Rule("dead_code_restart.every_steps", lambda v, env: v == 0,
         "must be 0: dead-code restart rewrites the codebook, which post-training keeps frozen"),
)

#: A generator stage's gFID evaluation (the one generation evaluator, metrics/generation.py).
GFID_RULES: tuple[Any, ...] = (
    integer("gfid.every_steps", lo=0),
    integer("gfid.num_samples", lo=1, when=_runs("gfid")),
    batch("gfid.batch_size", when=_runs("gfid")),
    integer("gfid.num_reference", lo=1, none_ok=True),
    integer("gfid.seed", lo=0),
    one_of("gfid.frechet_method", ("eigh", "sqrtm")),
)

#: RAR generator training (tokpost_jax.train.generator) and its gFID evaluation.
GENERATOR_RULES: tuple[Any, ...] = (
    *COMMON_RULES,
    integer("model.num_classes", lo=1),
    boolean("model.scale_embed"),
    one_of("model.remat", _remat_policies),
    *vit_rules("model.size"),
    number("model.size.dropout", lo=0, below=1),
    number("model.size.attn_dropout", lo=0, below=1),
    one_of("model.dropout_bits", (8, 16, 32)),
    Within("tokenizer", (*TOKENIZER_MODEL_RULES, Within("data", data_rules()))),
    one_of("tokenizer_params_key", PARAMS_KEYS),
    number("label_dropout", lo=0, hi=1),
    integer("randomness.anneal_start", lo=0),
    integer("randomness.anneal_end", lo="randomness.anneal_start"),
    number("sampling.temperature", above=0),
    number("sampling.guidance", lo=0),
    number("sampling.power", lo=0),
    integer("sampling.top_k", lo=0, hi="tokenizer.model.codebook_size"),
    number("sampling.top_p", above=0, hi=1),
    *GFID_RULES,
)

def _latent_matches_vae(v: Any, env: Env) -> bool:
    """[h, w, C] with h = w = image_size / the VAE's stride and C = its z_channels."""
    mult, size, z = env.get("vae.ch_mult"), env.get("data.image_size"), env.get("vae.z_channels")
    if not (isinstance(v, Sequence) and len(v) == 3 and all(_is_int(d) for d in v)):
        return False
    if not (isinstance(mult, Sequence) and _is_int(size) and _is_int(z)):
        return True  # the VAE rules report those
    side = size // 2 ** (len(mult) - 1)
    return tuple(v) == (side, side, z)


#: Latent diffusion training (tokpost_jax.train.diffusion) on a frozen KL-VAE, and its gFID.
DIFFUSION_RULES: tuple[Any, ...] = (
    *COMMON_RULES,
    integer("model.num_classes", lo=1),
    integer("model.width", lo=1),
    integer("model.depth", lo=1),
    integer("model.num_heads", lo=1),
    multiple_of("model.width", "model.num_heads"),
    integer("model.mlp_dim", lo=1),
    integer("model.patch_size", lo=1),
    integer("model.freq_dim", lo=2),
    number("model.time_scale", above=0),
    one_of("model.remat", _remat_policies),
    equals("vae.resolution", "data.image_size"),
    Rule("latent.shape", _latent_matches_vae,
         lambda env: "must be [h, w, C]: data.image_size / 2^(len(vae.ch_mult) - 1) and "
         f"vae.z_channels ({env.show('data.image_size')}, {env.show('vae.z_channels')})"),
    Rule("latent.shape", lambda v, env: not _is_int(env.get("model.patch_size"))
         or all(d % env.get("model.patch_size") == 0 for d in list(v)[:2]),
         lambda env: f"must have sides divisible by {env.show('model.patch_size')}"),
    number("latent.scale", above=0),
    number("latent.shift"),
    boolean("latent.sample_posterior"),
    is_set("vae_init", "the frozen KL-VAE's weights (a configs/klvae.py run or a file)"),
    one_of("flow.time_sampling", _diffusion_constant("TIME_SAMPLINGS")),
    number("flow.logit_std", above=0),
    number("flow.logit_mean"),
    number("label_dropout", lo=0, hi=1),
    one_of("sampling.method", _diffusion_constant("METHODS")),
    integer("sampling.num_steps", lo=1),
    number("sampling.guidance", lo=0),
    *GFID_RULES,
)

#: config.trainer → its rules. New trainers (e.g. "coda", "vae") add theirs: register_trainer.
TRAINER_RULES: dict[str, tuple[Any, ...]] = {
    "tokenizer": TOKENIZER_RULES,
    "generator": GENERATOR_RULES,
    "post_train": POST_TRAIN_RULES,
    "coda": CODA_RULES,
    "coda_post_train": (*CODA_RULES, *POST_RULES),
    "vae": VAE_RULES,
    "diffusion": DIFFUSION_RULES,
    "vae_post_train": (*VAE_RULES, *POST_RULES),
}


def register_trainer(trainer: str, rules: Iterable[Any], *, base: str | None = None) -> None:
    """Adds (or extends) ``trainer``'s rule table; ``base`` copies another trainer's first
    (e.g. ``register_trainer("coda", CODA_RULES, base="tokenizer")`` reuses the loop's rules)."""
    start = TRAINER_RULES[base] if base is not None else TRAINER_RULES.get(trainer, ())
    TRAINER_RULES[trainer] = (*start, *rules)


def _machine(num_devices: int | None, num_hosts: int | None) -> tuple[int, int]:
    if num_devices is None or num_hosts is None:
        import jax

        num_devices = jax.device_count() if num_devices is None else num_devices
        num_hosts = jax.process_count() if num_hosts is None else num_hosts
    return int(num_devices), int(num_hosts)


def config_errors(
    config: Any,
    *,
    num_devices: int | None = None,
    num_hosts: int | None = None,
    for_evaluation: bool = False,
    skip: Sequence[str] = (),
    prefix: str = "",
) -> list[ConfigError]:
    """Every violation of ``config``'s trainer rules (see :func:`check_config`)."""
    trainer = lookup(config, "trainer")
    if trainer not in TRAINER_RULES:
        return [ConfigValueError(prefix + "trainer", None if trainer is _MISSING else trainer,
                                 f"must be one of {sorted(TRAINER_RULES)}")]
    devices, hosts = _machine(num_devices, num_hosts)
    env = Env(config, devices, hosts, for_evaluation, prefix, tuple(skip))
    return [e for rule in TRAINER_RULES[trainer] for e in rule.errors(env)]


def check_config(
    config: Any,
    *,
    num_devices: int | None = None,
    num_hosts: int | None = None,
    for_evaluation: bool = False,
    skip: Sequence[str] = (),
) -> None:
    """Raises a :class:`ConfigError` naming every bad value of a trainer config (configs/*.py).

    ``num_devices``/``num_hosts`` default to JAX's; ``for_evaluation``: the config also drives an
    evaluator (eval_tokenizer, the pipeline's tokenizer_eval), so pFID settings apply even when
    training does not compute it; ``skip``: keys filled in later (and their sub-keys).
    """
    _raise_all(config_errors(config, num_devices=num_devices, num_hosts=num_hosts,
                             for_evaluation=for_evaluation, skip=skip))


# --------------------------------------------------------------------------- the pipeline

#: What tokpost_jax/pipeline.py's Pipeline fills into a stage config from the tokenizer config
#: (stage key ← pipeline key); the check fills the same so each stage is checked as it will run.
PIPELINE_LINKS: dict[str, tuple[tuple[str, str], ...]] = {
    "generator": (
        ("tokenizer", "tokenizer"),
        ("data.image_size", "tokenizer.data.image_size"),
    ),
    "post_train": (
        ("model", "tokenizer.model"),
        ("eval_data", "tokenizer.data"),
        ("data.image_size", "tokenizer.data.image_size"),
    ),
}
#: Paths the Pipeline sets to directories under its workdir: nothing to check beforehand.
PIPELINE_PATHS: dict[str, tuple[str, ...]] = {
    "generator": ("tokenizer_workdir", "data.data_dir", "gfid.reference"),
    "post_train": ("init_from.workdir", "data.data_dir"),
    "tokenizer": ("model.vae_init",),
}
#: The same for the SDEdit variant (DiffusionPipeline): the KL-VAE stage is the source.
DIFFUSION_PIPELINE_LINKS: dict[str, tuple[tuple[str, str], ...]] = {
    "diffusion": (("vae", "vae.model"), ("data", "vae.data")),
    "post_train": (
        ("model", "vae.model"),
        ("eval_data", "vae.data"),
        ("data.image_size", "vae.data.image_size"),
    ),
}
DIFFUSION_PIPELINE_PATHS: dict[str, tuple[str, ...]] = {
    "diffusion": ("vae_init", "gfid.reference"),
    "post_train": ("init_from.workdir", "data.data_dir"),
}


def _pipeline_rules() -> tuple[Any, ...]:
    from tokpost_jax.datagen.tokens import MODES

    return (
        _mesh_rule(),
        one_of("pretokenize.mode", sorted(MODES)),
        batch("pretokenize.batch_size"),
        boolean("uniform_token_baseline"),
        boolean("gfid_raw_decoder"),
        integer("num_grid_images", lo=1),
    )


def _assign(config: Any, key: str, value: Any) -> None:
    import ml_collections

    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[last] = ml_collections.ConfigDict(value.to_dict()) if hasattr(value, "to_dict") else value


def _linked(config: Any, stage: str, links: dict | None = None) -> Any:
    """The stage sub-config with the linked values filled in: whole blocks always, single
    fields only where the stage config has them."""
    import ml_collections

    out = ml_collections.ConfigDict(config[stage].to_dict())
    for key, source in (PIPELINE_LINKS if links is None else links).get(stage, ()):
        value = lookup(config, source)
        if value is not _MISSING and ("." not in key or lookup(out, key) is not _MISSING):
            _assign(out, key, value)
    return out


def check_pipeline_config(
    config: Any, *, num_devices: int | None = None, num_hosts: int | None = None
) -> None:
    """:func:`check_config` for configs/pipeline.py: its own fields and each stage sub-config,
    linked as the Pipeline links them (keys are named from the pipeline config's root)."""
    devices, hosts = _machine(num_devices, num_hosts)
    env = Env(config, devices, hosts)
    if hasattr(lookup(config, "diffusion"), "keys"):
        return _check_diffusion_pipeline(config, env)
    errors = [e for rule in _pipeline_rules() for e in rule.errors(env)]
    # tokenizer_eval computes rFID/pFID and gfid_before/after gFID whatever their every_steps.
    stages = (("tokenizer", True), ("generator", True), ("post_train", False))
    if hasattr(lookup(config, "vae"), "keys"):  # the CODA pipeline trains its VAE first
        stages = (("vae", False), *stages)
    elif env.get("tokenizer.model.kind") == "coda" and not (
        env.get("tokenizer.model.vae_init") or env.get("tokenizer.model.coda_init")
    ):  # without a VAE stage nothing fills vae_init, and a random frozen VAE is no tokenizer
        errors.append(ConfigValueError(
            "tokenizer.model.vae_init", None,
            "must be set (a VAE weights file or workdir, e.g. MAR's kl16.safetensors) or "
            "tokenizer.model.coda_init: this pipeline has no vae stage",
        ))
    for stage, evaluated in stages:
        if not hasattr(lookup(config, stage), "keys"):
            errors.append(ConfigError(f"config.{stage} is missing; the pipeline runs that stage"))
            continue
        errors += config_errors(
            _linked(config, stage), num_devices=devices, num_hosts=hosts,
            for_evaluation=evaluated, skip=PIPELINE_PATHS.get(stage, ()), prefix=f"{stage}.",
        )
    _raise_all(errors)


def _check_diffusion_pipeline(config: Any, env: Env) -> None:
    """The SDEdit variant (configs/pipeline.py:diffusion_demo): vae → diffusion → post_train."""
    rules = (
        _mesh_rule(),
        number("latent_scale", above=0, none_ok=True),
        boolean("gaussian_latent_baseline"),
        boolean("gfid_raw_decoder"),
        integer("num_grid_images", lo=1),
    )
    errors = [e for rule in rules for e in rule.errors(env)]
    for stage, evaluated in (("vae", False), ("diffusion", True), ("post_train", False)):
        if not hasattr(lookup(config, stage), "keys"):
            errors.append(ConfigError(f"config.{stage} is missing; the pipeline runs that stage"))
            continue
        errors += config_errors(
            _linked(config, stage, DIFFUSION_PIPELINE_LINKS), num_devices=env.num_devices,
            num_hosts=env.num_hosts, for_evaluation=evaluated,
            skip=DIFFUSION_PIPELINE_PATHS.get(stage, ()), prefix=f"{stage}.",
        )
    _raise_all(errors)


# --------------------------------------------------------------------------- flag errors


def _override_paths(argv: Sequence[str], flag_name: str) -> list[tuple[str, str]]:
    """(dotted path, the argument as typed) of every ``--<flag_name>.<path>[=value]``."""
    pattern = re.compile(rf"^--?(?:no)?{re.escape(flag_name)}\.([^=]+)")
    out = []
    for arg in argv:
        m = pattern.match(arg)
        if m:
            out.append((m.group(1), arg))
    return out


def _all_keys(config: Any, prefix: str = "") -> list[str]:
    keys = []
    for k in config:
        keys.append(prefix + k)
        child = config[k]
        if hasattr(child, "keys") and not isinstance(child, dict):
            keys += _all_keys(child, f"{prefix}{k}.")
    return keys


def _missing_key(config: Any, path: str, arg: str) -> UnknownConfigKey | None:
    """An :class:`UnknownConfigKey` if ``path`` does not resolve in ``config``, else None."""
    node, walked = config, []
    for part in path.split("."):
        if not (hasattr(node, "keys") and not isinstance(node, dict)):
            where = ".".join(walked)
            reason = f"config.{where} is a {type(node).__name__}, it has no field {part!r}"
            return UnknownConfigKey(path, f"{reason} (from {arg})", [])
        if part not in node:
            where = "config" + "".join(f".{w}" for w in walked)
            siblings = difflib.get_close_matches(part, list(node.keys()), n=3, cutoff=0.6)
            near = [".".join([*walked, s]) for s in siblings]
            ancestors = {".".join(walked[:i]) for i in range(1, len(walked) + 1)}
            near += [k for k in difflib.get_close_matches(path, _all_keys(config), n=4,
                                                          cutoff=0.75)
                     if k not in near and k not in ancestors]
            return UnknownConfigKey(path, f"{where} has no field {part!r} (from {arg})", near[:4])
        node = node[part]
        walked.append(part)
    return None


def _config_arg(argv: Sequence[str], flag_name: str) -> str | None:
    for i, arg in enumerate(argv):
        m = re.match(rf"^--?{re.escape(flag_name)}(=(.*))?$", arg)
        if m:
            if m.group(1):
                return m.group(2)
            return argv[i + 1] if i + 1 < len(argv) else None
    return None


def _load_for_keys(argv: Sequence[str], flag_name: str) -> Any:
    """The config named by ``--<flag_name>=file.py:arg``, loaded without overrides (or None)."""
    from tokpost_jax import config_lib

    path = _config_arg(argv, flag_name)
    if not path:
        return None
    file, _, arg = path.partition(":")
    try:
        return config_lib.load_config_file(file, arg or None)
    except Exception:  # the original error is what gets reported then
        return None


def flag_error(
    error: BaseException, argv: Sequence[str], config: Any = None, flag_name: str = "config"
) -> ConfigError | None:
    """One-line :class:`ConfigError` for a failure to parse ``--config`` or ``--config.*``.

    Covers ml_collections' locked-config errors for a mistyped key (AttributeError/KeyError with
    a chained traceback), absl's value errors for an override, and errors raised while loading
    the config file. ``config`` (the config without overrides) is loaded from ``argv`` when not
    given. Returns None for errors that concern other flags.
    """
    from absl import flags

    message = str(error)
    if isinstance(error, (AttributeError, KeyError)):
        config = config if config is not None else _load_for_keys(argv, flag_name)
        if config is not None:
            for path, arg in _override_paths(argv, flag_name):
                bad = _missing_key(config, path, arg)
                if bad is not None:
                    return bad
        return None
    if not isinstance(error, flags.Error):
        return None
    m = re.match(rf"flag --{re.escape(flag_name)}=(.*?): ", message)
    if m and "Error whilst parsing config file" in message:
        last = [line for line in message.strip().splitlines() if line.strip()][-1].strip()
        return ConfigError(f"cannot load --{flag_name}={m.group(1)}: {last}")
    m = re.match(rf"flag --{re.escape(flag_name)}\.([^=]+)=(.*?): (.*)", message, re.S)
    if m:
        path, value, why = m.group(1), m.group(2), " ".join(m.group(3).split())
        config = config if config is not None else _load_for_keys(argv, flag_name)
        return ConfigError(f"bad value {value!r} for --{flag_name}.{path}: {why}"
                           f"{_expected(config, path)}")
    if re.search(rf"--{re.escape(flag_name)}\.", message):
        return ConfigError(" ".join(message.split()))
    return None


def _expected(config: Any, path: str) -> str:
    """'; config.<path> takes <type> (default <value>)' for a scalar field, else ''."""
    from ml_collections.config_flags import config_path

    now = lookup(config, path) if config is not None else _MISSING
    if now is _MISSING:
        return ""
    if hasattr(now, "keys"):
        return f"; config.{path} is a block: set its fields (--config.{path}.<field>=...)"
    try:
        kind = config_path.get_type(path, config).__name__
    except (AttributeError, KeyError, TypeError):
        kind = type(now).__name__
    return f"; config.{path} takes {kind} (default {now!r})"


def _config_load_failure(flag_name: str) -> ConfigError | None:
    """ml_collections defers a missing config file's IOError to first use; surface it now."""
    from absl import flags

    if flag_name not in flags.FLAGS:
        return None
    value = flags.FLAGS[flag_name].value
    try:
        value.keys()
    except OSError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        return ConfigError(f"cannot load --{flag_name}: {lines[-1] if lines else e}")
    except AttributeError:
        return None
    return None


def parse_flags(argv: Sequence[str], flag_name: str = "config") -> list[str]:
    """An absl ``flags_parser``: ``app.run(main, flags_parser=config_checks.parse_flags)``.

    Parses like absl's default; a bad ``--config``/``--config.*`` exits with one line
    (``error: ...``) instead of a chained traceback; other flag errors are reported as absl does.
    """
    from absl import flags

    argv = list(argv)
    try:
        args = flags.FLAGS(argv)
    except Exception as e:  # anything not about --config is re-raised below
        problem = flag_error(e, argv, flag_name=flag_name)
        if problem is None and not isinstance(e, flags.Error):
            raise
        line = str(problem) if problem is not None else " ".join(str(e).split())
        sys.stderr.write(f"error: {line}\nPass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(1)
    problem = _config_load_failure(flag_name)
    if problem is not None:
        sys.stderr.write(f"error: {problem}\n")
        sys.exit(1)
    return args
