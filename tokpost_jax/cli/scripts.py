"""Console scripts (``[project.scripts]`` in pyproject.toml): ``tokpost-train`` and the others.

Each runs its command module exactly as ``python -m <module>`` does (``runpy`` with
``run_name="__main__"``), so ``--help`` shows that module's docstring and flags, and the two ways
in cannot drift apart. The functions live here, not in the command modules, because a module
that is already imported cannot be run as ``__main__`` cleanly (runpy warns and executes it
twice).
"""

from __future__ import annotations

import runpy

#: Console script name → the command module it runs (``python -m <module>``).
COMMANDS: dict[str, str] = {
    "tokpost-train": "tokpost_jax.main",
    "tokpost-pipeline": "tokpost_jax.pipeline",
    "tokpost-evaluate": "tokpost_jax.cli.evaluate",
    "tokpost-eval-tokenizer": "tokpost_jax.cli.eval_tokenizer",
    "tokpost-eval-generator": "tokpost_jax.cli.eval_generator",
    "tokpost-pretokenize": "tokpost_jax.cli.pretokenize",
    "tokpost-pairs": "tokpost_jax.cli.pairs",
    "tokpost-reconstruct": "tokpost_jax.cli.reconstruct",
    "tokpost-compare": "tokpost_jax.cli.compare",
    "tokpost-coda-ablation": "tokpost_jax.cli.coda_ablation",
    "tokpost-aot-compile": "tokpost_jax.cli.aot_compile",
    "tokpost-score": "tokpost_jax.cli.score",
    "tokpost-export": "tokpost_jax.cli.export",
    "tokpost-pfid-table": "tokpost_jax.cli.pfid_table",
}


def run_module(module: str) -> None:
    """Runs ``module`` as the program (``sys.argv[0]`` becomes its file; the flags follow)."""
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def train() -> None:
    run_module(COMMANDS["tokpost-train"])


def pipeline() -> None:
    run_module(COMMANDS["tokpost-pipeline"])


def evaluate() -> None:
    run_module(COMMANDS["tokpost-evaluate"])


def eval_tokenizer() -> None:
    run_module(COMMANDS["tokpost-eval-tokenizer"])


def eval_generator() -> None:
    run_module(COMMANDS["tokpost-eval-generator"])


def pretokenize() -> None:
    run_module(COMMANDS["tokpost-pretokenize"])


def pairs() -> None:
    run_module(COMMANDS["tokpost-pairs"])


def reconstruct() -> None:
    run_module(COMMANDS["tokpost-reconstruct"])


def compare() -> None:
    run_module(COMMANDS["tokpost-compare"])


def coda_ablation() -> None:
    run_module(COMMANDS["tokpost-coda-ablation"])


def aot_compile() -> None:
    run_module(COMMANDS["tokpost-aot-compile"])


def score() -> None:
    run_module(COMMANDS["tokpost-score"])


def export() -> None:
    run_module(COMMANDS["tokpost-export"])


def pfid_table() -> None:
    run_module(COMMANDS["tokpost-pfid-table"])
