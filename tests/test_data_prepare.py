"""Preparation: shard layout and content, provenance, determinism, verification, bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest

import data_fixtures as F
from crystal import config as cfg_lib
from crystal.data import prepare, sample, verify
from crystal.data.sources import BadRecordError, DataError
from crystal.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return F.write_corpus(tmp_path_factory.mktemp("corpus") / "c")


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    cfg = F.small_config(tmp)
    man = prepare.prepare(cfg, tmp / "wd", corpus, workers=1)
    return cfg, tmp, man


def _load(wd, rel):
    return np.load(wd / "data" / rel, mmap_mode="r", allow_pickle=False)


def _rows(wd, entry):
    return np.concatenate([_load(wd, c["path"]) for c in entry["shards"]])


def test_layout_matches_data_format(prepared):
    cfg, tmp, man = prepared
    wd = tmp / "wd"
    on_disk = json.loads((wd / "data" / "manifest.json").read_text())
    assert on_disk == man
    assert man["format"] == 2 and man["seq_len"] == 32 and man["num_shards"] == 3
    assert man["dtype"] == "uint16" and man["seed"] == cfg.seed
    # Code version and full config are logged beside the data, not part of its identity.
    assert not {"crystal_version", "git_commit", "config"} & set(man)
    log = json.loads((wd / "data" / prepare.LOG_FILE).read_text())
    assert log["crystal_version"] == "0.1.0" and log["git_commit"]
    assert log["config"] == cfg_lib.to_json_dict(cfg)
    tok = Tokenizer.load(wd / "data" / "tokenizer.model", man["tokenizer"]["special_tokens"])
    assert man["tokenizer"]["sha256"] == tok.sha256 and man["tokenizer"]["vocab_size"] == 512
    assert man["tokenizer"]["special_tokens"] == list(cfg.tokenizer.special_tokens)
    assert sorted(man["groups"]) == [
        "slimpajama.even.RedPajamaC4", "slimpajama.even.RedPajamaWikipedia",
        "slimpajama.odd.RedPajamaC4", "slimpajama.odd.RedPajamaWikipedia",
        "starcoder.css", "starcoder.python", "text.notes"]
    for g, e in man["groups"].items():
        assert [c["index"] for c in e["shards"]] == [0, 1, 2]
        assert [c["path"] for c in e["shards"]] == [f"{g}/shard_{i:05d}.npy" for i in range(3)]
        assert e["val"]["path"] == f"{g}/val.npy" and e["val"]["num_sequences"] >= 1
        assert e["val"]["offset"] == 0
        for c in e["shards"] + [e["val"]]:
            a = _load(wd, c["path"])
            assert a.dtype == np.uint16 and a.shape == (c["num_sequences"], 33)
            assert c["num_tokens"] == a.size
        offsets = [c["offset"] for c in [e["val"]] + e["shards"]]
        sizes = [c["num_tokens"] for c in [e["val"]] + e["shards"]]
        assert offsets == list(np.cumsum([0] + sizes[:-1]))    # contiguous in the stream
        sizes = [c["num_sequences"] for c in e["shards"]]
        assert max(sizes) - min(sizes) <= 1
        assert all(c["tokens_per_source"] == {g: c["num_tokens"]} for c in e["shards"])
        used = sum(c["num_tokens"] for c in e["shards"]) + e["val"]["num_tokens"]
        assert used + e["dropped_tokens"] == e["num_tokens"]
    assert not list((wd / "data").rglob("*.tmp-*")) and not (wd / "data" / ".prepare-tmp").exists()


def test_rows_are_documents_with_eos_and_no_bos(prepared, corpus):
    """Every complete piece between EOS is one whole source document, each in val or train
    only; no BOS anywhere."""
    cfg, tmp, man = prepared
    wd = tmp / "wd"
    tok = Tokenizer.load(wd / "data" / "tokenizer.model")
    from crystal.data.sources import iter_documents
    docs: dict = {}
    for g, t in iter_documents(corpus):
        docs.setdefault(g, set()).add(tuple(tok.encode(t)))
    for g, e in man["groups"].items():
        def pieces(a):
            flat = np.asarray(a).reshape(-1)
            cut = np.flatnonzero(flat == 2)
            return [tuple(flat[a + 1:b].tolist()) for a, b in zip(cut[:-1], cut[1:])]
        train, val = _rows(wd, e), _load(wd, e["val"]["path"])
        assert not (train == 1).any() and not (val == 1).any()
        eos = int((train == 2).sum()) + int((val == 2).sum())
        assert e["num_documents"] - e["dropped_tokens"] <= eos <= e["num_documents"]
        tp, vp = pieces(train), pieces(val)
        assert tp and all(p in docs[g] for p in tp)
        assert all(p in docs[g] for p in vp)
        assert not set(tp) & set(vp)
        assert int(train.max()) < 512


def test_documents_follow_the_seeded_global_shuffle(prepared, corpus):
    """Train rows hold the group's documents in the order of the (seed, group) permutation
    of the source order, after the validation documents."""
    cfg, tmp, man = prepared
    wd = tmp / "wd"
    tok = Tokenizer.load(wd / "data" / "tokenizer.model")
    from crystal.data.sources import iter_documents
    g = "slimpajama.even.RedPajamaC4"
    src = [tuple(tok.encode(t) + [2]) for gg, t in iter_documents(corpus) if gg == g]
    perm = np.random.default_rng(prepare.group_seed(cfg.seed, g)).permutation(len(src))
    assert list(perm) != sorted(perm)  # the order really is shuffled
    e = man["groups"][g]
    stream = tuple(t for i in perm for t in src[i])
    val = tuple(_load(wd, e["val"]["path"]).reshape(-1).tolist())
    train = tuple(_rows(wd, e).reshape(-1).tolist())
    assert val + train == stream[:len(val) + len(train)]
    assert len(stream) - len(val) - len(train) == e["dropped_tokens"] < 33
    ends = np.cumsum([len(src[i]) for i in perm])
    assert e["val_documents"] == int((ends - [len(src[i]) for i in perm] < len(val)).sum())


def test_every_row_traces_back_to_its_documents(prepared, corpus):
    """documents.npy + sources.json: the documents a stored row holds are the source
    records (file, line or row) whose tokens they are, cut where the row cuts them."""
    from crystal.data import sources
    from crystal.data.provenance import Provenance
    cfg, tmp, man = prepared
    wd = tmp / "wd"
    tok = Tokenizer.load(wd / "data" / "tokenizer.model")
    prov = Provenance(wd, man)
    assert prov.sources == [r for s in sources.discover(corpus) for r in s.relpaths]
    for g in ("slimpajama.odd.RedPajamaC4", "starcoder.python", "text.notes"):
        e = man["groups"][g]
        assert len(prov.table(g)) == e["num_documents"]
        for shard, row in ((-1, 0), (0, 0), (1, 3), (2, e["shards"][2]["num_sequences"] - 1)):
            stored = _load(wd, (e["val"] if shard < 0 else e["shards"][shard])["path"])[row]
            spans = prov.spans(g, shard, row)
            assert sum(s["end"] - s["start"] for s in spans) == 33
            got = []
            for s in spans:
                rec = sources.read_record(corpus / s["file"], s["record"])
                text = rec.get("text") or rec.get("content")
                doc = tok.encode(text) + [2]
                assert len(doc) == s["tokens"]
                got += doc[s["start"]:s["end"]]
            assert got == stored.tolist(), (g, shard, row)


def test_deterministic_across_workers_and_runs(prepared, corpus):
    cfg, tmp, man = prepared
    man3 = prepare.prepare(cfg, tmp / "wd3", corpus, workers=2)
    for g, e in man["groups"].items():
        for c, c3 in zip(e["shards"] + [e["val"]], man3["groups"][g]["shards"] +
                         [man3["groups"][g]["val"]]):
            assert (tmp / "wd" / "data" / c["path"]).read_bytes() == \
                   (tmp / "wd3" / "data" / c3["path"]).read_bytes()
    a = dict(man, input=None)
    b = dict(man3, input=None)
    assert a == b  # shard hashes, counts, tokenizer, document tables: all the same
    other = prepare.prepare(F.small_config(tmp, seed=7), tmp / "wd7", corpus)
    e, o = man["groups"]["starcoder.python"], other["groups"]["starcoder.python"]
    assert o["num_tokens"] == e["num_tokens"]
    assert [c["sha256"] for c in o["shards"]] != [c["sha256"] for c in e["shards"]]


def test_verify_reports_each_mismatch_by_name(prepared, tmp_path):
    cfg, tmp, man = prepared
    import shutil
    wd = tmp_path / "wd"
    shutil.copytree(tmp / "wd", wd)
    n, problems = verify.verify(wd)
    # tokenizer, sources.json, and per group its shards, val and document table
    assert problems == [] and n == 2 + sum(len(e["shards"]) + 2 for e in man["groups"].values())
    p = wd / "data" / "starcoder.css" / "shard_00001.npy"
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0xFF
    p.write_bytes(bytes(raw))
    (wd / "data" / "text.notes" / "val.npy").unlink()
    _, problems = verify.verify(wd)
    assert len(problems) == 2
    assert problems[0].startswith("starcoder.css/shard_00001.npy: sha256 mismatch")
    assert problems[1] == "text.notes/val.npy: missing"
    r = subprocess.run([sys.executable, "-m", "crystal.data.verify", f"--workdir={wd}"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "bad: starcoder.css/shard_00001.npy: sha256 mismatch" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: 2 of ")
    r = subprocess.run([sys.executable, "-m", "crystal.data.verify",
                        f"--workdir={tmp / 'wd'}"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("ok:")


def test_ensure_prepared_reuses_or_refuses(corpus, tmp_path):
    cfg = F.small_config(tmp_path, **{"data.input": str(corpus)})
    wd = tmp_path / "wd"
    man = prepare.ensure_prepared(cfg, wd)
    mpath = wd / "data" / "manifest.json"
    stamp = mpath.stat().st_mtime_ns
    assert prepare.ensure_prepared(cfg, wd) == man and mpath.stat().st_mtime_ns == stamp
    # settings that do not change the bytes do not count as a different dataset
    same = F.small_config(tmp_path, **{"data.input": str(corpus), "data.workers": 2,
                                       "train.global_batch_size": 8})
    assert prepare.ensure_prepared(same, wd) == man
    other = F.small_config(tmp_path, **{"data.input": str(corpus), "data.seq_len": 16})
    with pytest.raises(prepare.DataMismatchError, match=r"seq_len: 32 -> 16"):
        prepare.ensure_prepared(other, wd)
    with pytest.raises(prepare.DataMismatchError):
        prepare.prepare(other, wd)
    assert mpath.stat().st_mtime_ns == stamp  # nothing overwritten


def test_crashed_run_is_redone_not_trusted(corpus, tmp_path):
    """Leftovers without a manifest (a crash) are cleared and prepared again."""
    cfg = F.small_config(tmp_path, **{"data.input": str(corpus)})
    wd = tmp_path / "wd"
    stale = wd / "data" / "starcoder.python" / "shard_00000.npy"
    stale.parent.mkdir(parents=True)
    np.save(stale, np.zeros((2, 33), np.uint16))
    (wd / "data" / "gone.group").mkdir()
    np.save(wd / "data" / "gone.group" / "shard_00000.npy", np.zeros((2, 33), np.uint16))
    man = prepare.ensure_prepared(cfg, wd)
    assert verify.verify(wd)[1] == []
    assert not (wd / "data" / "gone.group").exists()
    assert man["groups"]["starcoder.python"]["shards"][0]["num_sequences"] > 2


def test_old_format_manifest_is_refused_by_every_reader(prepared, corpus, tmp_path):
    """Format 1 called the shards chunks (train_NNNNN.npy): every tool names the file and
    field; --overwrite prepares the workdir again."""
    import shutil
    from crystal.data import loader, manifest
    cfg, tmp, man = prepared
    wd = tmp_path / "old"
    shutil.copytree(tmp / "wd", wd)
    for p in (wd / "data").rglob("shard_*.npy"):
        p.rename(p.with_name(p.name.replace("shard_", "train_")))
    old = dict(man, format=1, num_chunks=man["num_shards"])
    (wd / "data" / "manifest.json").write_text(json.dumps(old))
    mpath = wd / "data" / "manifest.json"
    msg = rf"^{mpath}: field format: 1 is the old layout .*crystal.data.prepare --overwrite"
    for read in (lambda: manifest.read(wd), lambda: loader.StageLoader(cfg, wd, 1),
                 lambda: prepare.ensure_prepared(cfg, wd)):
        with pytest.raises(DataError, match=msg):
            read()
    assert verify.verify(wd)[1][0].startswith(f"{mpath}: field format: 1 is the old layout")
    assert prepare.prepare(cfg, wd, corpus, overwrite=True)["format"] == 2
    assert not list((wd / "data").rglob("train_*.npy")) and verify.verify(wd)[1] == []


def _bad_corpus(root):
    F.write_corpus(root)
    p = root / "slimpajama" / "chunk1" / "example_train_2.jsonl"
    lines = p.read_bytes().split(b"\n")
    lines.insert(3, b'{"text": "broken json')
    lines.insert(5, b'{"text": "", "meta": {"redpajama_set_name": "RedPajamaC4"}}')
    p.write_bytes(b"\n".join(lines))
    z = root / "slimpajama" / "chunk1" / "example_train_1.jsonl.zst"
    z.write_bytes(z.read_bytes()[:-20])
    return root


def test_bad_records_fail_by_default_and_leave_no_manifest(tmp_path):
    root = _bad_corpus(tmp_path / "bad")
    cfg = F.small_config(tmp_path)
    with pytest.raises(BadRecordError) as ei:
        prepare.prepare(cfg, tmp_path / "wd", root)
    assert str(ei.value).startswith(str(root / "slimpajama/chunk1/example_train_1.jsonl.zst"))
    assert "corrupt_zstd" in str(ei.value)
    assert not (tmp_path / "wd" / "data" / "manifest.json").exists()
    assert not (tmp_path / "wd" / "data" / prepare.TMP_DIR).exists()
    r = subprocess.run([sys.executable, "-m", "crystal.data.prepare",
                        "--config=configs/crystalcoder_tiny.py",
                        "--config.tokenizer.vocab_size=512", "--config.model.vocab_size=576",
                        "--config.data.seq_len=32", "--config.data.num_shards=3",
                        f"--config.data.cache_dir={tmp_path / 'cache'}",
                        f"--workdir={tmp_path / 'wd'}", f"--input={root}"],
                       capture_output=True, text=True, cwd=cfg_lib.REPO_ROOT)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {root}/slimpajama/chunk1/example_train_1.jsonl.zst")
    r = subprocess.run(r.args + ["--on_bad_record=skip", "--workers=2"], capture_output=True,
                       text=True, cwd=cfg_lib.REPO_ROOT)
    assert r.returncode == 0, r.stderr
    assert "bad records skipped: 3" in r.stdout and "skipped 3 bad records" in r.stderr
    man = json.loads((tmp_path / "wd" / "data" / "manifest.json").read_text())
    assert man["bad_records"]["skipped"] == 3 and verify.verify(tmp_path / "wd")[1] == []


def test_bad_records_skipped_are_counted(tmp_path):
    root = _bad_corpus(tmp_path / "bad")
    cfg = F.small_config(tmp_path)
    man = prepare.prepare(cfg, tmp_path / "wd", root, on_bad_record="skip")
    b = man["bad_records"]
    assert b["by_reason"] == {"corrupt_zstd": 1, "empty_document": 1, "invalid_json": 1}
    assert b["skipped"] == 3 and b["files_skipped"] == 1
    assert [(x["file"], x["line"], x["reason"]) for x in b["examples"]] == [
        ("slimpajama/chunk1/example_train_1.jsonl.zst", None, "corrupt_zstd"),
        ("slimpajama/chunk1/example_train_2.jsonl", 4, "invalid_json"),
        ("slimpajama/chunk1/example_train_2.jsonl", 6, "empty_document")]
    # the odd half lost its only .zst shard but keeps shard 3
    assert man["groups"]["slimpajama.odd.RedPajamaC4"]["num_documents"] > 0
    assert verify.verify(tmp_path / "wd")[1] == []


def test_too_small_group_is_a_clear_error(corpus, tmp_path):
    cfg = F.small_config(tmp_path, **{"data.num_shards": 1000})
    with pytest.raises(DataError, match=r"^data group slimpajama\.even\.RedPajamaC4: \d+ tokens "
                       r"give \d+ sequences of 33 tokens; \d+ validation \+ at least "
                       r"data.num_shards=1000 training sequences are needed"):
        prepare.prepare(cfg, tmp_path / "wd", corpus)


def test_sample_corpus_has_every_config_group_and_prepares(tmp_path):
    cfg = cfg_lib.load("crystalcoder_tiny", {
        "data.cache_dir": str(tmp_path / "cache"), "data.sample_max_mb": 0.6,
        "data.seq_len": 64, "data.workers": 2})
    s1 = sample.ensure_sample(cfg)  # the cached copy prepare will use
    assert s1.parent == tmp_path / "cache" / "sample"
    b = sample.build(tmp_path / "s2", max_mb=0.6)
    files = sorted(p.relative_to(s1) for p in s1.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "s2") for p in (tmp_path / "s2").rglob("*")
                           if p.is_file())
    for f in files:
        assert (s1 / f).read_bytes() == (tmp_path / "s2" / f).read_bytes()
    assert 0.3e6 < b["total_bytes"] < 1.2e6
    # the default-size corpus is several MB (the budget shares alone say so)
    assert sum(sample.SHARES.values()) * 8.0 > 5
    man = prepare.ensure_prepared(cfg, tmp_path / "wd")
    assert man["input"]["kind"] == "sample"
    log = json.loads((tmp_path / "wd" / "data" / prepare.LOG_FILE).read_text())
    assert log["unmatched_mixture_patterns"] == []
    groups = list(man["groups"])
    for big in ("crystalcoder_7b", "crystalcoder_tiny"):
        c = cfg_lib.load(big)
        for s in cfg_lib.stage_names(c):
            for comp in c.stages[s].mixture.values():
                assert cfg_lib.match_groups(comp.groups, groups), comp.groups
    sets = ["RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaArXiv",
            "RedPajamaBook", "RedPajamaWikipedia", "RedPajamaStackExchange"]
    for half in ("even", "odd"):
        for s in sets:
            assert f"slimpajama.{half}.{s}" in groups
    for lang in ("python", "html", "javascript", "css"):
        assert f"starcoder.{lang}" in groups
    assert (tmp_path / "cache" / "sample").is_dir()
    assert verify.verify(tmp_path / "wd")[1] == []


def test_overwrite_with_another_tokenizer_uses_the_new_one(corpus, tmp_path):
    """Re-preparing a workdir in the same process must not reuse the old tokenizer."""
    a = F.small_config(tmp_path)
    b = F.small_config(tmp_path, **{"tokenizer.vocab_size": 600, "model.vocab_size": 640})
    prepare.prepare(a, tmp_path / "wd", corpus)
    again = prepare.prepare(b, tmp_path / "wd", corpus, overwrite=True)
    fresh = prepare.prepare(b, tmp_path / "fresh", corpus)
    assert again["tokenizer"]["sha256"] == fresh["tokenizer"]["sha256"]
    assert again["groups"] == fresh["groups"]


def test_given_tokenizer_model_and_int32_storage(prepared, corpus, tmp_path):
    """tokenizer.model_path (e.g. LLaMA's) is used as is; a vocab past 65536 stores int32."""
    cfg, tmp, man = prepared
    given = tmp / "wd" / "data" / "tokenizer.model"
    big = F.small_config(tmp_path, **{"tokenizer.model_path": str(given),
                                      "model.vocab_size": 70_000})
    m = prepare.prepare(big, tmp_path / "wd", corpus)
    assert m["tokenizer"]["sha256"] == man["tokenizer"]["sha256"]
    assert m["tokenizer"]["trained"] is False and m["dtype"] == "int32"
    assert not (tmp_path / "cache" / "tokenizers").exists()  # nothing trained
    for g, e in man["groups"].items():
        for c, c2 in zip(e["shards"], m["groups"][g]["shards"]):
            a, b = _load(tmp / "wd", c["path"]), _load(tmp_path / "wd", c2["path"])
            assert b.dtype == np.int32 and np.array_equal(a, b)


def test_atomic_open_gives_the_old_file_or_the_whole_new_one(tmp_path):
    """The one writer behind every file a later run reads (shards, manifests, ledgers,
    metrics, plots, plans): a write that raises leaves the old file and no temp file."""
    from crystal import fileio
    path = tmp_path / "sub" / "ledger.json"
    with fileio.atomic_open(path, "w") as f:
        f.write("old")
    with pytest.raises(RuntimeError):
        with fileio.atomic_open(path, "w") as f:
            f.write("half of the new")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.json"]
    with fileio.atomic_open(path, "wb", sync=True) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.json"]
