"""Readers for the real pre-training source formats, and the bad-record policy.

An input folder is scanned into *shards* (one unit of parallel work each), in sorted path
order, so every later step sees the same documents in the same order:

- SlimPajama: `*.jsonl` / `*.jsonl.zst`, one `{"text", "meta": {"redpajama_set_name"}}` per
  line; the trailing number of the file name (`example_train_K`) picks the even/odd half,
  the set name picks the group: `slimpajama.even.RedPajamaC4`.
- StarCoder data: `*.parquet` with a `content` column; the folder is the language:
  `python/train-00000-of-00059.parquet` -> `starcoder.python`.
- Released token rows: `*.jsonl` whose first line has `token_ids` (crystal.data.chunks
  exports, LLM360's `train_NNN.jsonl`), one packed row per line; the line's `source` is
  its group. The rows keep their order and are not tokenised again.
- Anything else is plain text or code, one document per file, grouped by the top-level
  folder under the input: `text.<folder>`.

Bad input never becomes a silent partial dataset: each problem is either raised as a
one-line `BadRecordError` naming file and line (`on_bad_record="fail"`), or skipped and
counted (`"skip"`); a file that cannot be read to its end (corrupt .zst or parquet, missing)
is dropped whole, so no half-read file ever reaches the chunks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterator

import zstandard

from crystal.errors import DataError

SLIMPAJAMA, STARCODER, TEXT, TOKENS = "slimpajama", "starcoder", "text", "tokens"
TOKEN_FIELD, SOURCE_FIELD = "token_ids", "source"   # LLM360's released rows
RELEASE_INDEX = "chunks.json"   # a crystal.data.chunks export: its index and tokenizer are
RELEASE_FILES = (RELEASE_INDEX, "tokenizer.model")   # not documents
SLIMPAJAMA_SETS = (
    "RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaArXiv",
    "RedPajamaBook", "RedPajamaWikipedia", "RedPajamaStackExchange",
)
# Text files are batched into shards of about this size. Batching keeps file order, so it
# changes the parallelism only, never the output.
TEXT_SHARD_BYTES = 32 << 20
READ_BYTES = 1 << 20
MAX_EXAMPLES = 20          # bad-record examples kept in the manifest
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+\-]*$")
_GROUP_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+\-]*$")
PEEK_BYTES = 16 << 20      # a token row's first line is read whole to tell its kind
_SKIP_DIRS = {"__pycache__"}




class BadRecordError(DataError):
    """One bad record (or file), raised under on_bad_record='fail'."""

    def __init__(self, path: str, line: int | None, reason: str, detail: str = ""):
        self.path, self.line, self.reason, self.detail = path, line, reason, detail
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # crosses process boundaries intact
        return (BadRecordError, (self.path, self.line, self.reason, self.detail))


class _FileError(Exception):
    """A file that cannot be read to its end; the whole file is dropped."""

    def __init__(self, line, reason, detail):
        super().__init__(reason)
        self.line, self.reason, self.detail = line, reason, detail


@dataclasses.dataclass(frozen=True)
class Shard:
    index: int                 # position in the sorted shard list
    kind: str                  # slimpajama | starcoder | text
    paths: tuple[str, ...]     # absolute paths (several only for batched text files)
    relpaths: tuple[str, ...]  # relative to the input root (for the manifest)
    group: str = ""            # fixed group; '' for SlimPajama (the set name decides)
    parity: str = ""           # 'even' | 'odd' for SlimPajama
    first_file: int = 0        # index of paths[0] among all input files (provenance)


class BadRecords:
    """Counts skipped records, or raises the first one under 'fail'."""

    def __init__(self, mode: str):
        if mode not in ("fail", "skip"):
            raise DataError(f"on_bad_record must be 'fail' or 'skip', got {mode!r}")
        self.mode = mode
        self.skipped = 0
        self.files_skipped = 0
        self.documents_discarded = 0
        self.by_reason: dict[str, int] = {}
        self.examples: list[dict] = []

    def add(self, path, relpath, line, reason, detail=""):
        if self.mode == "fail":
            raise BadRecordError(path, line, reason, detail)
        self.skipped += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(dict(file=relpath, line=line, reason=reason, detail=detail))

    def to_json(self) -> dict:
        return dict(skipped=self.skipped, files_skipped=self.files_skipped,
                    documents_discarded=self.documents_discarded,
                    by_reason=dict(sorted(self.by_reason.items())), examples=self.examples)

    @staticmethod
    def merge(parts) -> dict:
        """Sums per-shard summaries in shard order (so the examples are deterministic)."""
        out = dict(skipped=0, files_skipped=0, documents_discarded=0, by_reason={},
                   examples=[])
        for p in parts:
            for k in ("skipped", "files_skipped", "documents_discarded"):
                out[k] += p[k]
            for r, n in p["by_reason"].items():
                out["by_reason"][r] = out["by_reason"].get(r, 0) + n
            out["examples"].extend(p["examples"][:MAX_EXAMPLES - len(out["examples"])])
        out["by_reason"] = dict(sorted(out["by_reason"].items()))
        return out


# ----------------------------------------------------------------------------- discovery


def _is_token_file(path: Path) -> bool:
    """A plain .jsonl file whose first line is an object with `token_ids`."""
    head = b""
    try:
        with open(path, "rb") as f:
            while b"\n" not in head and len(head) < PEEK_BYTES:
                block = f.read(1 << 16)
                if not block:
                    break
                head += block
    except OSError:
        return False
    try:
        rec = json.loads(head.split(b"\n", 1)[0])
    except ValueError:
        return False
    return isinstance(rec, dict) and TOKEN_FIELD in rec


def _kind(path: Path) -> str:
    name = path.name
    if name.endswith(".jsonl"):
        return TOKENS if _is_token_file(path) else SLIMPAJAMA
    if name.endswith(".jsonl.zst"):
        return SLIMPAJAMA
    if name.endswith(".parquet"):
        return STARCODER
    return TEXT


def _check_name(name: str, what: str, path) -> str:
    if not _NAME_OK.match(name):
        raise DataError(f"{path}: {what} {name!r} is not a usable data group name "
                        "(letters, digits, _ + -)")
    return name


def _list_files(root: Path) -> list[tuple[str, Path]]:
    """(relpath, path) of the input files, sorted; hidden files, `__pycache__` and a
    release's index and tokenizer left out."""
    if not root.exists():
        raise DataError(f"{root}: input folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: input is not a folder")
    release = (root / RELEASE_INDEX).is_file()
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if not f.startswith(".") and not (release and p.parent == root and
                                              f in RELEASE_FILES):
                files.append((p.relative_to(root).as_posix(), p))
    files.sort()
    if not files:
        raise DataError(f"{root}: no input files")
    return files


def discover(input_dir) -> list[Shard]:
    """The shards of an input folder, in sorted relative-path order."""
    root = Path(input_dir)
    files = _list_files(root)
    shards: list[Shard] = []
    text_batch: list = []   # (rel, path, group) of the current text shard
    text_bytes = 0

    def first_file():
        return sum(len(s.paths) for s in shards)

    def flush_text():
        nonlocal text_batch, text_bytes
        if text_batch:
            shards.append(Shard(len(shards), TEXT, tuple(str(p) for _, p, _ in text_batch),
                                tuple(r for r, _, _ in text_batch), group=text_batch[0][2],
                                first_file=first_file()))
        text_batch, text_bytes = [], 0

    for rel, path in files:
        kind = _kind(path)
        if kind != TEXT:
            flush_text()
        if kind == TOKENS:
            shards.append(Shard(len(shards), TOKENS, (str(path),), (rel,),
                                first_file=first_file()))
        elif kind == SLIMPAJAMA:
            stem = path.name.split(".")[0]
            m = re.search(r"(\d+)$", stem)
            if not m:
                raise DataError(f"{path}: SlimPajama file name needs a trailing shard number "
                                "(example_train_K) to tell the even from the odd half")
            parity = "even" if int(m.group(1)) % 2 == 0 else "odd"
            shards.append(Shard(len(shards), SLIMPAJAMA, (str(path),), (rel,), parity=parity,
                                first_file=first_file()))
        elif kind == STARCODER:
            if "/" not in rel:
                raise DataError(f"{path}: StarCoder parquet files live in one folder per "
                                "language (python/, html/, ...)")
            lang = _check_name(path.parent.name, "language folder", path)
            shards.append(Shard(len(shards), STARCODER, (str(path),), (rel,),
                                group=f"starcoder.{lang}", first_file=first_file()))
        else:
            top = rel.split("/")[0] if "/" in rel else root.resolve().name
            group = "text." + _check_name(top, "text folder", path)
            try:
                size = path.stat().st_size
            except OSError:
                size = 0  # reported as missing when read
            if text_batch and (text_batch[0][2] != group or text_bytes + size > TEXT_SHARD_BYTES):
                flush_text()
            text_batch.append((rel, path, group))
            text_bytes += size
    flush_text()
    return shards


def listing_sha256(input_dir) -> tuple[int, str]:
    """(file count, sha256 of the sorted (path, size) listing): the input's identity."""
    h = hashlib.sha256()
    shards = discover(input_dir)
    n = 0
    for s in shards:
        for rel, p in zip(s.relpaths, s.paths):
            try:
                size = os.path.getsize(p)
            except OSError:
                size = -1
            h.update(f"{rel}\t{size}\n".encode())
            n += 1
    return n, h.hexdigest()


# ----------------------------------------------------------------------------- readers


def _check_text(text, bad, path, rel, line, field) -> bool:
    """A usable document: a non-empty str that is valid UTF-8 (no lone surrogates)."""
    if text is None:
        bad.add(path, rel, line, "missing_field", field)
        return False
    if not isinstance(text, str):
        bad.add(path, rel, line, "bad_field_type", f"{field} is {type(text).__name__}")
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad.add(path, rel, line, "non_utf8", f"{field}: {e.reason}")
        return False
    if not text.strip():
        bad.add(path, rel, line, "empty_document", field)
        return False
    return True


def _zst_bytes(path) -> Iterator[bytes]:
    """Decompressed blocks of a .zst file; a truncated or corrupt stream is a _FileError."""
    d, ended, seen = zstandard.ZstdDecompressor().decompressobj(), False, False
    for raw in _plain_bytes(path):
        seen = True
        while raw:
            if ended:  # another frame follows (concatenated .zst files)
                d, ended = zstandard.ZstdDecompressor().decompressobj(), False
            try:
                out = d.decompress(raw)
            except zstandard.ZstdError as e:
                raise _FileError(None, "corrupt_zstd", str(e)) from None
            if out:
                yield out
            raw, ended = (d.unused_data, True) if d.eof else (b"", False)
    if not seen:
        raise _FileError(None, "corrupt_zstd", "empty file")
    if not ended:
        raise _FileError(None, "corrupt_zstd", "truncated stream (frame never ended)")


def _plain_bytes(path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while True:
            b = f.read(READ_BYTES)
            if not b:
                return
            yield b


def _lines(blocks) -> Iterator[bytes]:
    buf = b""
    for b in blocks:
        buf += b
        *lines, buf = buf.split(b"\n")
        yield from lines
    if buf:
        yield buf


def _json_records(path, rel, bad: BadRecords):
    """(line number, object) of a JSON lines file (.jsonl or .jsonl.zst); bad lines are
    reported to `bad`."""
    blocks = _zst_bytes(path) if path.endswith(".zst") else _plain_bytes(path)
    for n, raw in enumerate(_lines(blocks), start=1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw.strip():
            bad.add(path, rel, n, "empty_line")
            continue
        line = _utf8(raw, bad, path, rel, n, "byte")
        if line is None:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            bad.add(path, rel, n, "invalid_json", e.msg)
            continue
        if not isinstance(rec, dict):
            bad.add(path, rel, n, "invalid_json", "not an object")
            continue
        yield n, rec


def _read_jsonl(shard: Shard, bad: BadRecords):
    path, rel = shard.paths[0], shard.relpaths[0]
    for n, rec in _json_records(path, rel, bad):
        meta = rec.get("meta")
        name = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
        if not isinstance(name, str) or not name:
            bad.add(path, rel, n, "missing_field", "meta.redpajama_set_name")
            continue
        if not _NAME_OK.match(name):
            bad.add(path, rel, n, "bad_field_value", f"meta.redpajama_set_name={name[:40]!r}")
            continue
        text = rec.get("text")
        if _check_text(text, bad, path, rel, n, "text"):
            yield f"slimpajama.{shard.parity}.{name}", text, n


def _read_token_rows(shard: Shard, bad: BadRecords):
    """(source, token ids, line) of released rows; prepare checks length and vocabulary."""
    path, rel = shard.paths[0], shard.relpaths[0]
    for n, rec in _json_records(path, rel, bad):
        ids, source = rec.get(TOKEN_FIELD), rec.get(SOURCE_FIELD)
        if ids is None or source is None:
            bad.add(path, rel, n, "missing_field", TOKEN_FIELD if ids is None else SOURCE_FIELD)
        elif not isinstance(ids, list) or not all(type(i) is int for i in ids):
            bad.add(path, rel, n, "bad_field_type", f"{TOKEN_FIELD} is not a list of integers")
        elif not isinstance(source, str) or not _GROUP_OK.match(source):
            bad.add(path, rel, n, "bad_field_value", f"{SOURCE_FIELD}={str(source)[:40]!r} is "
                    "not a usable data group name (letters, digits, . _ + -)")
        elif not ids:
            bad.add(path, rel, n, "empty_document", TOKEN_FIELD)
        else:
            yield source, ids, n


def _read_parquet(shard: Shard, bad: BadRecords):
    # lazily: pyarrow adds ~0.2 s to the start-up of every CLI that reads sources; only
    # parquet (StarCoder) input needs it
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    path, rel = shard.paths[0], shard.relpaths[0]
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise _FileError(None, "corrupt_parquet", str(e).splitlines()[0]) from None
    if "content" not in pf.schema_arrow.names:
        raise _FileError(None, "missing_column", "content")
    row = 0
    for rg in range(pf.num_row_groups):
        try:
            col = pf.read_row_group(rg, columns=["content"]).column("content")
        except (pa.ArrowException, OSError) as e:
            raise _FileError(row + 1, "corrupt_parquet", str(e).splitlines()[0]) from None
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            col = pc.cast(col, pa.large_binary())  # decode ourselves: strict UTF-8
        elif not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
            raise _FileError(None, "bad_field_type", f"content column is {col.type}")
        for value in col.to_pylist():
            row += 1
            if value is not None:
                value = _utf8(value, bad, path, rel, row, "content byte")
                if value is None:
                    continue
            if _check_text(value, bad, path, rel, row, "content"):
                yield shard.group, value, row


def _utf8(raw: bytes, bad: BadRecords, path, rel, row, where: str) -> str | None:
    """Strict UTF-8, or None with a `non_utf8` bad record naming the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad.add(path, rel, row, "non_utf8", f"{where} {e.start}")
        return None


def _read_text(path, rel, group, bad: BadRecords):
    with open(path, "rb") as f:
        text = _utf8(f.read(), bad, path, rel, None, "byte")
    if text is None:
        return
    if _check_text(text, bad, path, rel, None, "file"):
        yield group, text, 1


def read_shard(shard: Shard, bad: BadRecords) -> Iterator[tuple[str, str, int]]:
    """(group, text, record) for the good documents of a one-file shard; may raise
    _FileError. The record is the document's line (JSON lines) or row (Parquet), from 1 as
    error messages count; 1 for a text file (one document per file). For token rows the
    text is the list of token ids."""
    if shard.kind == SLIMPAJAMA:
        yield from _read_jsonl(shard, bad)
    elif shard.kind == TOKENS:
        yield from _read_token_rows(shard, bad)
    elif shard.kind == STARCODER:
        yield from _read_parquet(shard, bad)
    else:
        for p, rel in zip(shard.paths, shard.relpaths):
            yield from _read_text(p, rel, shard.group, bad)


def read_file(shard: Shard, i: int, bad: BadRecords):
    """All (group, text, record) of the shard's i-th file, or None when it was dropped.

    Reading a whole file before handing its documents on is what keeps a file that breaks
    half-way (truncated .zst, corrupt parquet row group) out of the data entirely.
    """
    path, rel = shard.paths[i], shard.relpaths[i]
    docs = []
    try:
        if shard.kind == TEXT:
            docs.extend(_read_text(path, rel, shard.group, bad))
        else:
            docs.extend(read_shard(shard, bad))
        return docs
    except _FileError as e:
        line, reason, detail = e.line, e.reason, e.detail
    except FileNotFoundError:
        line, reason, detail = None, "missing_file", ""
    except OSError as e:
        line, reason, detail = None, "unreadable_file", e.strerror or str(e)
    bad.add(path, rel, line, reason, detail)
    bad.files_skipped += 1
    bad.documents_discarded += len(docs)
    return None


def iter_files(shard: Shard, bad: BadRecords):
    """Per file of the shard: its list of (group, text, record), or None if the file was
    dropped."""
    for i in range(len(shard.paths)):
        yield read_file(shard, i, bad)


def iter_documents(input_dir, on_bad_record="fail") -> Iterator[tuple[str, str]]:
    """Every good (group, text) of an input folder, in the canonical order."""
    bad = BadRecords(on_bad_record)
    for shard in discover(input_dir):
        for docs in iter_files(shard, bad):
            for group, text, _ in docs or ():
                yield group, text


def read_record(path, record: int) -> dict:
    """The input record a document came from (provenance): a JSON line's object, a
    Parquet row's columns, or {'text': ...} for a text file. `record` counts from 1."""
    path, record = Path(path), int(record)
    bad = BadRecords("skip")
    try:
        if path.name.endswith((".jsonl", ".jsonl.zst")):
            for n, rec in _json_records(str(path), path.name, bad):
                if n == record:
                    return rec
        elif path.name.endswith(".parquet"):
            import pyarrow.parquet as pq   # lazily: ~0.2 s, parquet only (_read_parquet)
            table = pq.read_table(path)
            if 1 <= record <= table.num_rows:
                return table.slice(record - 1, 1).to_pylist()[0]
        elif record == 1:
            return {"text": path.read_text(encoding="utf-8")}
    except (OSError, _FileError) as e:
        raise DataError(f"{path}: cannot read record {record}: {e}") from None
    raise DataError(f"{path}: has no record {record}")
