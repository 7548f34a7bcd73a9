r"""The two-stage method as ordered, resumable stages, ending in the paper-style table.

tokenizer main training → rFID/pFID → gFID reference → pretokenization → generator training →
gFID → paired data (teacher forcing at σ) → decoder post-training → gFID again (EMA and raw
decoder). Each stage works in ``<workdir>/<stage>/`` and finishes by writing ``DONE.json`` with
its results; a rerun skips finished stages and resumes the unfinished one (the trainers, the
shard writers and the evaluators are all restartable), so a kill at any moment loses at most the
work since the last checkpoint or shard.

COMMAND (demo, CPU):
  python -m tokpost_jax.pipeline --config=configs/pipeline.py:demo --workdir=runs/pipeline_demo

With ``tokenizer_weights`` set (a released tokenizer file such as LlamaGen's ``vq_ds16_c2i.pt``,
or another run's directory) the tokenizer stage imports it instead of training: it writes the
imported weights as the stage's checkpoint (``params`` and ``ema_params``), so every later stage
reads an imported tokenizer exactly as a trained one, through the tokenizer interface.

A config with a ``diffusion`` block (configs/pipeline.py:diffusion_demo) runs the paper's SDEdit
variant for a continuous tokenizer instead (robustok.md §9.4, :class:`DiffusionPipeline`): KL-VAE
→ gFID reference → latent flow model → gFID → SDEdit pairs at σ → decoder post-training → gFID.

Writes ``<workdir>/results.md`` and ``results.json`` (rFID, pFID, gFID / sFID / precision /
recall without and with post-training) and ``<workdir>/samples_before_after.png``.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import flags, logging

from tokpost_jax import checkpoint as ckpt_lib
from tokpost_jax import cli, files, multihost, workdir_lock
from tokpost_jax import images as images_lib
from tokpost_jax import sharding as shd
from tokpost_jax.models import build

STAGES = (
    "tokenizer",
    "tokenizer_eval",
    "reference",
    "pretokenize",
    "generator",
    "gfid_before",
    "pairs",
    "post_train",
    "gfid_after",
)
#: The SDEdit variant's stages (:class:`DiffusionPipeline`).
DIFFUSION_STAGES = (
    "vae", "reference", "diffusion", "gfid_before", "pairs", "post_train", "gfid_after",
)


def _copy(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(cfg.to_dict())


def stage_done(directory: str) -> dict | None:
    """The results a finished stage wrote to ``<directory>/DONE.json``, or None."""
    path = files.join(directory, "DONE.json")
    if not files.exists(path):
        return None
    return files.read_json(path)


def run_stage(directory: str, name: str, fn: Callable[[], dict], what: str = "pipeline") -> dict:
    """Runs ``fn`` in ``directory`` once: a finished stage (its DONE.json) is skipped, an
    unfinished one reruns (the trainers, shard writers and evaluators resume themselves).

    Process 0 decides whether the stage is done (its disk holds DONE.json) and every process
    gets its answer, so hosts never disagree about which stage runs."""
    finished = multihost.decided_by_process0(lambda: stage_done(directory))
    if finished is not None:
        logging.info("Stage %s: done before, skipped.", name)
        print(f"[{what}] {name}: done (skipped)", flush=True)
        return finished
    files.makedirs(directory)
    print(f"[{what}] {name}: running", flush=True)
    t0 = time.time()
    result = fn()
    result = {**result, "seconds": round(time.time() - t0, 1)}
    if jax.process_index() == 0:
        files.write_json(files.join(directory, "DONE.json"), result)
    print(f"[{what}] {name}: finished in {result['seconds']:.0f}s", flush=True)
    return result


class Pipeline:
    """Stage configs derived from one pipeline config; every path under one workdir."""

    #: (the floor row's name in gfid_before, the config flag that asks for it)
    FLOOR = ("uniform_tokens", "uniform_token_baseline")

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config = config
        self.workdir = files.absolute(workdir)  # a gs:// workdir stays a URL
        tok = self.tokenizer = _copy(config.tokenizer)
        # A CODA pipeline trains its continuous VAE first; the tokenizer adapts that run.
        self.vae = _copy(config.vae) if "vae" in config else None
        self.stages = (("vae",) if self.vae is not None else ()) + STAGES
        if self.vae is not None:
            tok.model.vae_init = self.dir("vae")
        # What links the stages is filled in here, from the tokenizer's config.
        g = self.generator = _copy(config.generator)
        g.tokenizer = _copy(tok)
        g.tokenizer_workdir = self.dir("tokenizer")
        g.data.data_dir = self.dir("pretokenize")
        g.data.image_size = tok.data.image_size
        # A configured reference (e.g. ADM's VIRTUAL_imagenet256_labeled.npz) wins; without one
        # the pipeline writes one from the tokenizer data's eval split (the "reference" stage).
        self.own_reference = not g.gfid.reference
        if self.own_reference:
            g.gfid.reference = self.reference_path
        p = self.post = self.linked_post_train(tok, "tokenizer")
        self.tokenizer_weights = config.get("tokenizer_weights") or None
        if self.tokenizer_weights and p.post.get("reuse_discriminator"):
            from tokpost_jax.config_checks import ConfigValueError

            raise ConfigValueError(
                "post_train.post.reuse_discriminator", True, "must be False with "
                f"tokenizer_weights={self.tokenizer_weights}: an imported tokenizer brings no "
                "discriminator to reuse, so post-training starts it fresh",
            )
        self.mesh = shd.make_mesh(config.mesh)
        self.rules = shd.rules_tuple(config.sharding_rules)

    def dir(self, stage: str) -> str:
        return files.join(self.workdir, stage)

    def linked_post_train(
        self, source: ml_collections.ConfigDict, stage: str
    ) -> ml_collections.ConfigDict:
        """``config.post_train`` linked to the autoencoder it post-trains: ``source``'s model
        and (as eval data) real images, warm-started from ``stage``, trained on the pairs."""
        p = _copy(self.config.post_train)
        p.model = _copy(source.model)
        p.eval_data = _copy(source.data)
        p.data.image_size = source.data.image_size
        p.init_from.workdir = self.dir(stage)
        p.data.data_dir = self.dir("pairs")
        return p

    @property
    def gfid_config(self) -> ml_collections.ConfigDict:
        """The generator's gFID settings (the reference stage writes its reference)."""
        return self.generator.gfid

    @property
    def image_data(self) -> ml_collections.ConfigDict:
        """The real images of the pipeline (the gFID reference is their eval split)."""
        return self.tokenizer.data

    @property
    def reference_path(self) -> str:
        return files.join(self.dir("reference"), "reference.npz")

    # ---- stage bookkeeping ---------------------------------------------------------------------
    def done(self, stage: str) -> dict | None:
        return stage_done(self.dir(stage))

    def run_stage(self, stage: str, fn: Callable[[], dict]) -> dict:
        return run_stage(self.dir(stage), stage, fn)

    # ---- stages --------------------------------------------------------------------------------
    def _train(self, config: ml_collections.ConfigDict, stage: str) -> dict:
        from tokpost_jax.train.loop import train
        from tokpost_jax.train.registry import stage_class

        history = train(config, self.dir(stage), stage_class(config.trainer))
        return {"final_eval": history[-1] if history else {}}

    def train_vae(self) -> dict:
        return self._train(self.vae, "vae")

    def train_tokenizer(self) -> dict:
        if self.tokenizer_weights:
            return self.import_tokenizer(self.tokenizer_weights)
        return self._train(self.tokenizer, "tokenizer")

    def import_tokenizer(self, path: str) -> dict:
        """The tokenizer stage from a file: ``path``'s weights (read by
        ``convert.tokenizer_weights``, checked against the config's sizes) written as the
        stage's step-0 checkpoint; the file's EMA copy is ``ema_params`` where it has one."""
        from tokpost_jax.convert import tokenizer_weights as tw

        flag = "--config.tokenizer_weights"
        source = tw.weights_source(self.tokenizer, path, flag)
        trees = {key: tw.load_weights(self.tokenizer, path, key, flag=flag)
                 for key in ("params", "ema_params")}
        for tree in trees.values():
            tw.check_fits(self.tokenizer, tree, path, flag)
        checkpointer = ckpt_lib.Checkpointer(
            files.join(self.dir("tokenizer"), "checkpoints"), asynchronous=False
        )
        try:
            checkpointer.save(
                0, {"step": np.zeros((), np.int32), **trees}, {},
                {"tokenizer_weights": path, "model": self.tokenizer.model.to_dict()},
            )
        finally:
            checkpointer.close()
        count = sum(int(np.size(x)) for x in jax.tree.leaves(trees["ema_params"]))
        return {"imported": path, "source": source, "num_params": count}

    def evaluate_tokenizer(self) -> dict:
        from tokpost_jax.metrics.tokenizer import evaluate_checkpoint

        return evaluate_checkpoint(
            self.tokenizer, self.dir("tokenizer"), "ema_params", self.dir("tokenizer_eval")
        )

    def make_reference(self) -> dict:
        from tokpost_jax.metrics import features, reference

        g = self.gfid_config
        if not self.own_reference:
            return {"reference": g.reference, "split": "configured file"}
        extractor = features.InceptionExtractor(
            self.mesh, self.rules, batch_size=g.batch_size, weights_path=g.inception_weights
        )
        data = self.image_data
        acts, _ = reference.split_reference(
            data, data.eval_split, extractor, num_images=g.num_reference
        )
        if jax.process_index() == 0:
            acts.save_npz(self.reference_path)
        return {
            "reference": self.reference_path,
            "num_images": acts.count,
            "split": f"{data.name}:{data.eval_split}",
        }

    def pretokenize(self) -> dict:
        from tokpost_jax.datagen.tokens import pretokenize

        params = self.tokenizer_params("tokenizer")
        p = self.config.pretokenize
        result = pretokenize(
            self.tokenizer, params, self.dir("pretokenize"), split=self.tokenizer.data.train_split,
            mode=p.mode, batch_size=p.batch_size, mesh=self.mesh, rules=self.rules,
        )
        return {"num_records": result.num_records, "mode": p.mode}

    def train_generator(self) -> dict:
        self._train(self.generator, "generator")
        return {"steps": int(self.generator.total_steps)}

    def tokenizer_params(self, stage: str, key: str = "ema_params") -> Any:
        return ckpt_lib.load_params(files.join(self.dir(stage), "checkpoints"), key=key)

    def generator_params(self) -> Any:
        key = "ema_params" if self.generator.optim.ema_decay else "params"
        return ckpt_lib.load_params(files.join(self.dir("generator"), "checkpoints"), key=key)

    def _evaluator(self):
        from tokpost_jax.metrics import generation

        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return generation.evaluator_from_config(
                self.generator, build.generator(self.generator), self.mesh
            )

    def _gfid(self, stage: str, decoders: dict[str, Any]) -> dict:
        """gFID of the generator's samples decoded by each named tokenizer parameter set; the
        sampler seed is fixed, so every decoder renders the same token sequences."""
        ev = self._evaluator()
        gen_params = self.generator_params()
        num_samples = self.gfid_config.num_samples
        out: dict[str, Any] = {}
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            for name, tok_params in decoders.items():
                metrics, samples = ev.run(
                    gen_params, num_samples=num_samples,
                    decoder_params=None if tok_params is None
                    else jax.device_put(tok_params, shd.replicated(self.mesh)),
                )
                out[name] = metrics
                if jax.process_index() == 0:
                    buffer = io.BytesIO()
                    np.savez(buffer, samples)
                    files.write_bytes(
                        files.join(self.dir(stage), f"samples_{name}.npz"), buffer.getvalue()
                    )
                    images_lib.save_png(
                        ev.grid(samples[: self.config.num_grid_images]),
                        files.join(self.dir(stage), f"samples_{name}.png"),
                    )
            floor, flag = self.FLOOR
            if stage == "gfid_before" and self.config[flag]:
                out[floor], _ = ev.run_floor(num_samples=num_samples)
        return out

    def gfid_before(self) -> dict:
        # None: the evaluator's own tokenizer (the main run's EMA weights, already loaded).
        return self._gfid("gfid_before", {"main": None})

    def make_pairs(self) -> dict:
        from tokpost_jax.datagen.pairs import generate_pairs

        p = self.post.post
        s = self.generator.sampling
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            result = generate_pairs(
                self.tokenizer, self.tokenizer_params("tokenizer"),
                build.generator(self.generator), {"params": self.generator_params()},
                self.dir("pairs"), split=p.source_split, num_images=p.num_images,
                sigma=p.sigma, seed=p.seed,
                sampling=dict(guidance=s.guidance, power=s.power, temperature=s.temperature,
                              top_k=s.top_k, top_p=s.top_p),
                batch_size=p.batch_size, mesh=self.mesh, rules=self.rules,
                gt_max_side=p.get("gt_max_side", 0),
            )
        return {"num_records": result.num_records, "sigma": p.sigma}

    def post_train(self) -> dict:
        return self._train(self.post, "post_train")

    def gfid_after(self) -> dict:
        decoders = {"post_ema": self.tokenizer_params("post_train", "ema_params")}
        if self.config.gfid_raw_decoder:
            decoders["post_raw"] = self.tokenizer_params("post_train", "params")
        return self._gfid("gfid_after", decoders)

    # ---- the whole thing ---------------------------------------------------------------------
    def run(self) -> dict:
        files.makedirs(self.workdir)
        with workdir_lock.hold(self.workdir):
            return self._run()

    def _run(self) -> dict:
        steps = self.step_functions()
        results = {stage: self.run_stage(stage, steps[stage]) for stage in self.stages}
        return self.finish(results)

    def step_functions(self) -> dict[str, Callable[[], dict]]:
        return {
            "vae": self.train_vae,
            "tokenizer": self.train_tokenizer,
            "tokenizer_eval": self.evaluate_tokenizer,
            "reference": self.make_reference,
            "pretokenize": self.pretokenize,
            "generator": self.train_generator,
            "gfid_before": self.gfid_before,
            "pairs": self.make_pairs,
            "post_train": self.post_train,
            "gfid_after": self.gfid_after,
        }

    def table(self, results: dict) -> str:
        return results_table(results)

    def finish(self, results: dict) -> dict:
        """results.json, results.md and the before / after grids; prints the table."""
        table = self.table(results)
        if jax.process_index() == 0:
            files.write_json(files.join(self.workdir, "results.json"), results)
            files.write_text(files.join(self.workdir, "results.md"), table + "\n")
            self.side_by_side()
        print(table, flush=True)
        return results

    def side_by_side(self) -> None:
        """Before / after grids of the same token sequences, next to each other."""
        from PIL import Image

        paths = [files.join(self.dir("gfid_before"), "samples_main.png"),
                 files.join(self.dir("gfid_after"), "samples_post_ema.png")]
        if not all(files.exists(p) for p in paths):
            return
        grids = []
        for p in paths:
            with files.open_read(p) as f, Image.open(f) as pil:
                grids.append(np.asarray(pil.convert("RGB")))
        h = max(g.shape[0] for g in grids)
        pad = np.full((h, 8, 3), 255, np.uint8)
        padded = [np.pad(g, ((0, h - g.shape[0]), (0, 0), (0, 0)), constant_values=255)
                  for g in grids]
        images_lib.save_png(np.concatenate([padded[0], pad, padded[1]], axis=1),
                            files.join(self.workdir, "samples_before_after.png"))


class DiffusionPipeline(Pipeline):
    """Post-training a continuous tokenizer with a diffusion generator (robustok.md §9.4).

    The KL-VAE is the tokenizer: the flow model learns its normalised latents, the SDEdit pairs
    noise a real image's posterior mean to t = 1 − σ and integrate it back with the model, and
    post-training teaches the VAE decoder to map those generated latents to the real images
    (encoder and quant_conv frozen bit for bit, so the model's latents stay valid).
    """

    FLOOR = ("gaussian_latents", "gaussian_latent_baseline")

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config = config
        self.workdir = files.absolute(workdir)
        self.stages = DIFFUSION_STAGES
        v = self.vae = _copy(config.vae)
        d = self.diffusion = _copy(config.diffusion)
        d.vae = _copy(v.model)
        d.vae_init = self.dir("vae")
        d.data = _copy(v.data)
        self.own_reference = not d.gfid.reference
        if self.own_reference:
            d.gfid.reference = self.reference_path
        self.post = self.linked_post_train(v, "vae")
        self.mesh = shd.make_mesh(config.mesh)
        self.rules = shd.rules_tuple(config.sharding_rules)

    @property
    def gfid_config(self) -> ml_collections.ConfigDict:
        return self.diffusion.gfid

    @property
    def image_data(self) -> ml_collections.ConfigDict:
        return self.vae.data

    def link_latent_scale(self, vae_result: dict) -> float:
        """``diffusion.latent.scale``: ``latent_scale`` if set, else 1 / the VAE run's final EMA
        val latent std (LDM's scale_factor), so the model sees unit-std latents."""
        scale = self.config.get("latent_scale")
        if not scale:
            std = vae_result.get("final_eval", {}).get("val_ema/latent_std")
            if not std or not np.isfinite(std) or std <= 0:
                raise ckpt_lib.CheckpointError(
                    f"{self.dir('vae')}/DONE.json has no positive final val_ema/latent_std "
                    f"(got {std!r}); set --config.latent_scale"
                )
            scale = 1.0 / float(std)
        self.diffusion.latent.scale = float(scale)
        return float(scale)

    def _run(self) -> dict:
        steps = self.step_functions()
        results = {"vae": self.run_stage("vae", steps["vae"])}
        scale = self.link_latent_scale(results["vae"])
        logging.info("Diffusion latent scale %.6g.", scale)
        for stage in self.stages[1:]:
            results[stage] = self.run_stage(stage, steps[stage])
        return self.finish(results)

    def step_functions(self) -> dict[str, Callable[[], dict]]:
        return {
            "vae": self.train_vae,
            "reference": self.make_reference,
            "diffusion": self.train_diffusion,
            "gfid_before": self.gfid_before,
            "pairs": self.make_pairs,
            "post_train": self.post_train,
            "gfid_after": self.gfid_after,
        }

    def train_diffusion(self) -> dict:
        result = self._train(self.diffusion, "diffusion")
        return {**result, "latent_scale": float(self.diffusion.latent.scale),
                "steps": int(self.diffusion.total_steps)}

    def generator_params(self) -> Any:
        key = "ema_params" if self.diffusion.optim.ema_decay else "params"
        return ckpt_lib.load_params(files.join(self.dir("diffusion"), "checkpoints"), key=key)

    def _evaluator(self):
        from tokpost_jax.metrics import generation

        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            vae_params = jax.device_put(
                self.tokenizer_params("vae"), shd.replicated(self.mesh)
            )
            return generation.diffusion_evaluator_from_config(
                self.diffusion, build.diffusion(self.diffusion), vae_params, self.mesh
            )

    def make_pairs(self) -> dict:
        from tokpost_jax.datagen.sdedit_pairs import generate_sdedit_pairs

        p = self.post.post
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            result = generate_sdedit_pairs(
                self.diffusion, self.tokenizer_params("vae"),
                {"params": self.generator_params()}, self.dir("pairs"),
                split=p.source_split, num_images=p.num_images, sigma=p.sigma, seed=p.seed,
                batch_size=p.batch_size, mesh=self.mesh, rules=self.rules,
            )
        return {"num_records": result.num_records, "sigma": p.sigma}

    def table(self, results: dict) -> str:
        vae = results["vae"].get("final_eval", {})
        post = results["post_train"].get("final_eval", {})
        n = int(self.vae.data.num_eval_examples or 0)
        lines = [
            f"KL-VAE: EMA val PSNR {vae.get('val_ema/psnr', float('nan')):.2f} dB, latent std "
            f"{vae.get('val_ema/latent_std', float('nan')):.3f} (model scale "
            f"{results['diffusion']['latent_scale']:.4g}); post-trained EMA decoder on real "
            f"latents: PSNR {post.get('val_ema/psnr', float('nan')):.2f} dB"
            + (f" ({n} val images)" if n else ""),
            f"Flow model: {results['diffusion']['steps']} steps; SDEdit pairs at σ = "
            f"{results['pairs']['sigma']} from {results['pairs']['num_records']} train images.",
            "",
            *gfid_table(results, ("gaussian_latents", "N(0, I) latents decoded (floor)"),
                        same="sampled latents"),
        ]
        return "\n".join(lines)


def pipeline_class(config: ml_collections.ConfigDict) -> type[Pipeline]:
    """The SDEdit variant for a config with a ``diffusion`` block, else the token pipeline."""
    return DiffusionPipeline if "diffusion" in config else Pipeline


_COLUMNS = (("fid", "gFID"), ("sfid", "sFID"), ("precision", "Precision"), ("recall", "Recall"),
            ("inception_score", "IS"))


def gfid_table(
    results: dict, floor: tuple[str, str] = ("uniform_tokens", "uniform random tokens (floor)"),
    same: str = "token sequences",
) -> list[str]:
    """The gFID rows (markdown lines): before, after (EMA and raw decoder), the floor."""
    rows = [("no post-training", results["gfid_before"]["main"]),
            ("+ post-training (EMA decoder)", results["gfid_after"]["post_ema"])]
    if "post_raw" in results["gfid_after"]:
        rows.append(("+ post-training (raw decoder)", results["gfid_after"]["post_raw"]))
    if floor[0] in results["gfid_before"]:
        rows.append((floor[1], results["gfid_before"][floor[0]]))
    cols = [c for c in _COLUMNS if c[0] in rows[0][1]]
    lines = [
        "| decoder | " + " | ".join(name for _, name in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for label, m in rows:
        lines.append(f"| {label} | " + " | ".join(f"{m[k]:.3f}" for k, _ in cols) + " |")
    n = int(rows[0][1].get("num_samples", 0))
    lines.append("")
    lines.append(f"gFID over {n} class-balanced samples; the same {same} for every row.")
    ref = results.get("reference", {})
    if ref.get("reference"):
        where = ref.get("split", "")
        lines.append(f"Reference: {ref['reference']}" + (f" ({where})" if where else "") + ".")
    return lines


def results_table(results: dict) -> str:
    """The paper-style table (markdown) from the stages' results."""
    tok = results["tokenizer_eval"]
    return "\n".join([
        f"Tokenizer: rFID {tok['rfid']:.2f}, pFID {tok.get('pfid', float('nan')):.2f}, "
        f"PSNR {tok['psnr']:.2f} dB, SSIM {tok['ssim']:.3f}, codebook usage "
        f"{100 * tok['codebook_usage']:.1f}% ({int(tok['num_images'])} images)",
        "",
        *gfid_table(results),
    ])


def define_flags() -> dict[str, Any]:
    return {
        **cli.define_config("The pipeline's config.", ("pipeline",)),
        "workdir": flags.DEFINE_string(
            "workdir", None, "Directory for every stage of the pipeline (a rerun resumes)."
        ),
    }


def main(fl: dict[str, Any]) -> None:
    from tokpost_jax import config_checks

    config = fl["config"].value
    config_checks.check_pipeline_config(config)
    pipeline_class(config)(config, fl["workdir"].value).run()


if __name__ == "__main__":
    cli.run(define_flags, main, required=("config", "workdir"))
