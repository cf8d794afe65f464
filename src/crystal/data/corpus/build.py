"""Builds the bundled sample corpus once, from a Python installation (maintainers only).

    python -m crystal.data.corpus.build --site_dirs=DIR[,DIR] [--max_mb=8]

Writes `sample.jsonl.zst`, `NOTICE.md` and `LICENSES.txt` next to this file. Both are committed, and
`crystal.data.sample` reads only them, so the corpus a user trains on is the same bytes on
every machine whatever is installed there. Rebuild only to change the corpus on purpose
(then update `expected.json`, see docs/data.md): a rebuild on another installation gives
other documents.

Every document is real text with a permissive license, recorded per document and in the
NOTICE. Prose is spread over the seven SlimPajama set names by kind, code over the four
StarCoder languages:

  RedPajamaCommonCrawl   the interpreter's help topics (pydoc_data.topics)
  RedPajamaWikipedia     module docstrings (one article per module)
  RedPajamaC4            function docstrings
  RedPajamaArXiv         class docstrings
  RedPajamaStackExchange docstrings with interactive `>>>` examples
  RedPajamaBook          long texts: CPython's LICENSE, idlelib's text files
  RedPajamaGithub        the C headers of the installation's include directory
  python                 the standard library's sources (tests excluded)
  html, javascript, css  the web files of CPython and of the packages in WEB_FILES

Modules are parsed with `ast` (nothing is imported), and every choice is a sort by path or
path hash. Each group takes documents until its share of --max_mb is spent.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata as md
import json
import os
import platform
import sys
import sysconfig
from pathlib import Path

import pydoc_data.topics
import zstandard

from crystal import cli, fileio
from crystal.data import sample
from crystal.errors import DataError

HERE = Path(__file__).parent
CORPUS_FILE = "sample.jsonl.zst"
NOTICE_FILE = "NOTICE.md"
LICENSES_FILE = "LICENSES.txt"
PYTHON = "3.11.7"           # the CPython whose files the committed corpus holds
PSF = "PSF-2.0"
ZSTD_LEVEL = 19
# Tests, installed packages, and pydoc_data (a 0.5 MB string literal of the help topics,
# already in RedPajamaCommonCrawl) are not standard-library code.
_SKIP = {"__pycache__", "test", "tests", "idle_test", "site-packages", "dist-packages",
         "pydoc_data"}
# CPython's own web files (relative to the stdlib folder).
STDLIB_WEB = {"html": ("idlelib/help.html", "test/test_difflib_expect.html"),
              "css": ("pydoc_data/_pydoc.css",)}
# Web files of installed packages: (distribution, version, SPDX license, language, files).
# Only files whose license lets anyone copy them; minified vendored libraries are left out.
WEB_FILES = (
    ("docutils", "0.19", "LicenseRef-public-domain", "css", (
        "docutils/writers/html4css1/html4css1.css",
        "docutils/writers/s5_html/themes/default/framing.css",
        "docutils/writers/s5_html/themes/default/pretty.css")),
    ("docutils", "0.19", "BSD-2-Clause", "css", (
        "docutils/writers/html5_polyglot/math.css",
        "docutils/writers/html5_polyglot/minimal.css",
        "docutils/writers/html5_polyglot/plain.css",
        "docutils/writers/html5_polyglot/responsive.css",
        "docutils/writers/html5_polyglot/tuftig.css")),
    ("docutils", "0.19", "LicenseRef-public-domain", "javascript", (
        "docutils/writers/s5_html/themes/default/slides.js",)),
    ("Werkzeug", "3.1.8", "BSD-3-Clause", "javascript", ("werkzeug/debug/shared/debugger.js",)),
    ("Werkzeug", "3.1.8", "BSD-3-Clause", "css", ("werkzeug/debug/shared/style.css",)),
    ("moto", "5.2.1", "Apache-2.0", "html", ("moto/moto_server/templates/dashboard.html",)),
    ("moto", "5.2.1", "Apache-2.0", "javascript", ("moto/moto_server/templates/lib.js",)),
    ("urllib3", "2.7.0", "MIT", "javascript", (
        "urllib3/contrib/emscripten/emscripten_fetch_worker.js",)),
    ("matplotlib", "3.11.2", "LicenseRef-matplotlib", "html", (
        "matplotlib/backends/web_backend/all_figures.html",
        "matplotlib/backends/web_backend/ipython_inline_figure.html",
        "matplotlib/backends/web_backend/single_figure.html")),
    ("matplotlib", "3.11.2", "LicenseRef-matplotlib", "javascript", (
        "matplotlib/backends/web_backend/js/mpl.js",
        "matplotlib/backends/web_backend/js/nbagg_mpl.js")),
    ("matplotlib", "3.11.2", "LicenseRef-matplotlib", "css", (
        "matplotlib/backends/web_backend/css/boilerplate.css",
        "matplotlib/backends/web_backend/css/fbm.css",
        "matplotlib/backends/web_backend/css/mpl.css",
        "matplotlib/backends/web_backend/css/page.css")),
    ("torch", "2.13.0+cpu", "BSD-3-Clause", "javascript", ("torch/utils/model_dump/code.js",)),
    ("treescope", "0.1.10", "Apache-2.0", "javascript", (
        "treescope/_internal/js/arrayviz.js",)),
    ("etils", "1.15.0", "Apache-2.0", "javascript", (
        "etils/ecolab/inspects/static/main.js", "etils/ecolab/pyjs_com/py_js_com.js")),
    ("etils", "1.15.0", "Apache-2.0", "css", (
        "etils/ecolab/inspects/static/theme.css", "etils/ecolab/static/highlight.css")),
)
# Each distribution's license file in its .dist-info (copied into LICENSES.txt), and where
# to stop (matplotlib's file goes on with the licenses of fonts it bundles, not used here).
LICENSE_FILES = {"docutils": ("COPYING.txt", None), "Werkzeug": ("licenses/LICENSE.txt", None),
                 "moto": ("licenses/LICENSE", None), "urllib3": ("licenses/LICENSE.txt", None),
                 "matplotlib": ("LICENSE", "License agreement for matplotlib versions prior"),
                 "torch": ("licenses/LICENSE", None), "treescope": ("licenses/LICENSE", None),
                 "etils": ("licenses/LICENSE", None)}
LICENSE_NAMES = {
    PSF: "Python Software Foundation License Version 2 (CPython's LICENSE.txt)",
    "BSD-2-Clause": "BSD 2-Clause License", "BSD-3-Clause": "BSD 3-Clause License",
    "MIT": "MIT License", "Apache-2.0": "Apache License 2.0",
    "LicenseRef-public-domain": "placed in the public domain by its authors (file header)",
    "LicenseRef-matplotlib": "the matplotlib license (PSF-based; matplotlib's LICENSE)",
}


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _phash(rel: str) -> str:
    return hashlib.sha256(rel.encode()).hexdigest()


def _read(p: Path) -> str | None:
    try:
        t = p.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return t if t.strip() else None


def _cpython(rel: str) -> str:
    return f"cpython-{PYTHON}/{rel}"


def _stdlib_py() -> list[tuple[str, Path]]:
    """Non-test stdlib modules, as (relpath, path) in path-hash order (a fair spread)."""
    root = _stdlib()
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP and not x.startswith("."))
        for f in files:
            if f.endswith(".py"):
                p = Path(d) / f
                out.append((p.relative_to(root).as_posix(), p))
    return sorted(out, key=lambda rp: _phash(rp[0]))


class _Budget(sample.Budget):
    """A group's budget that takes (text, source, license)."""

    def __init__(self, group: str, limit: float):
        super().__init__(limit)
        self.group = group

    def add(self, text: str, source: str, license: str = PSF):
        super().add(dict(group=self.group, source=source, license=license, text=text))


def _defs(body, prefix=""):
    """(qualified name, node) of the function and class definitions under a statement list
    (no expression walk: fast)."""
    for st in body:
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{st.name}"
            yield name, st
            yield from _defs(st.body, f"{name}.")
        else:
            for field in ("body", "orelse", "finalbody"):
                sub = getattr(st, field, None)
                if isinstance(sub, list):
                    yield from _defs(sub, prefix)
            for h in getattr(st, "handlers", None) or ():
                yield from _defs(h.body, prefix)


def _docstrings(files, b: dict):
    """Module/function/class/example docstrings into their groups' budgets."""
    kinds = ("RedPajamaWikipedia", "RedPajamaC4", "RedPajamaArXiv", "RedPajamaStackExchange")
    for rel, p in files:
        if all(b[k].full for k in kinds):
            return
        src = _read(p)
        if src is None:
            continue
        try:
            tree = ast.parse(src, filename=rel)
        except (SyntaxError, ValueError):
            continue
        where = _cpython(f"Lib/{rel}")
        mod = ast.get_docstring(tree)
        if mod:
            (b["RedPajamaStackExchange"] if ">>>" in mod else b["RedPajamaWikipedia"]).add(
                mod, where)
        for name, node in _defs(tree.body):
            d = ast.get_docstring(node)
            if not d:
                continue
            if ">>>" in d:
                b["RedPajamaStackExchange"].add(d, f"{where}:{name}")
            elif isinstance(node, ast.ClassDef):
                b["RedPajamaArXiv"].add(d, f"{where}:{name}")
            else:
                b["RedPajamaC4"].add(d, f"{where}:{name}")


def _books(b: _Budget):
    root = _stdlib()
    for p in [root / "LICENSE.txt"] + sorted((root / "idlelib").glob("*.txt")):
        t = _read(p) if p.is_file() else None
        if t:
            b.add(t, _cpython(f"Lib/{p.relative_to(root).as_posix()}"))


def _headers(b: _Budget):
    inc = Path(sysconfig.get_paths()["include"])
    files = sorted((x for x in inc.rglob("*.h") if x.is_file()),
                   key=lambda x: _phash(x.relative_to(inc).as_posix()))
    for p in files:
        t = _read(p)
        if t:
            b.add(t, _cpython(f"Include/{p.relative_to(inc).as_posix()}"))


def _distribution(name: str, version: str, site_dirs: list[str]):
    """(site folder, Distribution) of distribution `name` at exactly `version`."""
    for d in site_dirs:
        for dist in md.distributions(path=[d]):
            if (dist.metadata["Name"] or "").lower() == name.lower():
                if dist.version != version:
                    raise DataError(f"{d}: {name} {dist.version} installed; WEB_FILES lists "
                                    f"{version} (update the table and the NOTICE)")
                return Path(d), dist
    raise DataError(f"--site_dirs: no {name}=={version} in {site_dirs}")


def license_texts(site_dirs: list[str]) -> str:
    """CPython's LICENSE and every WEB_FILES distribution's license file, verbatim."""
    parts = [(f"CPython {PYTHON}: LICENSE.txt", (_stdlib() / "LICENSE.txt").read_text())]
    for dist, version, *_ in dict.fromkeys((w[0], w[1]) for w in WEB_FILES):
        rel, stop = LICENSE_FILES[dist]
        text = _distribution(dist, version, site_dirs)[1].read_text(rel)
        if text is None:
            raise DataError(f"{dist}-{version}.dist-info/{rel}: missing")
        if stop:
            text = text[:text.index(stop)]
        parts.append((f"{dist} {version}: {rel}", text))
    bar = "=" * 78
    return "".join(f"{bar}\n{title}\n{bar}\n\n{text.strip()}\n\n" for title, text in parts)


def _web(b: dict, site_dirs: list[str]):
    root = _stdlib()
    for lang, rels in STDLIB_WEB.items():
        for rel in rels:
            b[lang].add(_read(root / rel) or "", _cpython(f"Lib/{rel}"))
    for dist, version, lic, lang, rels in WEB_FILES:
        site = _distribution(dist, version, site_dirs)[0]
        for rel in rels:
            t = _read(site / rel)
            if t is None:
                raise DataError(f"{site / rel}: missing or not UTF-8")
            b[lang].add(t, f"{dist}-{version}/{rel}", lic)


def collect(max_mb: float, site_dirs: list[str]) -> list[dict]:
    """Every document, as {group, source, license, text}, in group then choice order."""
    if platform.python_version() != PYTHON:
        raise DataError(f"this is Python {platform.python_version()}; the corpus is built "
                        f"from CPython {PYTHON} (change PYTHON and the NOTICE to move)")
    cap = max_mb * 1e6
    b = {k: _Budget(k, share * cap) for k, share in sample.SHARES.items()}
    for key in sorted(pydoc_data.topics.topics):
        b["RedPajamaCommonCrawl"].add(pydoc_data.topics.topics[key],
                                      _cpython(f"Lib/pydoc_data/topics.py:{key}"))
    py = _stdlib_py()
    _docstrings(py, b)
    _books(b["RedPajamaBook"])
    _headers(b["RedPajamaGithub"])
    for rel, p in py:
        if b["python"].full:
            break
        t = _read(p)
        if t:
            b["python"].add(t, _cpython(f"Lib/{rel}"))
    _web(b, site_dirs)
    return [d for k in sample.SHARES for d in b[k].docs]


def notice(docs: list[dict]) -> str:
    """NOTICE.md: every source and license, with document and byte counts."""
    by: dict = {}
    for d in docs:
        origin = d["source"].split("/")[0]
        e = by.setdefault((origin, d["license"]), [0, 0])
        e[0] += 1
        e[1] += len(d["text"].encode("utf-8"))
    lines = ["# The bundled sample corpus: sources and licenses", "",
             f"`{CORPUS_FILE}` holds {len(docs)} documents of real text, copied unchanged from "
             f"CPython {PYTHON} and the package files listed below, each under the license "
             "named here (and in the document's `license` field; its `source` field names the "
             "file, and for docstrings and help topics the definition or topic). Built by "
             "`python -m crystal.data.corpus.build`. The license texts are in "
             f"`{LICENSES_FILE}`.", "",
             "| origin | license | documents | bytes |", "|---|---|---|---|"]
    for (origin, lic), (n, nb) in sorted(by.items()):
        lines.append(f"| {origin} | {lic} | {n} | {nb} |")
    lines += ["", "Licenses:", ""]
    lines += [f"- `{k}`: {LICENSE_NAMES[k]}" for k in sorted({d["license"] for d in docs})]
    return "\n".join(lines) + "\n"


def write(docs: list[dict], licenses: str, out_dir: Path):
    raw = b"".join(json.dumps(d, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n"
                   for d in docs)
    fileio.atomic_write_bytes(out_dir / CORPUS_FILE, zstandard.ZstdCompressor(
        level=ZSTD_LEVEL, write_checksum=True).compress(raw))
    fileio.atomic_write_bytes(out_dir / NOTICE_FILE, notice(docs).encode("utf-8"))
    fileio.atomic_write_bytes(out_dir / LICENSES_FILE, licenses.encode("utf-8"))


def main(argv=None):
    def body(a):
        docs = collect(a.max_mb, a.site_dirs)
        write(docs, license_texts(a.site_dirs), Path(a.out))
        print(f"{len(docs)} documents, {sum(len(d['text'].encode()) for d in docs) / 1e6:.2f} "
              f"MB of text -> {Path(a.out) / CORPUS_FILE} "
              f"({(Path(a.out) / CORPUS_FILE).stat().st_size / 1e6:.2f} MB), sha256 "
              f"{fileio.file_sha256(Path(a.out) / CORPUS_FILE)}")
    cli.run(body, doc=__doc__.split("\n\n")[0], argv=argv, flags=[
        cli.Flag("site_dirs", "site-packages folders holding WEB_FILES (default: sys.path)",
                 list, list(sys.path)),
        cli.Flag("out", "folder to write the corpus and NOTICE to", default=str(HERE)),
        cli.Flag("max_mb", "approximate size cap in MB", float, 8.0)])


if __name__ == "__main__":
    main()
