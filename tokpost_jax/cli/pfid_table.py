r"""rFID / pFID / codebook usage of several tokenizers on one dataset split, as one table.

Each row is ``--tokenizer=NAME=CONFIG[:ARG]@WEIGHTS`` (repeat the flag). WEIGHTS is anything
``--weights`` of ``reconstruct`` takes (convert/tokenizer_weights.py): a tokpost run directory, a
released CODA folder or file, a RobusTok file or a LlamaGen VQ file; NAME (letters, digits, ``_``,
``-``) labels the row. Per-row config overrides are ``--set=NAME:KEY=VALUE`` (VALUE is a Python
literal, else a string); ``--set=all:KEY=VALUE`` applies to every row and ``--set=data:data.KEY=
VALUE`` to the shared data block.

COMMAND (a tokpost run against LlamaGen's released VQ-16 on ImageNet val, 5000 images):
  python -m tokpost_jax.cli.pfid_table \
      --tokenizer=ours=configs/robustok_imagenet.py@runs/robustok \
      --tokenizer=llamagen=configs/cnn_vq.py:llamagen_vq16@/weights/LlamaGen/vq_ds16_c2i.pt \
      --set=data:data.data_dir=/data/tfds --num_images=5000 --out=runs/pfid/table.json

One dataset split for every row: the ``data`` block of ``--data_config`` when given, else of the
first row's config (after its ``--set``), with ``--split`` (default: its ``eval_split``) and
``--num_images`` (default: that config's ``fid_eval.num_images``). A row whose config takes
another image size is refused, not resized: a tokenizer measured at a size it was not built for
is another number. Each row keeps its own model, pFID grid (``pfid.alphas`` × ``pfid.deltas_at_
16384`` scaled to its codebook) and ``fid_eval`` settings; pFID is always on.

Neighbours of the pFID perturbation: a run uses its config's ``pfid.neighbours``; a row read from
a released file uses ``code`` (code-to-code, robustok.md §7: the encoder feature a released
training perturbed around is not known; for CODA the code table is its value table, ``value``);
``--neighbours`` sets every row. The table states each row's choice and why.

Writes ``--out`` (JSON: the shared data, one entry per row with its spec and every metric),
``<out>.md`` beside it (the markdown table, also printed) and ``<out stem>_rows/NAME/`` (each
row's ``metrics.json`` and ``pfid_grid.png``). Every row is saved as soon as it is done, by atomic
writes; a rerun skips the rows already in the table with the same spec, and refuses a row of the
same name measured with another spec (or a table of other data). A run whose checkpoint advanced
since is not re-measured: delete its entry.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags, logging

from tokpost_jax import cli, config_checks, files
from tokpost_jax.config_checks import ConfigError

#: Row names that are not rows: ``--set`` targets.
ALL, DATA = "all", "data"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
#: ``--neighbours=code`` per tokenizer kind: the code-to-code table of a CODA tokenizer is its
#: value table (models/coda.py).
CODE_NEIGHBOURS = {"coda": "value"}
#: The table's columns: (metric, header, format).
COLUMNS = (
    ("rfid", "rFID", "{:.2f}"),
    ("pfid", "pFID", "{:.2f}"),
    ("codebook_usage", "usage", "{:.1%}"),
    ("codebook_perplexity", "perplexity", "{:.1f}"),
    ("psnr", "PSNR", "{:.2f}"),
)


class TableError(ConfigError):
    """A bad row spec, override or table file: one line naming it."""


def define_flags() -> dict[str, Any]:
    return {
        "tokenizer": flags.DEFINE_multi_string(
            "tokenizer", None,
            "A row: NAME=CONFIG[:ARG]@WEIGHTS (WEIGHTS: a tokpost run directory or a released "
            "CODA / RobusTok / LlamaGen file). Repeat for more rows.",
        ),
        "set": flags.DEFINE_multi_string(
            "set", [],
            "NAME:KEY=VALUE, a config override of row NAME (all: every row; data: the shared "
            "data block, keys data.*). VALUE is a Python literal, else a string.",
        ),
        "data_config": flags.DEFINE_string(
            "data_config", None,
            "CONFIG[:ARG] whose data block (and fid_eval.num_images) every row is measured on "
            "(default: the first row's config).",
        ),
        "split": flags.DEFINE_string("split", None, "Split (default: the data's eval_split)."),
        "num_images": flags.DEFINE_integer(
            "num_images", None, "First N images of the split (default: fid_eval.num_images)."
        ),
        "neighbours": flags.DEFINE_enum(
            "neighbours", None, ["feature", "code"],
            "pFID neighbours of every row (default: the config's for runs, code for files).",
        ),
        "params": flags.DEFINE_enum(
            "params", "ema_params", ["ema_params", "params"],
            "Which weights of a run; of a released training checkpoint, its ema or model copy.",
        ),
        "out": flags.DEFINE_string("out", None, "The table's JSON file (.md is written beside)."),
    }


# ---- specs -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One ``--tokenizer`` value, split."""

    name: str
    config: str
    weights: str


def parse_row(text: str) -> RowSpec:
    """``NAME=CONFIG[:ARG]@WEIGHTS`` → :class:`RowSpec`; anything else is one line."""
    form = "NAME=CONFIG[:ARG]@WEIGHTS"
    name, eq, rest = text.partition("=")
    config, at, weights = rest.partition("@")
    if not eq or not at:
        raise TableError(f"--tokenizer={text}: expected {form} (e.g. "
                         "ours=configs/tokenizer.py:demo@runs/tokenizer_demo)")
    if not NAME_RE.match(name) or name in (ALL, DATA):
        raise TableError(f"--tokenizer={text}: row name {name!r} must be letters, digits, _ or "
                         f"- and not {ALL!r} or {DATA!r}")
    if not config or not weights:
        raise TableError(f"--tokenizer={text}: empty {'CONFIG' if not config else 'WEIGHTS'} "
                         f"in {form}")
    return RowSpec(name, config, weights)


def parse_set(text: str) -> tuple[str, str, Any]:
    """``NAME:KEY=VALUE`` → (NAME, KEY, value): a Python literal, else the string as typed."""
    target, colon, assignment = text.partition(":")
    key, eq, raw = assignment.partition("=")
    if not colon or not eq or not key:
        raise TableError(f"--set={text}: expected NAME:KEY=VALUE (e.g. "
                         "all:fid_eval.batch_size=16)")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return target, key, value


def apply_override(config: Any, key: str, value: Any, where: str) -> None:
    """Sets dotted ``key`` of ``config`` (which must have it) to ``value``; one line if not."""
    missing = config_checks._missing_key(config, key, where)
    if missing is not None:
        raise missing
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    if hasattr(node[last], "keys"):
        raise TableError(f"{where}: config.{key} is a block; set its fields")
    try:
        node[last] = value
    except (TypeError, ValueError) as e:
        raise TableError(f"{where}: bad value {value!r} for config.{key} ("
                         f"{str(e).splitlines()[0]})") from e


def load_spec_config(spec: str, where: str) -> Any:
    """``CONFIG[:ARG]`` loaded unlocked; a missing file or bad variant is one line."""
    from tokpost_jax import config_lib

    path = spec.rsplit(":", 1)[0] if ":" in os.path.basename(spec) else spec
    if not os.path.exists(config_lib.resolve_config_path(path)):
        raise FileNotFoundError(f"{where}: no config file {path}")
    try:
        return config_lib.load_config_file(spec, lock=False)
    except Exception as e:  # a config's own check (unknown variant, ...) is the user's to fix
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        raise TableError(f"{where}: cannot load config {spec}: {type(e).__name__}: "
                         f"{lines[-1] if lines else 'no detail'}") from e


# ---- rows --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    """A row ready to measure: its eval config and what the table records about it."""

    spec: RowSpec
    config: Any
    source: str  # "run" or a release (convert.tokenizer_weights.RELEASES)
    neighbours: str
    neighbours_from: str  # "config", "file default" or "--neighbours"
    overrides: tuple[tuple[str, Any], ...]

    @property
    def where(self) -> str:
        return f"--tokenizer {self.spec.name}"

    def fingerprint(self, params_key: str) -> dict[str, Any]:
        """What makes two measurements of this row the same (compared on a rerun)."""
        from tokpost_jax.metrics.tokenizer import grid_from_config

        grid = grid_from_config(self.config.pfid, int(self.config.model.codebook_size))
        return {
            "config": self.spec.config,
            "weights": files.absolute(self.spec.weights),
            "overrides": [[k, repr(v)] for k, v in self.overrides],
            "params": params_key,
            "neighbours": self.neighbours,
            "alphas": list(grid.alphas),
            "deltas": list(grid.deltas),
            "exclude_clean": bool(grid.exclude_clean),
            "seed": int(self.config.fid_eval.seed),
            "inception_weights": self.config.fid_eval.inception_weights,
            "frechet_method": str(self.config.fid_eval.frechet_method),
        }


def build_rows(
    tokenizers: Sequence[str], sets: Sequence[str], *, data_config: str | None = None,
    split: str | None = None, num_images: int | None = None, neighbours: str | None = None,
) -> tuple[list[Row], dict[str, Any]]:
    """The rows (every spec, override, image size and weights path checked before anything is
    measured) and what the table records of the shared data (dataset, split, num_images, ...)."""
    import ml_collections

    from tokpost_jax.convert.tokenizer_weights import RELEASES, weights_source

    if not tokenizers:
        raise TableError("give at least one --tokenizer=NAME=CONFIG[:ARG]@WEIGHTS")
    specs = [parse_row(t) for t in tokenizers]
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TableError(f"--tokenizer: row name(s) {', '.join(dup)} given twice")
    overrides: dict[str, list[tuple[str, Any, str]]] = {}
    for text in sets:
        target, key, value = parse_set(text)
        if target not in (*names, ALL, DATA):
            raise TableError(f"--set={text}: no row {target!r} (rows: {', '.join(names)}; or "
                             f"{ALL}, {DATA})")
        if target == DATA and not key.startswith("data."):
            raise TableError(f"--set={text}: {DATA}: overrides the shared data block; its keys "
                             "start with data.")
        overrides.setdefault(target, []).append((key, value, f"--set={text}"))

    configs = []
    for s in specs:
        cfg = load_spec_config(s.config, f"--tokenizer {s.name}")
        for key, value, where in [*overrides.get(ALL, []), *overrides.get(s.name, [])]:
            apply_override(cfg, key, value, where)
        configs.append(cfg)
    base = load_spec_config(data_config, "--data_config") if data_config else configs[0]
    origin = f"--data_config={data_config}" if data_config else f"row {specs[0].name}'s config"
    if "data" not in base:
        raise TableError(f"{origin} has no data block")
    holder = ml_collections.ConfigDict({"data": base.data.to_dict()})
    for key, value, where in overrides.get(DATA, []):
        apply_override(holder, key, value, where)
    data = holder.data
    data.eval_split = split or data.eval_split
    if num_images is None:
        num_images = base.get("fid_eval", {}).get("num_images")
        if num_images is None:
            raise TableError(f"{origin} has no fid_eval.num_images: give --num_images")
    n = int(num_images)
    if n < 1:
        raise TableError(f"--num_images={n}: need at least 1 image")

    rows = []
    for s, cfg in zip(specs, configs, strict=True):
        where = f"--tokenizer {s.name}"
        size, want = int(cfg.data.image_size), int(data.image_size)
        if size != want:
            raise TableError(
                f"{where}: its config takes {size}x{size} images, the table's data ({origin}) "
                f"{want}x{want}; rows are not resized (a tokenizer at a size it was not built "
                "for is another number): measure rows of one image size together")
        kind = cfg.model.get("kind", "vit_vq")
        if cfg.model.get("codebook_size") is None:
            raise TableError(f"{where}: model.kind={kind!r} has no codebook (a continuous "
                             "tokenizer has no pFID)")
        source = weights_source(cfg, s.weights, f"{where}, weights")
        if neighbours is not None:
            chosen, why = neighbours, "--neighbours"
        elif source in RELEASES:
            chosen, why = "code", "file default"
        else:
            chosen, why = cfg.pfid.neighbours, "config"
        if chosen == "code":
            chosen = CODE_NEIGHBOURS.get(kind, "code")
        cfg.data = _copy(data)
        cfg.fid_eval.num_images = n
        cfg.fid_eval.pfid = True
        cfg.pfid.neighbours = chosen
        # pfid.neighbours is checked against the ViT/CNN names; CODA's own are checked by its
        # model (models/coda.py NEIGHBOURS).
        config_checks.check_config(cfg, for_evaluation=True,
                                   skip=("pfid.neighbours",) if kind == "coda" else ())
        cfg.lock()
        used = tuple((k, v) for k, v, _ in [*overrides.get(ALL, []), *overrides.get(s.name, [])])
        rows.append(Row(s, cfg, source, chosen, why, used))
    shared = {"dataset": str(data.name), "split": str(data.eval_split), "num_images": n,
              "image_size": int(data.image_size), "data_dir": data.get("data_dir"),
              "from": origin}
    return rows, shared


def _copy(block: Any) -> Any:
    import ml_collections

    return ml_collections.ConfigDict(block.to_dict())


# ---- the table ---------------------------------------------------------------------------------
def side_paths(out: str) -> tuple[str, str]:
    """(markdown path, per-row directory) beside ``out``."""
    stem = out[: -len(".json")] if out.endswith(".json") else out
    return stem + ".md", stem + "_rows"


def read_table(out: str, shared: Mapping[str, Any]) -> dict[str, Any]:
    """The table at ``out`` (a fresh one when absent); a table of other data is refused."""
    if not files.exists(out):
        return {"data": dict(shared), "rows": {}}
    try:
        table = files.read_json(out)
    except (OSError, ValueError) as e:
        raise TableError(f"--out={out}: not a readable table ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from e
    if not isinstance(table, dict) or not isinstance(table.get("rows"), dict):
        raise TableError(f"--out={out}: not a table this command wrote (no 'rows')")
    old = {k: v for k, v in table.get("data", {}).items() if k != "from"}
    new = {k: v for k, v in shared.items() if k != "from"}
    if old != new:
        diff = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
        raise TableError(f"--out={out} holds rows measured on other data (differs in "
                         f"{', '.join(diff)}: {[old.get(k) for k in diff]} there, "
                         f"{[new.get(k) for k in diff]} now); use another --out")
    return table


def markdown(table: Mapping[str, Any]) -> str:
    """The table as markdown: one line of data, the rows, the neighbour legend."""
    d = table["data"]
    lines = [
        f"Data: {d['dataset']}:{d['split']}, first {d['num_images']} images at "
        f"{d['image_size']}x{d['image_size']} (from {d['from']}). pFID: the mean FID over each "
        "row's α × δ grid (δ scaled to its codebook), every image perturbed.",
        "",
        "| tokenizer | weights | source | neighbours | " + " | ".join(c[1] for c in COLUMNS)
        + " | images |",
        "|" + "---|" * (5 + len(COLUMNS)),
    ]
    for name, row in table["rows"].items():
        m = row["metrics"]
        cells = [fmt.format(m[key]) if key in m else "-" for key, _, fmt in COLUMNS]
        lines.append(
            f"| {name} | {row['spec']['weights']} | {row['source']} | {row['neighbours']} "
            f"({row['neighbours_from']}) | " + " | ".join(cells) + f" | {int(m['num_images'])} |"
        )
    lines += [
        "",
        "Neighbours: feature = the δ codes nearest the encoder's continuous feature (official "
        "RobusTok); code = the δ codes nearest the assigned code (paper Eq. 4; the default for "
        "released files, whose training's feature is not known); value = CODA's code-to-code "
        "table.",
    ]
    return "\n".join(lines) + "\n"


def measure(rows: Sequence[Row], shared: Mapping[str, Any], out: str,
            params_key: str = "ema_params") -> dict[str, Any]:
    """Measures every row not yet in the table at ``out``, saving the table (JSON + markdown)
    after each; returns the table."""
    import jax

    from tokpost_jax.convert.tokenizer_weights import check_fits, load_weights
    from tokpost_jax.metrics import tokenizer as tok_metrics

    table = read_table(out, shared)
    md_path, rows_dir = side_paths(out)
    todo = []
    for row in rows:
        spec = row.fingerprint(params_key)
        done = table["rows"].get(row.spec.name)
        if done is None:
            todo.append(row)
            continue
        if done.get("spec") != spec:
            old = done.get("spec") or {}
            diff = sorted(k for k in {*old, *spec} if old.get(k) != spec.get(k))
            raise TableError(f"{row.where}: {out} holds a row {row.spec.name!r} measured with "
                             f"another {', '.join(diff)}; remove it from the file, rename the "
                             "row or use another --out")
        logging.info("%s: already in %s, skipped.", row.where, out)
        print(f"{row.spec.name}: already in the table, skipped.")
    for row in todo:
        where = f"{row.where}, weights"
        params = load_weights(row.config, row.spec.weights, params_key, flag=where)
        check_fits(row.config, params, row.spec.weights, flag=where)
        print(f"{row.spec.name}: measuring ({row.source}, neighbours {row.neighbours}) ...")
        metrics = tok_metrics.evaluate_params(
            row.config, params, files.join(rows_dir, row.spec.name), row.spec.weights
        )
        print(f"{row.spec.name}: rFID {metrics['rfid']:.2f}, pFID {metrics['pfid']:.2f}, usage "
              f"{metrics['codebook_usage']:.1%}")
        table["rows"][row.spec.name] = {
            "spec": row.fingerprint(params_key),
            "source": row.source,
            "neighbours": row.neighbours,
            "neighbours_from": row.neighbours_from,
            "metrics": {k: float(v) for k, v in metrics.items()},
        }
        if jax.process_index() == 0:
            files.write_json(out, table)
            files.write_text(md_path, markdown(table))
    if jax.process_index() == 0 and not files.exists(md_path):
        files.write_json(out, table)
        files.write_text(md_path, markdown(table))
    return table


def main(fl: dict[str, Any]) -> None:
    rows, shared = build_rows(
        fl["tokenizer"].value or [], fl["set"].value or [], data_config=fl["data_config"].value,
        split=fl["split"].value, num_images=fl["num_images"].value,
        neighbours=fl["neighbours"].value,
    )
    out = fl["out"].value
    table = measure(rows, shared, out, fl["params"].value)
    print(markdown(table), end="")
    print(f"Wrote {out} and {side_paths(out)[0]}.")


if __name__ == "__main__":
    cli.run(define_flags, main, required=("tokenizer", "out"))
