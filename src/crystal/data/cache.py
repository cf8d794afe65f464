"""Where crystal caches what it can rebuild (sample corpus, trained tokenizers), and the
atomic-write and locking helpers every data writer uses.

Cache root: `data.cache_dir` if set, else `$CRYSTAL_CACHE`, else `$XDG_CACHE_HOME/crystal`,
else `~/.cache/crystal`. Everything in it is keyed by its inputs, so deleting it is safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
from pathlib import Path


def cache_root(cfg=None) -> Path:
    d = cfg.data.get("cache_dir", "") if cfg is not None else ""
    if not d:
        d = os.environ.get("CRYSTAL_CACHE", "")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "crystal")
    return Path(d)


def tmp_name(path) -> Path:
    """A sibling temporary name (same filesystem, so the final rename is atomic), unique
    per process and thread; `prepare` removes stale ones by the `.*.tmp-*` pattern."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{os.getpid()}-{threading.get_ident()}")


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb", sync: bool = False):
    """A file to write that appears at `path` whole or not at all: a sibling temp file,
    renamed over `path` when the block ends (after an fsync if `sync`), removed if the
    block raises. Every crystal writer of a file a later run reads goes through this."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(p)
    try:
        with open(tmp, mode) as f:
            yield f
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes):
    with atomic_open(path, sync=True) as f:
        f.write(data)


def write_json(path, obj, sort_keys: bool = False, sync: bool = False):
    """`obj` as indented JSON and a newline, through `atomic_open`."""
    with atomic_open(path, "w", sync=sync) as f:
        f.write(json.dumps(obj, indent=1, sort_keys=sort_keys) + "\n")


def file_sha256(path, block=1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(block)
            if not b:
                return h.hexdigest()
            h.update(b)


@contextlib.contextmanager
def file_lock(path):
    """An exclusive advisory lock, so concurrent processes build a cache entry once."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
