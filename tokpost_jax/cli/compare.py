r"""One table over finished pipeline runs: tokenizer quality and generation before and after
decoder post-training, side by side (e.g. the ViT VQ tokenizer vs CODA on the same data).

COMMAND (after the pipeline runs it names; each ``name=workdir``):
  python -m tokpost_jax.cli.compare \
      --runs=vit=runs/pipeline_demo,coda=runs/coda_demo,coda_no_perturbation=runs/coda_noperturb

Rows come from each run's ``results.json`` (written by ``tokpost_jax.pipeline``): rFID, pFID and
codebook usage of the main tokenizer; gFID / sFID with the main decoder and with the
post-trained EMA decoder (the same token sequences); the gFID of uniformly random tokens through
the main decoder (the floor a generator must beat) when the run computed it. The numbers are
only comparable between runs with the same data, reference and sample counts: the table prints
the sample count of each row and refuses runs whose counts differ.
"""

from __future__ import annotations

from typing import Any

from absl import flags

from tokpost_jax import cli, files

COLUMNS = (
    ("rFID", lambda r: r["tokenizer_eval"].get("rfid")),
    ("pFID", lambda r: r["tokenizer_eval"].get("pfid")),
    ("usage", lambda r: 100 * r["tokenizer_eval"]["codebook_usage"]),
    ("gFID", lambda r: r["gfid_before"]["main"]["fid"]),
    ("gFID post-trained", lambda r: r["gfid_after"]["post_ema"]["fid"]),
    ("Δ gFID", lambda r: r["gfid_after"]["post_ema"]["fid"] - r["gfid_before"]["main"]["fid"]),
    ("sFID", lambda r: r["gfid_before"]["main"].get("sfid")),
    ("sFID post-trained", lambda r: r["gfid_after"]["post_ema"].get("sfid")),
    ("uniform-token floor", lambda r: r["gfid_before"].get("uniform_tokens", {}).get("fid")),
)


def define_flags() -> dict[str, Any]:
    return {
        "runs": flags.DEFINE_list("runs", None, "name=pipeline_workdir, comma-separated."),
        "out": flags.DEFINE_string("out", None, "Also write the table (markdown) here."),
    }


def read_runs(specs: list[str]) -> dict[str, dict]:
    runs = {}
    for spec in specs:
        name, sep, workdir = spec.partition("=")
        if not sep or not name or not workdir:
            from tokpost_jax.config_checks import ConfigValueError

            raise ConfigValueError("runs", spec, "must be name=pipeline_workdir")
        path = files.join(workdir, "results.json")
        if not files.exists(path):
            raise FileNotFoundError(f"{path}: not a finished pipeline run (no results.json)")
        runs[name] = files.read_json(path)
    return runs


def table(runs: dict[str, dict]) -> str:
    counts = {n: int(r["gfid_before"]["main"].get("num_samples", 0)) for n, r in runs.items()}
    if len(set(counts.values())) > 1:
        from tokpost_jax.config_checks import ConfigValueError

        raise ConfigValueError("runs", counts, "must all use the same number of gFID samples")
    lines = ["| run | " + " | ".join(c for c, _ in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for name, r in runs.items():
        cells = []
        for _, get in COLUMNS:
            try:
                value = get(r)
            except KeyError:
                value = None
            cells.append("–" if value is None else f"{value:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    n = next(iter(counts.values()), 0)
    lines.append("")
    lines.append(f"gFID over {n} class-balanced samples per row; lower is better.")
    return "\n".join(lines)


def main(fl: dict[str, Any]) -> None:
    from tokpost_jax import files

    text = table(read_runs(fl["runs"].value))
    print(text)
    if fl["out"].value:
        files.write_text(fl["out"].value, text + "\n")


if __name__ == "__main__":
    cli.run(define_flags, main, required=("runs",))
