"""Release bundles: written from a real short run, verified with nothing but the bundle,
the same bytes when rebuilt, every kind of tampering named, and training continued from a
bundle checkpoint records where it came from."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crystal import config, train
from crystal.release import bundle, manifest, verify
from crystal.release.manifest import BundleError
from crystal.train import ledger

REPO = Path(__file__).resolve().parents[1]
RUN = {"model.num_layers": 1, "data.seq_len": 32, "train.global_batch_size": 4,
       "stages.stage_1.steps": 4, "stages.stage_2.steps": 4, "stages.stage_3.steps": 2,
       "data.num_chunks": 2, "checkpoint.every_steps": 0, "metrics.tensorboard": False,
       "metrics.plot": False, "train.eval_batches": 0, "train.progress": False}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = config.load("crystalcoder_tiny", RUN)
    wd = tmp_path_factory.mktemp("release") / "run"
    train.run(cfg, wd)
    return cfg, wd


@pytest.fixture(scope="module")
def bundled(run, tmp_path_factory):
    _, wd = run
    out = tmp_path_factory.mktemp("bundle") / "R"
    return bundle.write(wd, out, replay_steps=2), out


def test_bundle_lines_up_and_verifies_with_replay(bundled):
    s, r = bundled
    idx = json.loads((r / "index.json").read_text())
    # 2 data chunks per stage x 3 stages, one release checkpoint after each.
    assert [row["step"] for row in idx["rows"]] == [2, 4, 6, 8, 9, 10]
    assert [row["data_chunk"] for row in idx["rows"]] == [0, 1, 2, 3, 4, 5]
    assert idx["rows"][-1]["chunk_file"] == "data/chunks/train_00005.jsonl"
    assert s["certificates"] == 5 and s["finished"]
    for c in (r / "certificates").glob("*.json"):
        cert = json.loads(c.read_text())
        assert cert["matches_training"], c   # the exported rows are the trained rows
    csv_head = (r / "index.csv").read_text().splitlines()[0]
    assert csv_head.startswith("step,stage,stage_step,data_chunk,checkpoint,chunk_file,"
                               "tokens_seen,loss")
    events = json.loads((r / "ledger.json").read_text())
    assert [e["event"] for e in events][-2:] == ["stage_end", "finish"]
    assert (r / "config" / "params_stage_1.yaml").is_file()
    assert (r / "hf" / "10" / "config.json").is_file()
    text = (r / "README.md").read_text()
    assert "crystal.release.verify" in text and "--init_from=BUNDLE/checkpoints/" in text
    out = verify.verify(r, replay_steps=2)
    assert out["replayed"] == 5 and out["bundle_id"] == s["bundle_id"]
    halves = [verify.verify(r, 0, (i, 2))["files"] for i in (0, 1)]
    assert sum(halves) == len(manifest.read(r)) and min(halves) > 0


def test_rebuilt_bundle_has_the_same_bytes(run, bundled, tmp_path):
    _, wd = run
    s, r = bundled
    again = bundle.write(wd, tmp_path / "R2", replay_steps=2)
    assert again["bundle_id"] == s["bundle_id"]
    assert (tmp_path / "R2" / "MANIFEST.sha256").read_bytes() == \
        (r / "MANIFEST.sha256").read_bytes()


@pytest.mark.parametrize("rel", [
    "checkpoints/10/state/manifest.ocdbt", "data/chunks/train_00003.jsonl",
    "data/chunks/chunks.json", "metrics/metrics.jsonl", "ledger.json", "index.json",
    "index.csv", "certificates/4.json", "config/config.json", "README.md",
    "hf/10/config.json", "MANIFEST.sha256"])
def test_one_flipped_byte_anywhere_is_named(bundled, tmp_path, rel):
    _, r = bundled
    copy = tmp_path / "R"
    shutil.copytree(r, copy)
    p = copy / rel
    if not p.exists():        # orbax's file names: take the largest array file instead
        p = max((copy / "checkpoints" / "10").rglob("*"), key=lambda q: q.is_file() and
                q.stat().st_size)
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    p.write_bytes(bytes(raw))
    with pytest.raises(BundleError) as e:
        verify.verify(copy, expect_id=bundled[0]["bundle_id"])
    assert str(p) in str(e.value), e.value


def test_missing_and_added_files_and_bad_input(run, bundled, tmp_path):
    cfg, wd = run
    _, r = bundled
    copy = tmp_path / "R"
    shutil.copytree(r, copy)
    (copy / "data" / "chunks" / "train_00001.jsonl").unlink()
    with pytest.raises(BundleError, match="train_00001.jsonl: missing"):
        verify.verify(copy)
    shutil.copyfile(r / "data" / "chunks" / "train_00001.jsonl",
                    copy / "data" / "chunks" / "train_00001.jsonl")
    (copy / "extra.txt").write_text("x")
    with pytest.raises(BundleError, match="extra.txt: not in MANIFEST"):
        verify.verify(copy)
    with pytest.raises(Exception, match="already exists"):
        bundle.write(wd, r)
    # An unfinished run: refused unless --partial.
    part = tmp_path / "part"
    train.run(cfg, part, stop_after_steps=5)
    with pytest.raises(BundleError, match="unfinished.*--partial"):
        bundle.write(part, tmp_path / "P")
    assert not (tmp_path / "P").exists()
    p = bundle.write(part, tmp_path / "P", partial=True, hf_export="none")
    assert not p["finished"] and p["chunks"] == 2
    verify.verify(tmp_path / "P")


def test_cli_and_continue_from_a_bundle(run, bundled, tmp_path):
    cfg, _ = run
    s, r = bundled
    v = subprocess.run([sys.executable, "-m", "crystal.release.verify", str(r), "--shard=3/2"],
                       capture_output=True, text=True, cwd=REPO)
    assert v.returncode == 2 and v.stderr.startswith("error: --shard=3/2") and not v.stdout
    v = subprocess.run([sys.executable, "-m", "crystal.release.verify", str(tmp_path / "no")],
                       capture_output=True, text=True, cwd=REPO)
    assert v.returncode == 2 and "MANIFEST.sha256: missing" in v.stderr
    # LLM360's use: continue from a released checkpoint mid-run (stage 2's first chunk).
    new = tmp_path / "new"
    train.run(cfg, new, stage=2, init_from=str(r / "checkpoints" / "6"), stop_after_steps=1)
    start = [e for e in ledger.read(new) if e["event"] == "start"][0]
    assert start["origin"]["bundle_id"] == s["bundle_id"] and start["origin"]["step"] == 6
