"""The bundle's MANIFEST.sha256 and its id: every file's sha256, hashed in parallel threads.

    R/MANIFEST.sha256    `<sha256>  <path>` per file, sorted by path (sha256sum's format:
                         `cd R && sha256sum -c MANIFEST.sha256` checks a bundle without
                         crystal); every file of the bundle but itself
    bundle id            the sha256 of MANIFEST.sha256 (`sha256sum MANIFEST.sha256`)

Why threads: sha256 and file reads release the GIL, so hashing many files (orbax writes a
checkpoint as many array files) runs on every core; each file is streamed in blocks, never
held in memory whole (a 7B checkpoint with Adam moments is about 80 GB).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import shutil
from pathlib import Path

from crystal import fileio
from crystal.errors import CrystalError

MANIFEST = "MANIFEST.sha256"
BLOCK = fileio.HASH_BLOCK


class BundleError(CrystalError):
    """A bundle that does not verify, or cannot be written; names the file."""


def workers() -> int:
    return max(2, min(16, (os.cpu_count() or 2) * 2))


def files_under(root) -> list[str]:
    """Every regular file under `root`, as sorted POSIX paths relative to it."""
    root = Path(root)
    out = []
    for d, _, names in os.walk(root):
        for n in names:
            out.append((Path(d) / n).relative_to(root).as_posix())
    return sorted(out)


def hash_files(root, rels, threads: int | None = None) -> dict[str, str]:
    """{path: sha256} of the listed files under `root`, hashed in parallel threads."""
    root = Path(root)
    with cf.ThreadPoolExecutor(threads or workers()) as ex:
        digests = ex.map(lambda r: fileio.file_sha256(root / r, BLOCK), rels)
        return dict(zip(rels, digests))


def copy_hashed(src, dst) -> str:
    """Copies one file, hashing what it reads (one pass over the bytes); the sha256."""
    h = hashlib.sha256()
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while True:
            b = fi.read(BLOCK)
            if not b:
                break
            h.update(b)
            fo.write(b)
    shutil.copystat(src, dst)
    return h.hexdigest()


def copy_tree(src, dst, prefix: str, threads: int | None = None) -> dict[str, str]:
    """Copies the tree `src` to `dst` in parallel; {prefix/relpath: sha256} of its files."""
    rels = files_under(src)
    with cf.ThreadPoolExecutor(threads or workers()) as ex:
        digests = ex.map(lambda r: copy_hashed(Path(src) / r, Path(dst) / r), rels)
        return {f"{prefix}/{r}": d for r, d in zip(rels, digests)}


def manifest_text(digests: dict[str, str]) -> str:
    return "".join(f"{digests[p]}  {p}\n" for p in sorted(digests))


def write(root, digests: dict[str, str]) -> str:
    """Writes R/MANIFEST.sha256 from `digests` (which must cover every other file of the
    bundle); returns the bundle id."""
    have = set(files_under(root)) - {MANIFEST}
    if have != set(digests):
        missing = sorted(have - set(digests)) or sorted(set(digests) - have)
        raise BundleError(f"{Path(root) / missing[0]}: not accounted for in the manifest")
    text = manifest_text(digests).encode()
    fileio.atomic_write_bytes(Path(root) / MANIFEST, text)
    return fileio.sha256_bytes(text)


def read(root) -> dict[str, str]:
    """{path: sha256} of R/MANIFEST.sha256; a malformed line is an error naming it."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: missing (not a crystal release bundle?)")
    out = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or not rel or rel in out:
            raise BundleError(f"{path}:{i}: malformed line {line[:80]!r}")
        out[rel] = digest
    return out


def bundle_id(root) -> str:
    return fileio.file_sha256(Path(root) / MANIFEST)


def check(root, shard: tuple[int, int] = (0, 1), threads: int | None = None) -> int:
    """Re-hashes every file of the manifest (this shard's share: files whose path hashes to
    `shard[0]` mod `shard[1]`); raises BundleError naming the first missing, extra or
    changed file. Returns the number of files checked."""
    root = Path(root)
    want = read(root)
    extra = sorted(set(files_under(root)) - set(want) - {MANIFEST})
    if extra:
        raise BundleError(f"{root / extra[0]}: not in {MANIFEST} (added after the release)")
    i, n = shard
    mine = [r for r in sorted(want) if shard_of(r, n) == i]
    for r in mine:
        if not (root / r).is_file():
            raise BundleError(f"{root / r}: missing (listed in {MANIFEST})")
    got = hash_files(root, mine, threads)
    for r in mine:
        if got[r] != want[r]:
            raise BundleError(f"{root / r}: sha256 {got[r]} does not match {MANIFEST} "
                              f"({want[r]}); the file was changed or truncated")
    return len(mine)


def shard_of(rel: str, n: int) -> int:
    """Which of n verifiers checks this file: a hash of the path, so shards are balanced and
    every host computes the same split with no coordination."""
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % n
