r"""A tokpost run's weights as an official torch state dict in one ``.safetensors`` file, so the
official code (its samplers, its evaluation) can load what this project trained.

Formats, chosen by the config:

* ``model.kind='vit_vq'`` (configs/tokenizer.py, robustok_imagenet.py, post_train.py): RobusTok's
  XQGAN-SC ``VQModel`` (convert/robustok_vit.py), with its level buffers and zero usage
  statistics. The official model built as released (``semantic_guide: dinov2``, RobusTok's
  configs) also holds its frozen training teacher, which is no part of the tokenizer:
  ``--teachers=main-train.pt`` (an official checkpoint of the same architecture; the teacher
  is frozen, so any of them holds the one the official code builds) copies its
  ``semantic_model.*`` / ``detail_model.*`` entries verbatim so that model loads strictly;
  without them, build the official model with ``semantic_guide: none`` and ``detail_guide:
  none`` (tokenizing and decoding never use the teacher) or load with ``strict=False``.
* ``model.kind='cnn_vq'`` (configs/cnn_vq.py): LlamaGen's ``VQModel`` (convert/llamagen_vq.py),
  with its zero ``codebook_used`` buffer.
* a generator config (``trainer='generator'``, configs/rar.py): bytedance/1d-tokenizer's ``RAR``
  (convert/rar.py); its ``attn_mask`` is a non-persistent buffer, in no state dict.

Other kinds (``coda``, ``klvae``) have no official layout here and are refused. Every tensor is
the run's value, exactly (float32 params stay float32); the file's metadata names the layout, the
run, the params copy and the step. ``--out`` is never overwritten unless ``--overwrite``; the
file appears only once complete. The importers (``load_robustok``, ``load_llamagen_vq``,
``load_rar``, so ``reconstruct --weights`` and ``score --weights``) read it back unchanged.

In torch: ``model.load_state_dict(safetensors.torch.load_file(path), strict=True)``. The official
scripts read ``torch.load`` files: RobusTok's ``sample_imagenet_rar.py`` takes the generator as a
bare state dict (``torch.save(load_file(path), "rar.bin")``) and the tokenizer as a training
checkpoint it reads ``["model"]`` then ``["ema"]`` of (``sd = load_file(path);
torch.save({"model": sd, "ema": sd}, "tokenizer.pt")``).

COMMAND (the demo tokenizer's EMA weights as a RobusTok VQModel):
  python -m tokpost_jax.cli.export --config=configs/tokenizer.py:demo \
      --workdir=runs/tokenizer_demo --out=runs/tokenizer_demo/robustok_vqmodel.safetensors

COMMAND (a RobusTok post-training run, for the official VQModel as RobusTok's
configs/generator/rar.yaml builds it, teacher included):
  python -m tokpost_jax.cli.export --config=configs/post_train.py:imagenet \
      --workdir=gs://bucket/post_train --teachers=/weights/RobusTok/main-train.pt \
      --out=gs://bucket/post_train/robustok_post.safetensors

COMMAND (a CNN VQ run's raw weights at step 2000 as a LlamaGen VQModel):
  python -m tokpost_jax.cli.export --config=configs/cnn_vq.py:micro \
      --workdir=runs/cnn_vq_micro --params=params --step=2000 --out=vq_micro.safetensors

COMMAND (a RAR-B run as the official RAR, for the official sampler):
  python -m tokpost_jax.cli.export --config=configs/rar.py:rar_b --workdir=gs://bucket/rar_b \
      --out=gs://bucket/rar_b/rar_b.safetensors
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from absl import flags, logging

from tokpost_jax import cli, files
from tokpost_jax.checkpoint import CheckpointError
from tokpost_jax.config_checks import ConfigError

SUFFIX = ".safetensors"
#: Layout names written to the file's metadata (``layout``), by what the config describes.
LAYOUTS = {
    "vit_vq": "robustok_vqmodel",  # Xudangliatiger/RobusTok tokenizer_image/xqgan_model.py
    "cnn_vq": "llamagen_vqmodel",  # FoundationVision/LlamaGen tokenizer_image/vq_model.py
    "generator": "rar",  # bytedance/1d-tokenizer modeling/rar.py
}


class ExportError(CheckpointError):
    """The run's weights cannot be written as the asked file (no run, a taken ``--out``, params
    that do not fit the config)."""


class Export(NamedTuple):
    """What :func:`export` wrote: the official state dict and the file's metadata."""

    state_dict: dict[str, np.ndarray]
    metadata: dict[str, str]


def define_flags() -> dict[str, Any]:
    return {
        **cli.define_config(
            "The run's config: a tokenizer (model.kind vit_vq / cnn_vq) or a generator.",
            ("tokenizer", "cnn_vq", "robustok_imagenet", "post_train", "rar"),
        ),
        "workdir": flags.DEFINE_string("workdir", None, "The tokpost run directory."),
        "out": flags.DEFINE_string("out", None, f"Output file (local or gs://), *{SUFFIX}."),
        "params": flags.DEFINE_enum(
            "params", None, ["ema_params", "params"],
            "Which weights of the run (default: the EMA copy when the config keeps one, "
            "optim.ema_decay > 0, else params).",
        ),
        "step": flags.DEFINE_integer("step", None, "Checkpoint step (default: latest readable)."),
        "teachers": flags.DEFINE_string(
            "teachers", None,
            "model.kind='vit_vq' only: a RobusTok VQModel file (.pt/.pth/.bin/.safetensors) "
            "whose frozen teachers (semantic_model.*, detail_model.*) are copied into --out, so "
            "the official model built with semantic_guide: dinov2 loads strictly.",
        ),
        "overwrite": flags.DEFINE_bool("overwrite", False, "Replace an existing --out."),
    }


def layout_of(config: Any) -> str:
    """The key of :data:`LAYOUTS` the config's model exports to; a ConfigError for the others."""
    if config.get("trainer") == "generator":
        return "generator"
    kind = config.model.get("kind", "vit_vq")
    if kind not in LAYOUTS or kind == "generator":
        raise ConfigError(
            f"model.kind={kind!r} has no official torch layout to export to; export takes "
            "model.kind 'vit_vq' (RobusTok VQModel), 'cnn_vq' (LlamaGen VQModel) or a generator "
            "config (trainer='generator', configs/rar.py: the official RAR)")
    return kind


def default_params_key(config: Any) -> str:
    """``ema_params`` when the config keeps an EMA (``optim.ema_decay`` > 0), else ``params``."""
    optim = config.get("optim")
    return "ema_params" if optim is not None and optim.get("ema_decay") else "params"


def _rar_mismatch(want: Mapping[str, tuple], got: Mapping[str, np.ndarray]) -> str | None:
    differ = [k for k in [*want, *(k for k in got if k not in want)]
              if want.get(k) != (tuple(got[k].shape) if k in got else None)]
    if not differ:
        return None
    k = differ[0]
    show = lambda s: "absent" if s is None else str(list(s))
    return (f"{k}: config {show(want.get(k))} vs run "
            f"{show(tuple(got[k].shape) if k in got else None)} ({len(differ)} entries differ)")


def official_state_dict(config: Any, params: Any) -> dict[str, np.ndarray]:
    """``params`` of the config's model in the official torch layout (names, shapes, buffers).

    A tree that does not fit the config's architecture is one RobusTokImportError /
    LlamaGenImportError / RARImportError naming the differences.
    """
    from tokpost_jax import sharding as shd
    from tokpost_jax.models import build

    params = shd.strip_boxes(params)
    layout = layout_of(config)
    if layout == "vit_vq":
        from tokpost_jax.convert import robustok_vit as rv

        return rv.flax_to_official(params, build.tokenizer(config))
    if layout == "cnn_vq":
        from tokpost_jax.convert import llamagen_vq as lg

        return lg.flax_to_official(params, build.tokenizer(config))
    from tokpost_jax.convert import rar as rc

    want = rc.official_shapes(build.generator(config))  # refuses scale_embed
    sd = rc.flax_to_official(params)
    where = _rar_mismatch(want, sd)
    if where is not None:
        raise rc.RARImportError(f"params do not fit the config's RAR: first mismatch {where}")
    return sd


def _convert_errors() -> tuple[type[Exception], ...]:
    from tokpost_jax.convert.llamagen_vq import LlamaGenImportError
    from tokpost_jax.convert.rar import RARImportError
    from tokpost_jax.convert.robustok_vit import RobusTokImportError

    return (RobusTokImportError, LlamaGenImportError, RARImportError)


def export(config: Any, workdir: str, out: str, *, params_key: str | None = None,
           step: int | None = None, overwrite: bool = False,
           teachers: str | None = None) -> Export:
    """Reads ``workdir``'s checkpoint and writes its official state dict to ``out`` (process 0;
    atomic), with the ``teachers`` file's teacher entries when given. Every check (config kind,
    ``--out``, the run, the teachers file) comes before the checkpoint is read."""
    import jax
    from safetensors.numpy import save

    from tokpost_jax.checkpoint import load_params

    layout = layout_of(config)
    if not out.endswith(SUFFIX):
        raise ExportError(f"--out={out}: the file is a safetensors state dict; name it *{SUFFIX}")
    if files.exists(out) and not overwrite:
        raise ExportError(f"--out={out} exists; pass --overwrite to replace it")
    if not files.exists(workdir):
        raise FileNotFoundError(f"--workdir={workdir}: no such directory")
    ckpt_dir = files.join(workdir, "checkpoints")
    if not files.isdir(ckpt_dir):
        raise ExportError(f"--workdir={workdir}: no checkpoints/ (not a tokpost run directory)")
    extra: dict[str, np.ndarray] = {}
    if teachers is not None:
        from tokpost_jax.convert import robustok_vit as rv

        if layout != "vit_vq":
            raise ExportError(f"--teachers applies to model.kind='vit_vq' (RobusTok VQModel); "
                              f"this config exports the {LAYOUTS[layout]} layout")
        if not files.isfile(teachers):
            raise FileNotFoundError(f"--teachers={teachers}: no such file")
        extra = rv.read_teachers(teachers)
    key = params_key or default_params_key(config)
    params, got_step = load_params(ckpt_dir, key=key, step=step, with_step=True)
    try:
        sd = official_state_dict(config, jax.device_get(params))
    except _convert_errors() as e:  # names and shapes
        raise ExportError(f"--workdir={workdir} step {got_step} ({key}) does not fit --config: "
                          f"{e}") from e
    sd.update(extra)
    metadata = {
        "format": "pt",  # the tensors' framework, as Hugging Face tools expect
        "layout": LAYOUTS[layout],
        "source": files.absolute(workdir),
        "step": str(got_step),
        "params": key,
    }
    if teachers is not None:
        metadata["teachers"] = files.absolute(teachers)
    if jax.process_index() == 0:
        files.write_bytes(out, save(sd, metadata=metadata))
    return Export(sd, metadata)


def main(fl: dict[str, Any]) -> None:
    config, out = fl["config"].value, fl["out"].value
    result = export(config, fl["workdir"].value, out, params_key=fl["params"].value,
                    step=fl["step"].value, overwrite=fl["overwrite"].value,
                    teachers=fl["teachers"].value)
    m = result.metadata
    count = sum(int(np.size(v)) for v in result.state_dict.values())
    logging.info("Exported %s step %s (%s) → %s.", m["source"], m["step"], m["params"], out)
    print(f"Done: {m['layout']} state dict, {len(result.state_dict)} tensors ({count:,} values) "
          f"from step {m['step']} ({m['params']}) → {out}")


if __name__ == "__main__":
    cli.run(define_flags, main, required=("config", "workdir", "out"))
