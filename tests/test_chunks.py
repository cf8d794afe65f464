"""LLM360's data chunks as files: the export is what the loader fed, rebuilt bit for bit; the
import reads it (and LLM360's token_ids/source lines) back into a prepared workdir; bad
release files are one-line errors that leave nothing behind."""
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from crystal import config as cfg_lib
from crystal.data import manifest as man_lib
from crystal.data import prepare, verify
from crystal.data.chunks import __main__ as chunks_main
from crystal.data.chunks import export, files, numbering
from crystal.data.loader import StageLoader
from crystal.data.provenance import Provenance
from crystal.errors import DataError

STAGE, CHUNK = 2, 1


def tiny(**over):
    return cfg_lib.load("crystalcoder_tiny", {"data.sample_max_mb": 2.0, **over})


def _cli(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=cfg_lib.REPO_ROOT, timeout=300)


@pytest.fixture(scope="module")
def release(loader_workdir, tmp_path_factory):
    """The data chunks of stage 2, exported by the command line with two processes."""
    out = tmp_path_factory.mktemp("release") / "r"
    r = _cli("crystal.data.chunks", f"--workdir={loader_workdir}", f"--stage={STAGE}",
             "--all", "--workers=2", f"--out={out}")
    assert r.returncode == 0, r.stderr
    assert "train_00005.jsonl  stage 2 chunk 1  steps 30..59  480 rows" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == f"wrote 4 data chunks to {out}"
    return out


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_numbering_runs_across_stages():
    cfg = tiny(**{"stages.stage_3.steps": 3})
    got = numbering.chunks(cfg)
    assert [(c.number, c.stage, c.index) for c in got] == [
        (n, s, k) for n, (s, k) in enumerate([(1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1),
                                              (2, 2), (2, 3), (3, 0), (3, 1), (3, 2)])]
    for c in got:     # a chunk's steps are exactly the steps chunk_of_step maps to it
        steps = numbering.stage_steps(cfg, c.stage)
        assert [s for s in range(steps) if numbering.chunk_of_step(cfg, c.stage, s) ==
                c.index] == list(range(c.first_step, c.end_step))
    assert numbering.select(cfg, 2, 1) == [got[5]] == numbering.select(cfg, None, 5)
    with pytest.raises(DataError, match=r"--chunk=4: stage 2 has data chunks 0..3"):
        numbering.select(cfg, 2, 4)


def test_export_is_what_the_loader_fed_and_rebuilds_bit_identical(loader_workdir, release,
                                                                  tmp_path):
    wd, cfg = loader_workdir, tiny()
    (chunk,) = numbering.select(cfg, STAGE, CHUNK)
    # Rebuilt alone, in this process: the same bytes as by two processes along with others.
    again = export.export(cfg, wd, tmp_path / "again", [chunk])
    for name in ("tokenizer.model", chunk.file):
        assert (release / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    index = json.loads((release / "chunks.json").read_text())
    assert [c["path"] for c in index["chunks"]] == [f"train_{n:05d}.jsonl" for n in (4, 5, 6, 7)]
    assert index == dict(again, chunks=index["chunks"]) and index["chunks"][1] == again["chunks"][0]
    e = index["chunks"][1]
    assert (e["chunk"], e["stage"], e["index"], e["path"]) == (5, 2, 1, "train_00005.jsonl")
    assert e["steps"] == [30, 60] and e["checkpoint_step"] == 120 + 60
    man, sha = man_lib.read(wd)
    assert index["data_sha256"] == sha and index["fields"] == list(files.ROW_FIELDS)

    rows = _rows(release / chunk.file)
    assert len(rows) == e["num_rows"] == 30 * 16
    first = (release / chunk.file).read_text().splitlines()[0]   # compact JSON, field order
    assert first == json.dumps(rows[0], separators=(",", ":")) and list(rows[0]) == list(
        files.ROW_FIELDS)
    ld = StageLoader(cfg, wd, STAGE)             # the training iterator, from step 30
    ld.set_state(dict(ld.get_state(), step=30))
    for step in range(30, 60):
        b = next(ld)
        for p in range(16):
            row = rows[(step - 30) * 16 + p]
            g = ld.group_names[b["group"][p]]
            assert row["token_ids"] == [int(b["inputs"][p, 0])] + b["targets"][p].tolist()
            assert row["loss_mask"] == b["loss_mask"][p].astype(int).tolist()
            assert (row["source"], row["shard"], row["row"]) == (
                g, f"{g}:{b['shard'][p]}", int(b["row"][p]))
            assert (row["stage"], row["step"], row["position"], row["index"]) == (
                2, step, p, int(b["index"][p]))
            assert (row["fim"], row["substituted"], row["epoch"]) == (
                int(b["fim"][p]), int(b["substituted"][p]), int(b["epoch"][p]))
    assert e["fim_rows"] == sum(r["fim"] > 0 for r in rows) > 0
    assert e["num_loss_tokens"] == sum(map(sum, (r["loss_mask"] for r in rows)))

    # Tokens per source: the stored rows' tokens, counted as the manifest counts its shards.
    per_row = {f"{g}:{s['index']}": s["num_tokens"] // s["num_sequences"]
               for g, ge in man["groups"].items() for s in ge["shards"]}
    for g, n in e["tokens_per_source"].items():
        assert n == sum(k * per_row[sh] for sh, k in e["rows_per_shard"].items()
                        if sh.rsplit(":", 1)[0] == g)
    assert sum(e["tokens_per_source"].values()) == e["num_tokens"] == 480 * 129

    # Every row names the documents of its stored row; a row without FIM is that row.
    prov = Provenance(wd, man)
    plain = next(r for r in rows if r["fim"] == 0)
    g, k = plain["shard"].rsplit(":", 1)
    spans = prov.spans(g, int(k), plain["row"])
    assert plain["documents"] == [{x: s[x] for x in ("doc", "file", "record", "start", "end")}
                                  for s in spans]
    stored = np.load(man_lib.data_dir(wd) / man["groups"][g]["shards"][int(k)]["path"],
                     mmap_mode="r", allow_pickle=False)[plain["row"]]
    assert plain["token_ids"] == stored.tolist()
    assert all(sum(d["end"] - d["start"] for d in r["documents"]) == 129 for r in rows)


def test_import_reads_the_release_back(release, tmp_path):
    """prepare --input=RELEASE: the rows come back in order, as shards of their sources, with
    the export's tokenizer, and trace back to the released file and line."""
    cfg = tiny(**{"data.num_shards": 2})
    wd = tmp_path / "wd"
    r = _cli("crystal.data.prepare", "--config=configs/crystalcoder_tiny.py",
             "--config.data.num_shards=2", f"--workdir={wd}", f"--input={release}")
    assert r.returncode == 0, r.stderr
    man, _ = man_lib.read(wd)
    assert verify.verify(wd)[1] == []
    assert man["tokenizer"]["sha256"] == json.loads(
        (release / "chunks.json").read_text())["tokenizer"]["sha256"]
    rows = [r for n in (4, 5, 6, 7) for r in _rows(release / f"train_{n:05d}.jsonl")]
    for g, e in man["groups"].items():
        want = [r["token_ids"] for r in rows if r["source"] == g]
        got = np.concatenate([np.load(wd / "data" / s["path"], allow_pickle=False)
                              for s in [e["val"]] + e["shards"]])
        assert got.tolist() == want and e["num_documents"] == len(want)
    prov = Provenance(wd, man)
    (span,) = prov.spans("starcoder.python", 0, 0)
    first = _rows(release / "train_00004.jsonl")
    line = [i for i, r in enumerate(first, 1) if r["source"] == "starcoder.python"][
        man["groups"]["starcoder.python"]["val"]["num_sequences"]]
    assert (span["file"], span["record"], span["start"], span["end"]) == (
        "train_00004.jsonl", line, 0, 129)
    assert prov.record(span, cfg)["token_ids"] == first[line - 1]["token_ids"]
    # ... and a run can train on it: the stage's loader reads the imported groups.
    ld = StageLoader(tiny(**{"data.num_shards": 2}), wd, STAGE)
    assert next(ld)["inputs"].shape == (16, 128)


def _llm360_dir(release, root, lines=None):
    """LLM360's format: token_ids and source only, no index, no tokenizer beside it."""
    root.mkdir()
    rows = _rows(release / "train_00005.jsonl")[:40]
    text = lines if lines is not None else [
        json.dumps({"token_ids": r["token_ids"], "source": r["source"]}) for r in rows]
    (root / "train_000.jsonl").write_text("\n".join(text) + "\n")
    return root


def test_import_llm360_token_lines_and_bad_rows(release, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(cfg_lib.REPO_ROOT)
    tok = str(release / "tokenizer.model")
    over = {"tokenizer.model_path": tok, "data.num_shards": 1, "data.min_val_sequences": 0,
            "data.val_fraction": 0.0}
    src = _llm360_dir(release, tmp_path / "amber")
    man = prepare.prepare(tiny(**over), tmp_path / "wd", src)
    assert sum(len(e["shards"]) for e in man["groups"].values()) == len(man["groups"])
    assert sum(e["num_documents"] for e in man["groups"].values()) == 40
    # Without the tokenizer they were made with, token rows are refused.
    with pytest.raises(DataError, match=r"token rows need the tokenizer"):
        prepare.prepare(tiny(), tmp_path / "none", src)

    good = (src / "train_000.jsonl").read_text().splitlines()
    row = json.loads(good[0])
    cases = {
        "no_ids": ('{"source": "starcoder.python"}', 3, r"missing_field \(token_ids\)"),
        "big_id": (json.dumps(dict(row, token_ids=row["token_ids"][:-1] + [5000])), 2,
                   r"bad_field_value \(token id 5000 is outside the vocabulary 0..2017"),
        "short": (json.dumps(dict(row, token_ids=row["token_ids"][:9])), 5,
                  r"bad_field_value \(9 token_ids; rows of data.seq_len \+ 1 = 129"),
        "cut": (good[7][:300], 8, r"invalid_json"),
    }
    for name, (line, at, why) in cases.items():
        lines = list(good)
        lines.insert(at - 1, line)
        d = _llm360_dir(release, tmp_path / name, lines)
        wd = tmp_path / f"wd_{name}"
        assert prepare.main(["--config=configs/crystalcoder_tiny.py",
                             f"--config.tokenizer.model_path={tok}", f"--workdir={wd}",
                             f"--input={d}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len([x for x in err if x.startswith("error:")]) == 1
        assert re.match(rf"error: {d}/train_000.jsonl:{at}: {why}", err[-1]), (name, err)
        assert not (wd / "data" / "manifest.json").exists()
        assert not (wd / "data" / prepare.TMP_DIR).exists()


def test_edited_or_truncated_release_files_are_refused(release, tmp_path):
    """The index vouches for every file: a truncated chunk, an edited row or an index whose
    hash does not match is an error naming the file, and nothing is prepared."""
    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(release, d)
        edit(d)
        return d

    def truncate(d):
        p = d / "train_00005.jsonl"
        p.write_bytes(p.read_bytes()[:-1000])

    def edit_row(d):
        p = d / "train_00005.jsonl"
        p.write_text(p.read_text().replace('"token_ids":[', '"token_ids":[7,', 1))

    def edit_index(d):
        idx = json.loads((d / "chunks.json").read_text())
        idx["chunks"][1]["sha256"] = "0" * 64          # train_00005.jsonl's
        (d / "chunks.json").write_text(json.dumps(idx))

    def extra_file(d):
        shutil.copy(d / "train_00005.jsonl", d / "train_00009.jsonl")

    for name, edit, msg in (
            ("truncated", truncate, r"train_00005.jsonl: sha256 \w+ does not match .*"
                                    r"chunks.json \(\w+\); the file was truncated or edited"),
            ("edited", edit_row, r"train_00005.jsonl: sha256 \w+ does not match"),
            ("index", edit_index, r"train_00005.jsonl: sha256 \w+ does not match .*"
                                  r"chunks.json \(0{64}\)"),
            ("extra", extra_file, r"train_00009.jsonl: not listed in .*chunks.json")):
        d = broken(name, edit)
        wd = tmp_path / f"wd_{name}"
        with pytest.raises(DataError, match=msg):
            prepare.prepare(tiny(), wd, d)
        assert not (wd / "data" / "manifest.json").exists()


def test_export_flags_are_checked(loader_workdir, release, capsys):
    wd = loader_workdir
    for args, msg in ((["--all", "--chunk=0"], "pass exactly one of --chunk=K and --all"),
                      ([], "pass exactly one of --chunk=K and --all"),
                      (["--chunk=99"], "--chunk=99: the run has data chunks 0..11"),
                      (["--stage=4", "--all"], "--stage=4: config crystalcoder_tiny has "
                                               "stages 1..3"),
                      (["--out=" + str(release), "--chunk=0"], f"{release}: already exists")):
        args = [f"--workdir={wd}", f"--out={release}_x", *args]
        assert chunks_main.main(args) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {msg}")
    assert sorted(p.name for p in release.parent.iterdir()) == ["r"]    # nothing written
