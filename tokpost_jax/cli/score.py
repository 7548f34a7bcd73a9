r"""Per-token log-probabilities and the mean NLL of a token file under a trained generator.

``--tokens`` is an ``.npz`` with ``tokens`` int [N, L] and ``labels`` (or ``label``) int [N];
``--out`` gets ``logprobs`` float32 [N, L] (``log p(t_j | t_<j, y)`` in raster order, the true
label, no guidance) and ``nll`` (their negated mean, nats per token), and the NLL is printed.
See tokpost_jax/metrics/likelihood.py.

COMMAND (the demo generator on its own val tokens):
  python -m tokpost_jax.cli.score --config=configs/rar.py:demo --workdir=runs/rar_demo \
      --tokens=val_tokens.npz --out=runs/rar_demo/val_scores.npz
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
        "params": flags.DEFINE_enum("params", None, ["ema_params", "params"],
                                    "Default: EMA if the run kept one."),
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

    from tokpost_jax import sharding as shd
    from tokpost_jax.checkpoint import load_params
    from tokpost_jax.metrics import likelihood
    from tokpost_jax.models import build

    config = fl["config"].value
    tokens, labels = read_tokens(fl["tokens"].value)
    key = fl["params"].value or ("ema_params" if config.optim.ema_decay else "params")
    params = load_params(files.join(fl["workdir"].value, "checkpoints"), key=key)
    mesh, rules = shd.make_mesh(config.mesh), shd.rules_tuple(config.sharding_rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        logprobs = likelihood.score_tokens(
            build.generator(config), {"params": params}, tokens, labels,
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
    cli.run(define_flags, main, required=("config", "workdir", "tokens", "out"))
