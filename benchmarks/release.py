"""Release and verify throughput (MB/s) against sha256sum on the same files, same run.

    python benchmarks/release.py [--mb=512] [--files=64] [--dir=TMP]

Writes --files files of random bytes (--mb in all, the shape of an orbax checkpoint's array
files), reads them once so every timing below starts from a warm page cache, then times:

    verify   crystal.release.manifest.hash_files (threads, streamed blocks)
    sha256sum  `sha256sum FILE...` (GNU coreutils, one process)
    release  crystal.release.manifest.copy_tree (copy + hash in one pass, threads)
    cp+sha   `cp -r` then `sha256sum` of the copy (what a shell script would do)

and prints MB/s for each and the ratios verify/sha256sum and release/(cp+sha) last; the
goal is crystal within 1.5x of sha256sum (ratio >= 0.67; above 1 it is faster).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import host

from crystal import cli
from crystal.release import manifest

FLAGS = (
    cli.Flag("mb", "total size of the files", int, 512),
    cli.Flag("files", "number of files", int, 64),
    cli.Flag("dir", "where to write them ('' = a temp dir, removed after)", str, ""),
)


def _make(root: Path, mb: int, n: int) -> list[str]:
    size = mb * 2**20 // n
    rels = []
    for i in range(n):
        rel = f"checkpoint/state/d/{i:04d}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(root / rel, "wb") as f:
            f.write(os.urandom(size))
        rels.append(rel)
    return rels


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _main(a):
    base = Path(a.dir or tempfile.mkdtemp(prefix="crystal_release_bench_"))
    try:
        src = base / "src"
        rels = _make(src, a.mb, a.files)
        manifest.hash_files(src, rels)                     # warm the page cache
        files = [str(src / r) for r in rels]
        t_verify = _time(lambda: manifest.hash_files(src, rels))
        t_sum = _time(lambda: subprocess.run(["sha256sum", *files], check=True,
                                             capture_output=True))
        t_rel = _time(lambda: manifest.copy_tree(src / "checkpoint", base / "rel", "c"))
        t_cp = _time(lambda: (shutil.copytree(src / "checkpoint", base / "cp"),
                              subprocess.run(["sha256sum", *map(str, (base / "cp").rglob("0*"))],
                                             check=True, capture_output=True)))
    finally:
        if not a.dir:
            shutil.rmtree(base, ignore_errors=True)
    mb = a.mb
    print(f"host: {host.cpu()}; {a.files} files, {mb} MB, {manifest.workers()} hashing "
          "threads")
    for name, t in (("verify", t_verify), ("sha256sum", t_sum), ("release", t_rel),
                    ("cp+sha", t_cp)):
        print(f"  {name:10s} {mb / t:9.1f} MB/s  ({t:.2f} s)")
    print(f"ratio verify/sha256sum={t_sum / t_verify:.2f} release/cp+sha={t_cp / t_rel:.2f}")


def main(argv=None):
    return cli.run(_main, doc=__doc__.split("\n\n")[0], flags=FLAGS, argv=argv,
                   prog="python benchmarks/release.py")


if __name__ == "__main__":
    raise SystemExit(main())
