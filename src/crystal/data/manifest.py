"""The manifest of a prepared workdir (docs/data_format.md): its one reader and writer.

Preparation, the import of released chunks, the loader, verify, replay and the chunk
export all go through `read`, so a workdir is understood (or refused) the same way by every
tool: a missing manifest, bad JSON, a missing field or a layout of another format version
is one DataError naming the file (and line or field).

Format 2 stores each data group's training rows in *shards* (`<group>/shard_00000.npy`);
the word chunk belongs to LLM360's data chunks, the runs of training steps between two
release checkpoints (crystal.data.chunks). Format 1 called the shards chunks and is refused
with an error that says to prepare the workdir again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from crystal import fileio
from crystal.errors import DataError

FORMAT = 2
FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
SOURCES_FILE = "sources.json"
DOCUMENTS_FILE = "documents.npy"
# documents.npy columns: a group's documents in stream (shuffled) order.
DOC_FILE, DOC_RECORD, DOC_TOKENS, DOC_END = range(4)
_REQUIRED = ("format", "seq_len", "dtype", "num_shards", "tokenizer", "groups")
_SHARD_FIELDS = ("index", "path", "sha256", "num_sequences", "num_tokens", "offset")


def data_dir(workdir) -> Path:
    return Path(workdir) / "data"


def path(workdir) -> Path:
    return data_dir(workdir) / FILE


def shard_path(group: str, index: int) -> str:
    """A shard's path relative to the data folder."""
    return f"{group}/shard_{index:05d}.npy"


def shard_name(group: str, index: int) -> str:
    """The name quarantine, fault injection and the export use for a shard."""
    return f"{group}:{index}"


def read(workdir, missing_ok: bool = False) -> tuple[dict, str] | None:
    """(manifest, sha256 of its bytes: the data identity checkpoints record); None when
    there is none and `missing_ok`."""
    p = path(workdir)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise DataError(f"{p}: no manifest (run crystal.data.prepare first)") from None
    try:
        man = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: bad JSON: {e.msg}") from None
    check(man, p)
    return man, hashlib.sha256(raw).hexdigest()


def check(man, where):
    """Refuses a manifest of another format or with missing fields, naming the field."""
    if not isinstance(man, dict):
        raise DataError(f"{where}: not a JSON object")
    fmt = man.get("format")
    if fmt == 1:
        raise DataError(f"{where}: field format: 1 is the old layout (storage files named "
                        f"chunks, train_NNNNN.npy); this crystal reads format {FORMAT} "
                        "(shards): prepare the data again (crystal.data.prepare --overwrite)")
    if fmt != FORMAT:
        raise DataError(f"{where}: field format: unsupported {fmt!r} (this crystal reads "
                        f"{FORMAT})")
    for key in _REQUIRED:
        if key not in man:
            raise DataError(f"{where}: missing field {key!r}")
    for g, e in man["groups"].items():
        for i, s in enumerate(e.get("shards", ())):
            for key in _SHARD_FIELDS:
                if key not in s:
                    raise DataError(f"{where}: missing field groups.{g}.shards[{i}].{key}")
        if "shards" not in e:
            raise DataError(f"{where}: missing field groups.{g}.shards")


def write(out_dir, man: dict) -> str:
    """Writes `out_dir/manifest.json` atomically (last, after every file it names);
    returns its sha256."""
    raw = (json.dumps(man, indent=1, sort_keys=False) + "\n").encode()
    fileio.atomic_write_bytes(Path(out_dir) / FILE, raw)
    return hashlib.sha256(raw).hexdigest()


def group_names(man: dict) -> list[str]:
    """The groups in index order (batches name a row's group by this index)."""
    return sorted(man["groups"])


def files(man: dict):
    """(relpath, entry) of every file the manifest hashes: shards, val, document tables
    and the source list, in manifest order (the tokenizer is `man['tokenizer']`)."""
    docs = man.get("documents")
    if docs:
        yield docs["path"], docs
    for g, e in man["groups"].items():
        for s in e["shards"]:
            yield s["path"], s
        if e.get("val"):
            yield e["val"]["path"], e["val"]
        if e.get("documents"):
            yield e["documents"]["path"], e["documents"]


def read_sources(workdir, man: dict) -> list[str]:
    """The input files documents name by index (relative to the input folder)."""
    entry = man.get("documents")
    if not entry:
        raise DataError(f"{path(workdir)}: no document provenance (field documents); "
                        "prepare the data again")
    p = data_dir(workdir) / entry["path"]
    raw = p.read_bytes() if p.exists() else None
    if raw is None or hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise DataError(f"{p}: {'missing' if raw is None else 'sha256 differs from'} "
                        f"the manifest's documents.sha256")
    return json.loads(raw)
