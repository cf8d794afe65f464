"""The bundled sample corpus is the same bytes everywhere: the recorded file, the same
documents, tokenizer and manifest in an environment with other packages installed, and the
default run's recorded hashes and short-run loss (crystal.data.corpus.check)."""
import json
import os
import subprocess
import sys
import sysconfig

import pytest

from crystal import config as cfg_lib
from crystal import fileio
from crystal.data import sample, sources
from crystal.data.corpus import build, check
from crystal.errors import DataError


def test_bundled_corpus_is_the_recorded_file(tmp_path):
    docs = sample.read_corpus()
    assert fileio.file_sha256(sample.CORPUS) == sample.expected()["corpus_sha256"]
    assert len(docs) == 3103 and {d["group"] for d in docs} == set(sample.SHARES)
    notice = (sample.CORPUS_DIR / "NOTICE.md").read_text()
    licenses = (sample.CORPUS_DIR / "LICENSES.txt").read_text()
    for d in docs:    # every document names its source and a license the NOTICE lists
        assert d["source"] and f"`{d['license']}`" in notice
        assert d["source"].split("/")[0] in notice
    assert "Python Software Foundation" in licenses and "Apache License" in licenses
    # The full corpus at the default size, in the written order; edits are refused.
    assert sum(len(v) for v in sample.collect(8.0, docs).values()) == len(docs)
    bad = tmp_path / "sample.jsonl.zst"
    raw = bytearray(sample.CORPUS.read_bytes())
    raw[len(raw) // 2] ^= 1
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"^{bad}: sha256 \w+ is not the recorded"):
        sample.read_corpus(bad)


# An environment with more installed than this one: a venv seeing this one's packages plus
# a distribution with exactly what the old sample builder drew on (license files, HTML, JS,
# CSS in site-packages).
_EXTRA = {"extra_pkg/page.html": "<html><body>" + "installed elsewhere " * 40 + "</body></html>",
          "extra_pkg/app.js": "function f() { return 'installed elsewhere'; }\n" * 40,
          "extra_pkg/style.css": "body { color: red; }\n" * 60,
          "extra_pkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: extra-pkg\n"
                                              "Version: 1.0\n",
          "extra_pkg-1.0.dist-info/LICENSE": "Permission is granted. " * 200}

_BUILD = """
import json, sys
from crystal import config
from crystal.data import prepare, sample
cfg = config.load("crystalcoder_tiny", {"data.sample_max_mb": 0.6, "data.workers": 1,
                  "data.seq_len": 64, "tokenizer.vocab_size": 512, "model.vocab_size": 576,
                  "data.cache_dir": sys.argv[2]})
prepare.prepare(cfg, sys.argv[1])
print(json.dumps(sample.info(sample.ensure_sample(cfg))))
"""


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".lock"
            and p.name != "prepare_log.json"}     # the log holds timings


def test_same_bytes_whatever_else_is_installed(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                    str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "parent.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    for rel, text in _EXTRA.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    runs = {}
    for name, python in (("here", sys.executable), ("there", str(venv / "bin" / "python"))):
        r = subprocess.run([python, "-c", _BUILD, str(tmp_path / name / "wd"),
                            str(tmp_path / name / "cache")], capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = json.loads(r.stdout.strip().splitlines()[-1])
    assert "extra_pkg" in subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; "
         "print(sorted(__import__('os').listdir(sysconfig.get_paths()['purelib'])))"],
        capture_output=True, text=True, check=True).stdout
    assert runs["here"] == runs["there"]
    # The corpus files and the trained tokenizer (cache), the shards and the manifest (wd).
    here, there = _files(tmp_path / "here"), _files(tmp_path / "there")
    assert "wd/data/manifest.json" in here and any(k.startswith("cache/tokenizers/")
                                                   for k in here)
    assert here.keys() == there.keys()
    assert [k for k in here if here[k] != there[k]] == []
    texts = [t for _, t in sources.iter_documents(tmp_path / "there" / "cache" / "sample" /
                                                  sample.cache_key(0.6))]
    assert not any("installed elsewhere" in t or "Permission is granted" in t for t in texts)


def test_default_run_matches_the_recorded_figures(tmp_path):
    """The README's main job from a fresh workdir, as a fresh clone runs it: corpus,
    tokenizer and manifest hash as recorded, and its first 20 steps end at the recorded
    loss (bitwise on this CPU kind, within the tolerance on another)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # conftest's 8 devices
    r = subprocess.run([sys.executable, "-m", "crystal.data.corpus.check",
                        f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True,
                       env=env, cwd=cfg_lib.REPO_ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1].startswith("ok: the default run matches")
    man = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    assert man["input"]["documents_sha256"] == sample.expected()["documents_sha256"]
    assert build.CORPUS_FILE == sample.CORPUS.name


def test_check_allows_the_tolerance_on_another_cpu_kind(monkeypatch):
    want = sample.expected()
    got = {k: want[k] for k in ("corpus_sha256", "documents_sha256", "tokenizer_sha256",
                                "manifest_sha256")}
    near = dict(got, loss=want["loss"] * (1 + want["loss_tolerance"] / 2))
    far = dict(got, loss=want["loss"] * (1 + want["loss_tolerance"] * 2))
    monkeypatch.setattr(check, "cpu_kind", lambda: want["loss_cpu"])
    assert check.check(None, got | {"loss": want["loss"]}) == []
    assert len(check.check(None, near)) == 1            # the same CPU kind: bitwise
    monkeypatch.setattr(check, "cpu_kind", lambda: "riscv64")
    assert check.check(None, near) == [] and len(check.check(None, far)) == 1
    assert check.check(None, dict(far, tokenizer_sha256="0"))[0].startswith(
        "tokenizer_sha256: 0 (expected")
