r"""Per-token log-probabilities and the mean NLL of a token file under a trained generator.

``--tokens`` is an ``.npz`` with ``tokens`` int [N, L] and ``labels`` (or ``label``) int [N];
``--out`` gets ``logprobs`` float32 [N, L] (``log p(t_j | t_<j, y)`` in raster order, the true
label, no guidance) and ``nll`` (their negated mean, nats per token), and the NLL is printed.
See tokpost_jax/metrics/likelihood.py.

The generator is a run's checkpoint (``--workdir``, its EMA params when it kept them) or an
official RAR state dict (``--weights``: ``rar_b.bin`` / ``rar_l.bin`` of bytedance/1d-tokenizer or
RobusTok, ``.safetensors`` or ``.npz``; read without torch by tokpost_jax/convert/rar.py). With
``--weights`` the architecture is ``--config``'s: the size from ``--config.model.size.*`` and
``--config.model.num_classes``, the codebook and token count from the tokenizer config
(``--config.tokenizer.model.*``); a mismatch names every misshaped key and the file's sizes.

COMMAND (the demo generator on its own val tokens):
  python -m tokpost_jax.cli.score --config=configs/rar.py:demo --workdir=runs/rar_demo \
      --tokens=val_tokens.npz --out=runs/rar_demo/val_scores.npz

COMMAND (RobusTok's released RAR-B on RobusTok tokens):
  python -m tokpost_jax.cli.score --config=configs/rar.py:rar_b --weights=rar_b.bin \
      --tokens=val_tokens.npz --out=rar_b_val_scores.npz
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from absl import flags

from tokpost_jax import cli, files


def define_flags() -> dict[str, Any]:
    return {
        **cli.define_config("The generator's config.", ("rar",)),
        "workdir": flags.DEFINE_string("workdir", None, "The generator run directory."),
        "weights": flags.DEFINE_string(
            "weights", None, "An official RAR state dict (rar_b.bin, .safetensors, .npz) "
            "instead of --workdir; the architecture comes from --config."),
        "params": flags.DEFINE_enum("params", None, ["ema_params", "params"],
                                    "With --workdir; default: EMA if the run kept one."),
        "tokens": flags.DEFINE_string("tokens", None, ".npz with tokens [N, L] and labels [N]."),
        "out": flags.DEFINE_string("out", None, "Output .npz (logprobs [N, L], nll)."),
        "batch_size": flags.DEFINE_integer("batch_size", 64, "Global scoring batch."),
    }


def read_tokens(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``tokens`` and ``labels`` (or ``label``) of an ``.npz``; a clear error otherwise."""
    from tokpost_jax.data import DataError

    with files.open_read(path) as f, np.load(f, allow_pickle=False) as z:
        names = list(z.files)
        label_key = next((k for k in ("labels", "label") if k in names), None)
        if "tokens" not in names or label_key is None:
            raise DataError(f"{path} must hold 'tokens' [N, L] and 'labels' [N]; it has {names}")
        return np.asarray(z["tokens"]), np.asarray(z[label_key])


def main(fl: dict[str, Any]) -> None:
    import flax.linen as nn
    import jax
    from absl import app

    from tokpost_jax import sharding as shd
    from tokpost_jax.checkpoint import load_params
    from tokpost_jax.metrics import likelihood
    from tokpost_jax.models import build

    config = fl["config"].value
    workdir, weights = fl["workdir"].value, fl["weights"].value
    if (workdir is None) == (weights is None):
        raise app.UsageError("give exactly one of --workdir (a run) and --weights (a file)")
    if weights is not None and fl["params"].value is not None:
        raise app.UsageError("--params chooses a run's params; it does not apply to --weights")
    tokens, labels = read_tokens(fl["tokens"].value)
    model = build.generator(config)
    if weights is not None:
        from tokpost_jax.convert.rar import load_rar

        params, key = load_rar(weights, model), f"official weights {weights}"
    else:
        key = fl["params"].value or ("ema_params" if config.optim.ema_decay else "params")
        params = load_params(files.join(workdir, "checkpoints"), key=key)
    mesh, rules = shd.make_mesh(config.mesh), shd.rules_tuple(config.sharding_rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        logprobs = likelihood.score_tokens(
            model, {"params": params}, tokens, labels,
            batch_size=fl["batch_size"].value, mesh=mesh, rules=rules,
        )
    nll = float(-logprobs.astype(np.float64).mean())
    if jax.process_index() == 0:
        buffer = io.BytesIO()
        np.savez(buffer, logprobs=logprobs, nll=np.float32(nll))
        files.write_bytes(fl["out"].value, buffer.getvalue())
    print(f"nll: {nll:.6f} nats/token over {logprobs.shape[0]} sequences of "
          f"{logprobs.shape[1]} tokens ({key})")


if __name__ == "__main__":
    cli.run(define_flags, main, required=("config", "tokens", "out"))
