"""The released data-chunk format: LLM360's JSON lines, one trained row per line, plus an
index (docs/data_format.md, "Released data chunks").

    OUT/chunks.json          the index: per chunk its file, sha256, stage, steps, rows,
                             tokens and tokens per source; the data identity it came from
    OUT/tokenizer.model      the run's tokenizer (ids -> text without crystal)
    OUT/train_00000.jsonl    data chunk 0: one JSON object per trained row, in step order

Why JSON lines and not Parquet: LLM360 released Amber and CrystalCoder as JSON lines with
`token_ids` and `source`, so the same readers take theirs and ours, and anything that reads
text reads it; it is larger on disk (about 5 bytes a token), and written fast enough (the
export outruns preparation, benchmarks/data_prepare.py). Each line has LLM360's two fields
first, then crystal's: the rest is what a row needs to be traced and checked.

Reading a release back (crystal.data.prepare --input=OUT) checks every file against the
index first (`verify_release`): a truncated or edited file is an error naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from crystal import fileio
from crystal.data.sources import RELEASE_INDEX, SOURCE_FIELD, TOKEN_FIELD
from crystal.errors import DataError

FORMAT = 1
INDEX = RELEASE_INDEX
TOKENIZER = "tokenizer.model"
# One row's fields, in the order they are written.
ROW_FIELDS = (
    TOKEN_FIELD,     # seq_len + 1 ids as trained (after FIM): inputs [:-1], targets [1:]
    SOURCE_FIELD,    # the data group
    "loss_mask",     # seq_len 0/1, on the targets (0: FIM padding)
    "stage", "step",  # the stage and its step (0-based) that trained the row
    "position",      # the row's place in the step's global batch
    "index",         # the global record index (step * global_batch_size + position)
    "shard", "row",  # where the stored row lies: 'group:index' shard, row within it
    "epoch",         # pass over the mixture component
    "fim",           # fragments FIM rearranged (0: FIM not applied)
    "substituted",   # 1: a row put in place of a quarantined shard's row
    "documents",     # [{doc, file, record, start, end}]: the stored row's documents
)


# One encoder for every string: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


# The texts of the numbers 0..n-1, grown on demand: joining looked-up texts is four times
# faster than str() per token, and the token lists are most of a release's bytes.
_NUMBERS = np.zeros((0,), object)


def _joined(a) -> str:
    """A 1-D array of non-negative ints as JSON list items ('1,2,3')."""
    global _NUMBERS
    a = np.asarray(a)
    try:
        return ",".join(_NUMBERS[a].tolist())
    except IndexError:          # a number past the table: grow it (rarely: once per vocab)
        top = int(a.max()) + 1
        _NUMBERS = np.asarray([str(i) for i in range(max(top, 2 * len(_NUMBERS)))], object)
        return ",".join(_NUMBERS[a].tolist())


_MASKS: dict[tuple[int, int], str] = {}    # (ones, length) -> the loss mask's list items


def _mask(ones: int, length: int) -> str:
    """A loss mask of `ones` ones then zeros, as JSON list items (a handful of distinct
    masks: all ones, and the FIM-padded ones)."""
    text = _MASKS.get((ones, length))
    if text is None:
        text = _MASKS[(ones, length)] = ",".join(["1"] * ones + ["0"] * (length - ones))
    return text


_SPAN = '{"doc":%d,"file":%s,"record":%d,"start":%d,"end":%d}'
_FILE_TEXT: dict[str, str] = {}     # input file name -> its JSON string


def _documents(spans) -> str:
    """The documents field: doc, file, record, start, end of each span."""
    parts = []
    for s in spans:
        f = _FILE_TEXT.get(s["file"])
        if f is None:
            f = _FILE_TEXT[s["file"]] = _ENCODER.encode(s["file"])
        parts.append(_SPAN % (s["doc"], f, s["record"], s["start"], s["end"]))
    return "[" + ",".join(parts) + "]"


# The line as compact JSON would write it, built from a template: int arrays joined as above,
# integers by %d, strings by the JSON encoder.
_LINE = ('{"token_ids":[%s],"source":%s,"loss_mask":[%s],"stage":%d,"step":%d,"position":%d,'
         '"index":%d,"shard":%s,"row":%d,"epoch":%d,"fim":%d,"substituted":%d,"documents":%s}\n')


def row_line(row: dict, seq_len: int) -> bytes:
    """One row as a compact JSON line, fields in ROW_FIELDS order; `token_ids` an int array
    or list, the loss mask given as `loss_tokens`, its leading ones out of seq_len."""
    return (_LINE % (_joined(row["token_ids"]), _ENCODER.encode(row["source"]),
                     _mask(row["loss_tokens"], seq_len), row["stage"], row["step"],
                     row["position"], row["index"], _ENCODER.encode(row["shard"]), row["row"],
                     row["epoch"], row["fim"], row["substituted"],
                     _documents(row["documents"]))).encode()


def read_index(root) -> dict:
    """A release's chunks.json (DataError naming the file on bad JSON or fields)."""
    path = Path(root) / INDEX
    idx = fileio.read_json(path, DataError)
    if not isinstance(idx, dict) or idx.get("format") != FORMAT:
        got = idx.get("format") if isinstance(idx, dict) else None
        raise DataError(f"{path}: field format: {got!r} is not {FORMAT}")
    for i, c in enumerate(idx.get("chunks", ())):
        for key in ("path", "sha256", "stage", "index", "num_rows"):
            if key not in c:
                raise DataError(f"{path}: missing field chunks[{i}].{key}")
    return idx


def verify_release(root) -> dict | None:
    """Checks a crystal release (a folder with chunks.json) before it is read: the
    tokenizer and every chunk file have the recorded sha256, and no .jsonl file is
    unaccounted for. Returns the index, or None for a folder without one (LLM360's)."""
    root = Path(root)
    if not (root / INDEX).is_file():
        return None
    idx = read_index(root)
    tok = idx.get("tokenizer", {})
    listed = [(TOKENIZER, tok.get("sha256"))] + [(c["path"], c["sha256"])
                                                  for c in idx["chunks"]]
    for rel, want in listed:
        p = root / rel
        if not p.is_file():
            raise DataError(f"{p}: listed in {root / INDEX} but missing")
        got = fileio.file_sha256(p)
        if got != want:
            raise DataError(f"{p}: sha256 {got} does not match {root / INDEX} ({want}); "
                            "the file was truncated or edited")
    extra = sorted({p.name for p in root.glob("*.jsonl")} - {c["path"] for c in idx["chunks"]})
    if extra:
        raise DataError(f"{root / extra[0]}: not listed in {root / INDEX}")
    return idx
