"""RAR / RobusTok pretokenized ``.jsonl`` files as a random-access source of token records.

The official pretokenization scripts (``bytedance/1d-tokenizer``, ``Xudangliatiger/RobusTok``)
write one JSON object per line, ``{"class_id": int, "tokens": [int, ...]}`` (the token list may
be nested, e.g. ``[[...]]`` for a [1, L] code tensor). Released files such as RobusTok's
``RobustTok-half-pretokenized.jsonl`` then train this project's generator directly
(``config.data.name='jsonl'``), with records shaped as ``cli.pretokenize`` writes them:
``{'tokens': int32 [L], 'label': int32}``.

Why an index of line offsets and not a parse of the whole file: a ten-crop ImageNet file holds
12.8M lines (tens of GB as text); the index is 8 bytes a line, and each record is parsed when
grain asks for it, so any host and any grain worker reads only its own share.
"""

from __future__ import annotations

import json
import os
import threading
from typing import IO, Any

import numpy as np

from tokpost_jax import files
from tokpost_jax.data.shards import FieldSpec
from tokpost_jax.data.sources import BadRecordError, DataError

#: Bytes scanned per read while indexing the lines.
_INDEX_CHUNK = 64 << 20


def jsonl_path(data_dir: str, split: str) -> str:
    """``data_dir`` itself when it names a ``.jsonl`` file (one file for every split, as the
    released files are), else ``<data_dir>/<split>.jsonl``."""
    if str(data_dir).endswith(".jsonl"):
        return str(data_dir)
    return files.join(data_dir, f"{split}.jsonl")


def _line_spans(f: IO[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of every non-empty line, newline excluded, scanned in chunks."""
    starts, ends, offset = [np.zeros(1, np.int64)], [], 0
    while True:
        chunk = f.read(_INDEX_CHUNK)
        if not chunk:
            break
        newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n")) + offset
        ends.append(newlines)
        starts.append(newlines + 1)
        offset += len(chunk)
    start = np.concatenate(starts)
    end = np.concatenate([*ends, np.asarray([offset], np.int64)])
    length = end - start
    keep = length > 0
    return start[keep], length[keep]


class JsonlTokenSource:
    """One ``.jsonl`` token file as a grain source of ``{'tokens', 'label'}`` records.

    Every line must hold ``class_id`` and ``tokens`` with the first line's token count;
    a line that does not is a :class:`BadRecordError` naming its line number.
    """

    def __init__(self, path: str | os.PathLike):
        self.directory = os.fspath(path)  # the name ShardSource's callers print in errors
        if not files.isfile(self.directory):
            raise DataError(
                f"token file {self.directory!r} does not exist: config.data.data_dir must name a "
                "pretokenized .jsonl file (or a directory holding <split>.jsonl)"
            )
        with files.path(self.directory).open("rb") as f:
            self._starts, self._lengths = _line_spans(f)
        if len(self._starts) == 0:
            raise DataError(f"token file {self.directory!r} holds no records")
        self._init_handle()
        first = self._parse(0)
        self.num_tokens = int(first["tokens"].shape[0])
        self.fields = {
            "tokens": FieldSpec(np.int32, (self.num_tokens,)),
            "label": FieldSpec(np.int32, ()),
        }
        self.metadata: dict[str, Any] = {"producer": "an official pretokenization script (.jsonl)"}

    def _init_handle(self) -> None:
        self._handle: IO[bytes] | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # grain workers open their own handle
        state = dict(self.__dict__)
        del state["_handle"], state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_handle()

    def __len__(self) -> int:
        return len(self._starts)

    def __repr__(self) -> str:
        return f"JsonlTokenSource({self.directory!r}, {len(self)} records)"

    def _line(self, index: int) -> bytes:
        with self._lock:
            if self._handle is None:
                self._handle = files.path(self.directory).open("rb")
            self._handle.seek(int(self._starts[index]))
            return self._handle.read(int(self._lengths[index]))

    def _parse(self, index: int) -> dict[str, np.ndarray]:
        where = f"{self.directory}: record {index}"
        try:
            obj = json.loads(self._line(index))
            tokens = np.asarray(obj["tokens"]).reshape(-1)
            label = obj["class_id"]
        except (ValueError, KeyError, TypeError) as e:
            raise BadRecordError(
                f"{where} is not a {{'class_id': int, 'tokens': [int, ...]}} line "
                f"({type(e).__name__}: {e})", index, where,
            ) from None
        if tokens.dtype.kind not in "iu" or (tokens.size and tokens.min() < 0) or (
            tokens.size and tokens.max() > np.iinfo(np.int32).max
        ):
            raise BadRecordError(f"{where}: tokens must be non-negative int32 values", index, where)
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise BadRecordError(f"{where}: class_id must be a non-negative int, got {label!r}",
                                 index, where)
        return {"tokens": tokens.astype(np.int32), "label": np.int32(label)}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = self._parse(int(index))
        if record["tokens"].shape[0] != self.num_tokens:
            where = f"{self.directory}: record {index}"
            raise BadRecordError(
                f"{where} has {record['tokens'].shape[0]} tokens, the first record "
                f"{self.num_tokens}; a file must hold one token layout", index, where,
            )
        return record
