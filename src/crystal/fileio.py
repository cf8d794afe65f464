"""Files: atomic writes, JSON in and out, hashing, locks, the cache root, the code commit.

Why one module: every file a later run, an outsider or a verifier reads is written whole
or not at all (`atomic_open`), every JSON file is read with an error that names the file
and line (`read_json`), and every hash crystal records is a sha256 computed one way
(`file_sha256`, `json_sha256`). Nothing here knows about models, data or configs.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from crystal.errors import CrystalError

HASH_BLOCK = 1 << 22


# ----------------------------------------------------------------------------- writing


def tmp_name(path) -> Path:
    """A sibling temporary name (same filesystem, so the final rename is atomic), unique
    per process and thread; writers that clean up remove stale ones by `.*.tmp-*`."""
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


def atomic_write_bytes(path, data: bytes, sync: bool = True):
    with atomic_open(path, sync=sync) as f:
        f.write(data)


def json_text(obj, sort_keys: bool = False) -> str:
    """The one JSON layout crystal writes: indent 1, a final newline."""
    return json.dumps(obj, indent=1, sort_keys=sort_keys) + "\n"


def write_json(path, obj, sort_keys: bool = False, sync: bool = False):
    """`obj` as `json_text`, through `atomic_open`."""
    with atomic_open(path, "w", sync=sync) as f:
        f.write(json_text(obj, sort_keys))


@contextlib.contextmanager
def atomic_dir(path):
    """A directory that appears at `path` whole or not at all: the block fills a sibling
    temporary directory, renamed onto `path` when it ends, removed if it raises. `path`
    must not exist (nothing is ever overwritten)."""
    p = Path(path)
    if p.exists():
        raise CrystalError(f"{p}: already exists; choose another output directory")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(p)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- reading


def read_json(path, error=CrystalError, missing: str | None = None):
    """A JSON file's value. A missing file raises `error` ('PATH: not found', or `missing`
    appended), bad JSON raises `error` naming PATH:LINE."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{p}: not found" + (f" ({missing})" if missing else "")) from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{p}: cannot read: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{p}:{e.lineno}: bad JSON: {e.msg}") from None


# ----------------------------------------------------------------------------- hashing


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path, block: int = HASH_BLOCK) -> str:
    """sha256 of a file, read in blocks (never held in memory whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(block)
            if not b:
                return h.hexdigest()
            h.update(b)


def json_sha256(obj) -> str:
    """sha256 of a JSON value in canonical form (`json.dumps` with sorted keys): the hash
    of a config, a settings dict or an index, the same on every machine."""
    text = json.dumps(obj, sort_keys=True)
    return sha256_bytes(text.encode())


# ----------------------------------------------------------------------------- locks, cache


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


def cache_root(cfg=None) -> Path:
    """Where crystal caches what it can rebuild (sample corpus, trained tokenizers, XLA's
    compilation cache): `data.cache_dir` if set, else `$CRYSTAL_CACHE`, else
    `$XDG_CACHE_HOME/crystal`, else `~/.cache/crystal`. Every entry is keyed by its inputs,
    so deleting the folder is safe."""
    d = cfg.data.get("cache_dir", "") if cfg is not None else ""
    if not d:
        d = os.environ.get("CRYSTAL_CACHE", "")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                 ".cache")
        d = os.path.join(base, "crystal")
    return Path(d)


# ----------------------------------------------------------------------------- provenance


@functools.cache
def environment() -> dict:
    """The software a run ran on: Python, the platform, and every installed distribution as
    `name==version`, sorted (what `pip freeze` lists), with the list's sha256."""
    pkgs = sorted({f"{d.metadata['Name']}=={d.version}" for d in md.distributions()
                   if d.metadata["Name"]}, key=str.lower)
    return dict(python=sys.version.split()[0], platform=platform.platform(), packages=pkgs,
                packages_sha256=json_sha256(pkgs))


@functools.cache
def git_commit() -> dict:
    """{'commit': sha or '', 'dirty': bool or None} of the crystal source tree (tracked
    files only); '' and None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return dict(commit="", dirty=None)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return dict(commit="", dirty=None)
    return dict(commit=sha.stdout.strip(), dirty=bool(dirty))
