"""What every importer shares: Flax parameter trees as flat path → array maps, the one-line list
of bad keys that an import error names, and state dicts without DDP / torch.compile prefixes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
from flax import traverse_util


def flat_params(tree: Any) -> dict[tuple[str, ...], Any]:
    """``{(module, ..., leaf): array}`` of a (possibly boxed, possibly abstract) parameter tree."""
    return traverse_util.flatten_dict(nn.meta.unbox(tree))


def nest_params(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """The nested parameter dict of :func:`flat_params`' form."""
    return traverse_util.unflatten_dict(dict(flat))


def problem_list(title: str, items: Iterable[str], show: int = 12) -> str:
    """``title (n): a, b, … and k more``: every problem counted, the first ``show`` named."""
    items = list(items)
    if not items:
        return ""
    more = f" and {len(items) - show} more" if len(items) > show else ""
    return f"{title} ({len(items)}): {', '.join(items[:show])}{more}"


#: Name prefixes that DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) add to every key.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrappers(sd: Mapping[str, Any]) -> dict[str, Any]:
    """``sd`` without the wrapper prefixes shared by every key (nested wrappers too)."""
    sd = dict(sd)
    changed = True
    while changed and sd:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def pick_copy(
    flat: Mapping[str, Any], copies: tuple[str, ...], which: str, error: type[Exception]
) -> tuple[dict[str, Any], str]:
    """One model's state dict out of a flat training checkpoint that may hold several copies
    (``ema.encoder.*``, ``model.encoder.*``): (state dict, picked copy, "" for a bare dict).

    ``which``: "auto" (the first of ``copies`` present, else the dict itself) or one of
    ``copies``; a copy asked for and absent raises ``error`` naming the top-level names.
    """
    if which not in ("auto", *copies):
        raise error(f"which must be 'auto' or one of {copies}, got {which!r}")
    flat = strip_wrappers(flat)
    present = [c for c in copies if any(k.startswith(f"{c}.encoder.") for k in flat)]
    if which == "auto":
        which = present[0] if present else ""
    elif which not in present:
        tops = sorted({k.split(".", 1)[0] for k in flat})
        raise error(f"the checkpoint has no {which!r} copy of the tokenizer "
                    f"({which}.encoder.*); top-level names: {tops[:12]}")
    if not which:
        return dict(flat), ""
    prefix = f"{which}."
    picked = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    return strip_wrappers(picked), which
