"""The one training loop: state, sharding, checkpoints, logging, eval cadence, NaN checks, resume.

A stage (tokenizer, generator, post-training, CODA) subclasses :class:`Stage` and contributes only
its state initialisation, its pure train step and its evaluation; everything else happens here,
once.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from clu import metrics as clu_metrics

from tokpost_jax import checkpoint as ckpt_lib
from tokpost_jax import data as data_lib
from tokpost_jax import files, workdir_lock
from tokpost_jax import images as images_lib
from tokpost_jax import sharding as shd
from tokpost_jax.files import DiskFullError
from tokpost_jax.train import mfu as mfu_lib
from tokpost_jax.train.state import TrainState


class NonFiniteLossError(FloatingPointError):
    """The loss, a gradient/parameter norm or the state became NaN/Inf; the run stops without
    saving the bad state."""


class EvalResult(dict):
    """Scalars of one evaluation; ``images`` holds named uint8 grids [H, W, 3] to write as PNG."""

    def __init__(
        self, scalars: Mapping[str, float], images: Mapping[str, np.ndarray] | None = None
    ):
        super().__init__(scalars)
        self.images = dict(images or {})


class Stage(abc.ABC):
    """What a training stage contributes to the loop. Methods are pure functions of their inputs."""

    def __init__(
        self, config: ml_collections.ConfigDict, total_steps: int, mesh: jax.sharding.Mesh
    ):
        self.config = config
        self.total_steps = total_steps
        self.mesh = mesh

    @abc.abstractmethod
    def init(self, rng: jax.Array) -> TrainState:
        """A fresh state whose parameters carry ``nn.Partitioned`` logical-axis boxes."""

    @abc.abstractmethod
    def train_step(
        self, state: TrainState, batch: dict, rng: jax.Array, frozen: Any
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One update; ``rng`` is the run's base key (fold in ``state.step`` for per-step keys);
        ``frozen`` is :meth:`frozen_params`, passed as an argument so it is never a constant."""

    def frozen_params(self) -> Any:
        """Pretrained networks the step uses but never trains (LPIPS, discriminator backbone,
        semantic teacher): kept out of the train state and the checkpoints."""
        return {}

    @abc.abstractmethod
    def evaluate(self, state: TrainState, step: int, frozen: Any) -> dict[str, EvalResult]:
        """Evaluator name → result; called by the loop at its cadence with the on-device
        :meth:`frozen_params` the train step uses."""

    def throughput_scalars(self, images_per_second: float) -> dict[str, float]:
        """Extra throughput numbers to log (e.g. tokens/s and MFU); default none."""
        del images_per_second
        return {}

    def load_pretrained(self, state: TrainState) -> TrainState:
        """Imports external weights named by the config into a fresh state (default: none)."""
        return state

    def warm_start(self, state: TrainState, params: Any) -> TrainState:
        """Replaces parameters (and their EMA) with ``params`` from another run."""
        def put(tree: Any) -> Any:
            return jax.tree.map(
                lambda new, old: jax.device_put(np.asarray(new, old.dtype), old.sharding),
                tree,
                state.params,
            )

        # Separate buffers: the step donates the state, and one buffer cannot be donated twice.
        return state.replace(params=put(params), ema_params=put(params))


def total_steps_from_config(config: ml_collections.ConfigDict) -> int:
    """``num_epochs`` over the train split if set, else ``total_steps``."""
    if config.get("num_epochs"):
        n = data_lib.num_examples(config.data, config.data.train_split)
        return math.ceil(config.num_epochs * n / config.batch_size)
    return int(config.total_steps)


def _check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, rules: Any, what: str) -> None:
    shards = shd.batch_split_size(mesh, rules)
    if batch_size % jax.process_count() or batch_size % shards:
        raise ValueError(
            f"{what}={batch_size} must be divisible by the number of hosts "
            f"({jax.process_count()}) and of batch shards ({shards})."
        )


def _write_images(
    writer: metric_writers.MetricWriter,
    workdir: str,
    step: int,
    prefix: str,
    images: Mapping[str, np.ndarray],
) -> None:
    if not images:
        return
    writer.write_images(step, {f"{prefix}/{k}": v[None] for k, v in images.items()})
    if jax.process_index() == 0:
        out = files.join(workdir, "images")
        files.makedirs(out)
        for name, grid in images.items():
            images_lib.save_png(grid, files.join(out, f"{prefix}_{name}_{step:07d}.png"))


def run_evaluation(
    stage: Stage, state: TrainState, frozen: Any, step: int, writer: Any, workdir: str
) -> dict[str, EvalResult]:
    t0 = time.time()
    results = stage.evaluate(state, step, frozen)
    for name, res in results.items():
        writer.write_scalars(step, {f"{name}/{k}": v for k, v in res.items()})
        _write_images(writer, workdir, step, name, res.images)
        logging.info(
            "[eval %s @ %d] %s", name, step, ", ".join(f"{k}={v:.4g}" for k, v in res.items())
        )
    logging.info("Evaluation at step %d took %.1fs.", step, time.time() - t0)
    _append_eval_history(workdir, step, results)
    return results


def _summarize(collection: Any) -> dict[str, float]:
    return {k: float(v) for k, v in collection.compute().items()}


@dataclasses.dataclass(frozen=True)
class ShardedStage:
    """A stage's jitted init and step with explicit shardings (the loop, tests and benchmarks).

    Build it inside ``jax.set_mesh(mesh)`` and ``nn.logical_axis_rules(rules)``.
    """

    state_sharding: Any  # NamedShardings in the (unboxed) state's structure
    abstract_state: Any  # ShapeDtypeStructs carrying those shardings (checkpoint restore target)
    batch_sharding: jax.sharding.NamedSharding
    replicated: jax.sharding.NamedSharding
    init: Any  # rng → sharded, unboxed state
    step: Any  # (state, batch, rng, frozen) → (state, metrics); donates the state

    @classmethod
    def build(cls, stage: Stage, mesh: jax.sharding.Mesh, rules: Any) -> ShardedStage:
        # The key is made inside the trace: no eager op, so this also builds for the compile-only
        # devices of an ahead-of-time target (tokpost_jax.train.aot), where eager ops cannot run.
        abstract_boxed = jax.eval_shape(lambda: stage.init(jax.random.PRNGKey(0)))
        state_sharding = shd.logical_shardings(abstract_boxed, mesh, rules)
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            shd.strip_boxes(abstract_boxed),
            state_sharding,
        )
        batch_sharding = shd.batch_sharding(mesh, rules)
        repl = shd.replicated(mesh)
        init = jax.jit(lambda r: nn.unbox(stage.init(r)), out_shardings=state_sharding)
        step = jax.jit(
            stage.train_step,
            in_shardings=(state_sharding, batch_sharding, repl, repl),
            out_shardings=(state_sharding, repl),
            donate_argnums=(0,),
        )
        return cls(state_sharding, abstract, batch_sharding, repl, init, step)


def _flatten(results: Mapping[str, EvalResult]) -> dict[str, float]:
    return {f"{n}/{k}": v for n, r in results.items() for k, v in r.items()}


def _eval_log_path(workdir: str) -> str:
    return files.join(workdir, "eval_history.jsonl")


def _append_eval_history(workdir: str, step: int, results: Mapping[str, EvalResult]) -> None:
    """One JSON line per evaluated step, so first/final numbers survive restarts (process 0 only).

    A run resumed from a checkpoint older than its last evaluation evaluates that step again;
    the new line replaces the old one. The file is small and rewritten whole (atomically).
    """
    if jax.process_index() != 0:
        return
    rows = [r for r in eval_history(workdir) if r["step"] != step]
    rows.append({"step": step, **_flatten(results)})
    rows.sort(key=lambda r: r["step"])
    files.write_text(_eval_log_path(workdir), "".join(json.dumps(r) + "\n" for r in rows))


def eval_history(workdir: str) -> list[dict]:
    """All evaluations a run in ``workdir`` has logged, one per step (the latest), oldest first."""
    path = _eval_log_path(workdir)
    if not files.exists(path):
        return []
    by_step: dict[int, dict] = {}
    text = files.read_bytes(path).decode("utf-8", "replace")  # small: read whole, local or gs://
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            by_step[int(row["step"])] = row
        except (ValueError, KeyError, TypeError):  # a line cut by a kill (older versions)
            logging.warning("Skipping unreadable line %d of %s.", number, path)
    return [by_step[k] for k in sorted(by_step)]


class _Writer:
    """The metric writer, with a full disk (which clu raises one write later, from its
    background thread) turned into one line naming the directory."""

    def __init__(self, writer: metric_writers.MetricWriter, workdir: str):
        self._writer, self._workdir = writer, workdir

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._writer, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except Exception as e:
                if ckpt_lib.is_disk_full(e):
                    raise DiskFullError(
                        "no space left on device while writing TensorBoard summaries to "
                        f"{self._workdir}"
                    ) from None
                raise

        return call


def _guarded(metrics: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The step outputs that must be finite: the loss and every gradient/parameter norm (the
    norm of the *updated* parameters is what shows the state after the step is finite)."""
    return {
        k: v
        for k, v in metrics.items()
        if k == "loss" or k.endswith("grad_norm") or k.endswith("param_norm")
    }


def train(config: ml_collections.ConfigDict, workdir: str, stage_cls: type[Stage]) -> list[dict]:
    """Runs (or resumes) a stage to ``total_steps``; returns the run's evaluation history.

    Holds the workdir lock (:mod:`tokpost_jax.workdir_lock`) for the whole run, so a second run
    on the same workdir fails at once in one line naming the first.
    """
    with workdir_lock.hold(workdir), ckpt_lib.quiet_disk_full_logs():
        return _train(config, workdir, stage_cls)


def _train(config: ml_collections.ConfigDict, workdir: str, stage_cls: type[Stage]) -> list[dict]:
    files.makedirs(workdir)
    writer = _Writer(
        metric_writers.create_default_writer(
            workdir, just_logging=jax.process_index() > 0, asynchronous=True
        ),
        workdir,
    )
    rules = shd.rules_tuple(config.sharding_rules)
    mesh = shd.make_mesh(config.mesh)
    _check_batch_size(config.batch_size, mesh, rules, "batch_size")
    shd.warn_if_paper_scale_on_cpu(config)
    total_steps = total_steps_from_config(config)
    logging.info(
        "Mesh %s over %d devices (%d hosts); %d steps.",
        dict(mesh.shape),
        jax.device_count(),
        jax.process_count(),
        total_steps,
    )

    stage = stage_cls(config, total_steps, mesh)
    base_rng = jax.random.PRNGKey(config.seed)
    checkpointer = ckpt_lib.Checkpointer(
        files.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints
    )
    config_json = config.to_dict()
    step = 0
    train_iter = None
    failed = True
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            sharded = ShardedStage.build(stage, mesh, rules)
            restored = checkpointer.restore_latest(sharded.abstract_state, config_json)
            data_state: dict = {}
            # The newest checkpoint known to hold a finite state: the one resumed from (verified
            # on restore) or the last one saved by this run (checked before saving).
            last_good: int | None = None
            if restored is not None:
                start_step, state, data_state = restored
                last_good = start_step
                logging.info("Resumed from %s at step %d.", checkpointer.directory, start_step)
            else:
                start_step = 0
                state = stage.load_pretrained(sharded.init(jax.random.PRNGKey(config.seed)))
                if config.get("init_from") and config.init_from.get("workdir"):
                    src = files.join(config.init_from.workdir, "checkpoints")
                    params = ckpt_lib.load_params(src, key=config.init_from.params_key)
                    state = stage.warm_start(state, params)
                    logging.info("Warm-started %s from %s.", config.init_from.params_key, src)
            step = start_step

            if start_step == 0 and jax.process_index() == 0:
                parameter_overview.log_parameter_overview(jax.device_get(state.params))
                writer.write_hparams({"total_steps": total_steps, "batch_size": config.batch_size})

            train_iter = data_lib.make_train_iterator(
                config.data,
                seed=config.seed,
                host_batch_size=config.batch_size // jax.process_count(),
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
            if data_state:
                train_iter.set_state(data_state, step=start_step)

            batch_sharding, repl = sharded.batch_sharding, sharded.replicated
            frozen = jax.device_put(stage.frozen_params(), repl)
            compiled_step = None  # compiled at the first batch: its cost analysis gives MFU
            step_flops = None
            base_rng = jax.device_put(base_rng, repl)

            report = periodic_actions.ReportProgress(
                num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps
            )
            if start_step == 0 and config.get("eval_at_start", True):
                run_evaluation(stage, state, frozen, 0, writer, workdir)

            def known_good() -> str:
                if last_good is None:
                    return f"No checkpoint in {checkpointer.directory} is known to be finite."
                return (
                    f"The newest checkpoint known to be finite is step {last_good} in "
                    f"{checkpointer.directory} (left untouched)."
                )

            def check_finite(at: int, values: Mapping[str, jax.Array]) -> None:
                host = jax.device_get(dict(values))
                bad = [(k, float(v)) for k, v in host.items() if not np.isfinite(v)]
                if bad:
                    checkpointer.wait()
                    bad.sort(key=lambda kv: kv[0] != "loss")
                    what = ", ".join(f"{k} is {v}" for k, v in bad)
                    raise NonFiniteLossError(
                        f"{what} at step {at}; stopping without saving. " + known_good()
                    )

            def save(at: int) -> None:
                nonlocal last_good
                try:
                    checkpointer.save(at, state, train_iter.get_state(), config_json)
                except ckpt_lib.NonFiniteStateError as e:
                    checkpointer.wait()
                    raise NonFiniteLossError(
                        f"The state after step {at} holds {e.count} NaN/Inf value(s) in {e.leaf} "
                        "although the step's loss and norms were finite; stopping without "
                        "saving. " + known_good()
                    ) from None
                last_good = at

            accumulated = None
            pending: tuple[int, dict[str, jax.Array]] | None = None
            interval_t0, interval_start = time.time(), start_step

            for step in range(start_step + 1, total_steps + 1):
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    batch = shd.host_to_global(next(train_iter), batch_sharding)
                    if compiled_step is None:
                        lowered = sharded.step.lower(state, batch, base_rng, frozen)
                        compiled_step = lowered.compile()
                        step_flops = mfu_lib.compiled_flops(compiled_step)
                    state, metrics = compiled_step(state, batch, base_rng, frozen)
                # Check the previous step after dispatching this one: keeps the device busy.
                if pending is not None:
                    check_finite(*pending)
                pending = (step, _guarded(metrics))
                single = _collection_for(metrics).single_from_model_output(**metrics)
                accumulated = single if accumulated is None else accumulated.merge(single)
                report(step)

                if step % config.log_every_steps == 0 or step == total_steps:
                    check_finite(*pending)
                    checkpointer.check_for_errors()  # a failed background save, without waiting
                    scalars = _summarize(accumulated)
                    elapsed = time.time() - interval_t0
                    rate = (step - interval_start) * config.batch_size / max(elapsed, 1e-9)
                    scalars["img_per_sec"] = rate
                    scalars["eta_min"] = (total_steps - step) * config.batch_size / rate / 60
                    scalars.update(stage.throughput_scalars(rate))
                    scalars.update(mfu_lib.step_scalars(step_flops, rate / config.batch_size))
                    writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
                    writer.flush()  # a failed background write (full disk) surfaces here, now
                    logging.info(
                        "[train @ %d/%d] %s",
                        step,
                        total_steps,
                        ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()),
                    )
                    accumulated, interval_t0, interval_start = None, time.time(), step

                if step % config.checkpoint_every_steps == 0 or step == total_steps:
                    check_finite(*pending)
                    save(step)
                if step % config.eval_every_steps == 0 or step == total_steps:
                    run_evaluation(stage, state, frozen, step, writer, workdir)
            checkpointer.close()
            writer.flush()
        failed = False
    except ckpt_lib.CheckpointDiskFullError:
        raise
    except Exception as e:
        if not ckpt_lib.is_disk_full(e):
            raise
        what = str(e) if isinstance(e, DiskFullError) else f"no space left on device ({e})"
        raise DiskFullError(
            f"{what.splitlines()[0][:300]} at step {step}; {checkpointer.last_complete()}. Free "
            "space and rerun to resume."
        ) from None
    finally:
        _shut_down(checkpointer, writer, train_iter, quiet=failed)
    return eval_history(workdir)


def _shut_down(checkpointer: Any, writer: Any, train_iter: Any, *, quiet: bool) -> None:
    """Releases the run's resources; after a failure, their own errors (the same full disk,
    again) are logged in one line each instead of hiding the first one."""
    steps = [checkpointer.close, writer.flush]
    if hasattr(train_iter, "close"):  # grain worker processes and their shared memory
        steps.append(train_iter.close)
    for release in steps:
        try:
            release()
        except Exception as e:
            if not quiet:
                raise
            logging.warning("While stopping after an error: %s", str(e).splitlines()[0][:300])


_COLLECTIONS: dict[tuple[str, ...], Any] = {}


def _collection_for(metrics: Mapping[str, jax.Array]) -> Any:
    """A clu Collection averaging every scalar the step returns (cached per key set)."""
    keys = tuple(sorted(metrics))
    if keys not in _COLLECTIONS:
        _COLLECTIONS[keys] = clu_metrics.Collection.create(
            **{k: clu_metrics.Average.from_output(k) for k in keys}
        )
    return _COLLECTIONS[keys]
