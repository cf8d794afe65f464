"""The checkpoint sweep on a real short run: records with their provenance, idempotent,
resumable after kill -9, sharded = unsharded, figures; bad input is one line and writes
nothing; memorization scores what the model itself says as memorized."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crystal import checkpoint as ckpt_lib
from crystal import config, decode, fileio, generate, metrics
from crystal.eval import __main__ as eval_cli
from crystal.data import replay
from crystal.eval import figures, memorization, records, sweep

REPO = Path(__file__).resolve().parents[1]
# Small samples: 4 held-out rows per source, 8 rows per data chunk (a chunk of this run
# has 4 or 8 rows), so a sweep of 8 checkpoints takes seconds.
SMALL = ["perplexity.rows_per_source=4", "memorization.sequences_per_chunk=8"]
TASKS = ["perplexity", "memorization"]


def record_files(wd) -> dict[str, bytes]:
    root = records.evals_dir(wd)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("step_*.json"))}


@pytest.fixture(scope="module")
def swept(short_run, tmp_path_factory):
    """A copy of the short run swept once (both tasks, every release), and the result."""
    wd = tmp_path_factory.mktemp("swept") / "run"
    shutil.copytree(short_run, wd)
    return wd, sweep.sweep(wd, TASKS, settings=SMALL, progress=False)


def test_every_release_gets_one_record_per_task_with_provenance(swept):
    wd, r = swept
    assert r["evaluated"] == 16 and r["skipped"] == 0 and r["checkpoints"] == list(range(1, 9))
    files = record_files(wd)
    assert len(files) == 16
    rec = json.loads(files[next(f for f in files if f.startswith("memorization/") and
                                f.endswith("step_00000005.json"))])
    with ckpt_lib.Checkpointer(wd / "checkpoints", read_only=True) as c:
        params, meta = c.restore_params(5)
    assert rec["status"] == "ok" and rec["step"] == 5 and rec["task"] == "memorization"
    assert rec["checkpoint"]["params_sha256"] == ckpt_lib.params_sha256(params)
    assert rec["checkpoint"]["meta_sha256"] == fileio.json_sha256(meta)
    assert rec["checkpoint"]["path"] == "checkpoints/5" and rec["checkpoint"]["stage"] == 2
    assert rec["run"]["fingerprint"] == meta["fingerprint"]
    assert rec["run"]["data_sha256"] == meta["data_sha256"]
    assert rec["settings"]["sequences_per_chunk"] == 8 and rec["seed"] == 0
    assert rec["settings_sha256"] == records.settings_sha256("memorization", rec["settings"], 0)
    assert rec["code"]["commit"] == fileio.git_commit()["commit"]
    # Step 5 is stage 2's first step: it has seen stage 1 and stage 2's first chunk.
    seen = [c["name"] for c in rec["result"]["chunks"]]
    assert seen == ["s1c0", "s1c1", "s1c2", "s1c3", "s2c0"]
    assert rec["result"]["latest_chunk"] == "s2c0"
    assert set(rec["inputs"]["chunks"]) == set(seen)
    ppl = json.loads(files[next(f for f in files if f.startswith("perplexity/") and
                                f.endswith("step_00000006.json"))])
    sources = ppl["result"]["sources"]
    assert len(sources) == 18 and all(s["rows"] <= 4 and s["tokens"] > 0
                                      for s in sources.values())
    assert ppl["inputs"]["eval_set_sha256"] and ppl["metrics"]["loss"] > 0


def test_records_reach_the_run_metrics_and_the_figures_are_drawn(swept):
    wd, r = swept
    recs = {m["step"]: m for m in metrics.read_jsonl(wd / "metrics.jsonl")}
    assert all("evals/perplexity/loss" in recs[s] and "evals/memorization/mean" in recs[s]
               and "loss" in recs[s] for s in range(1, 9))   # beside the training loss
    names = sorted(Path(f).name for f in r["figures"])
    assert names == ["memorization_chunks.png", "memorization_correlation.png",
                     "memorization_distribution.png", "memorization_matrix.csv",
                     "perplexity.png"]
    for f in r["figures"]:
        head = Path(f).read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n" or f.endswith(".csv")
    rows = (records.evals_dir(wd) / "memorization_matrix.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["step", "s1c0", "s1c1"] and len(rows) == 9
    assert rows[1].split(",")[2] == ""            # step 1 has seen only s1c0


def test_a_second_sweep_does_nothing(swept):
    wd, _ = swept
    before = {p: p.stat().st_mtime_ns for p in records.evals_dir(wd).rglob("*")}
    r = sweep.sweep(wd, TASKS, settings=SMALL, progress=False)
    assert r["evaluated"] == 0 and r["skipped"] == 16 and r["figures"] == []
    assert {p: p.stat().st_mtime_ns for p in records.evals_dir(wd).rglob("*")} == before


def test_two_shards_write_the_records_of_one_sweep(swept, copy_run):
    wd, _ = swept
    for i in (1, 0):
        r = sweep.sweep(copy_run, TASKS, shard=(i, 2), settings=SMALL, progress=False,
                        figures=False)
        assert r["checkpoints"] == list(range(1 + i, 9, 2))
    assert record_files(copy_run) == record_files(wd)


def test_a_killed_sweep_rerun_completes_with_the_same_records(swept, copy_run):
    wd, _ = swept
    cmd = [sys.executable, "-m", "crystal.eval", f"--workdir={copy_run}",
           f"--settings={','.join(SMALL)}", "--noprogress", "--nofigures"]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         start_new_session=True)
    t0 = time.time()
    while len(record_files(copy_run)) < 3 and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert 3 <= len(record_files(copy_run)) < 16
    assert not list(records.evals_dir(copy_run).rglob(".*.tmp-*"))   # nothing half-written
    r = sweep.sweep(copy_run, TASKS, settings=SMALL, progress=False, figures=False)
    assert r["evaluated"] == 16 - r["skipped"] and r["skipped"] >= 3
    assert record_files(copy_run) == record_files(wd)


def test_other_settings_write_beside_and_a_resaved_checkpoint_is_evaluated_again(copy_run):
    for rows in (2, 3):
        sweep.sweep(copy_run, ["perplexity"], "8", settings=[f"perplexity.rows_per_source={rows}"],
                    progress=False, figures=False)
    assert len(list((records.evals_dir(copy_run) / "perplexity").glob("*/step_*.json"))) == 2
    # A checkpoint saved again at the same step (a rolled-back timeline) is another
    # checkpoint: its record is recomputed, the old one set aside, not overwritten.
    meta = copy_run / "checkpoints" / "8" / "meta" / "metadata"
    m = json.loads(meta.read_text())
    meta.write_text(json.dumps(dict(m, wallclock=m["wallclock"] + 1)))
    r = sweep.sweep(copy_run, ["perplexity"], "8", settings=["perplexity.rows_per_source=2"],
                    progress=False, figures=False)
    assert r["evaluated"] == 1
    assert len(list((records.evals_dir(copy_run) / "perplexity").glob("*/superseded/*"))) == 1


@pytest.mark.parametrize("argv, message", [
    (["--tasks=perplexty"], "no task 'perplexty' (did you mean perplexity?)"),
    (["--shard=3/2"], "--shard=3/2: expected I/N with 0 <= I < N"),
    (["--checkpoints=5,99"], "--checkpoints=5,99:"),
    (["--settings=memorization.sequences=3"], "did you mean memorization.sequences_per_chunk"),
    (["--settings=memorization.k=x"], "memorization.k=x: expected int"),
    (["--tasks=perplexity", "--settings=memorization.k=3"], "not in --tasks"),
])
def test_bad_input_is_one_line_and_writes_nothing(copy_run, capsys, argv, message):
    assert eval_cli.main([f"--workdir={copy_run}", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not records.evals_dir(copy_run).exists()


def test_checkpoints_of_another_config_and_missing_workdirs_are_refused(copy_run, tmp_path,
                                                                        capsys):
    run = json.loads((copy_run / "run.json").read_text())
    run["config"]["seed"] = 1       # another run's definition: another fingerprint
    (copy_run / "run.json").write_text(json.dumps(run))
    assert eval_cli.main([f"--workdir={copy_run}"]) == 2
    assert "a checkpoint of another config" in capsys.readouterr().err
    assert eval_cli.main([f"--workdir={tmp_path / 'nope'}"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert not records.evals_dir(copy_run).exists()


def test_a_sequence_the_model_reproduces_scores_one_and_others_do_not(short_run):
    with ckpt_lib.Checkpointer(short_run / "checkpoints", read_only=True) as c:
        params, meta = c.restore_params(8)
    cfg = config.from_json_dict(meta["config"])
    dec = decode.Decoder(params, cfg)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, cfg.tokenizer.vocab_size, (6, 32)).astype(np.int32)
    own = np.concatenate([prompts, [g.tokens for g in dec.generate(
        prompts.tolist(), 32, stop_at_eos=False)]], 1)
    np.testing.assert_array_equal(memorization.score(dec, own, 32, 32), 32)
    other = own.copy()
    other[:, 32:] = (other[:, 32:] + 1) % cfg.model.vocab_size
    assert memorization.score(dec, other, 32, 32).max() == 0
    with pytest.raises(Exception, match="k \\+ l = 64"):
        memorization.score(dec, own[:, :40], 32, 32)


def test_memorization_samples_are_the_rows_the_run_trained_on(short_run):
    cfg = replay.run_config(short_run)
    loaders = memorization.stage_loaders(cfg, short_run)
    chunks = memorization.data_chunks(cfg)
    # A stage of 2 steps has 2 data chunks (numbered 0, 1 within it), not 2 of 4.
    assert [c.name for c in chunks] == ["s1c0", "s1c1", "s1c2", "s1c3", "s2c0", "s2c1",
                                        "s3c0", "s3c1"]
    ch = chunks[4]                                   # stage 2, its first step
    picks, rows = memorization.trained_rows(loaders[2], ch, 3, seed=0, length=64)
    batch = replay.replay_batch(cfg, short_run, stage=2, step=0)
    trained = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], 1)[:, :64]
    np.testing.assert_array_equal(rows, trained[picks])
    again = memorization.trained_rows(loaders[2], ch, 3, seed=0, length=64)
    np.testing.assert_array_equal(again[1], rows)


def test_correlations_between_checkpoints():
    s = np.asarray([[0, 0.5, 1, np.nan], [0, 0.5, 1, 1], [1, 0.5, 0, 0]])
    c = figures.correlations(s)
    np.testing.assert_allclose(c[0, 1], 1.0)
    np.testing.assert_allclose(c[0, 2], -1.0)
    assert np.isnan(figures.correlations(np.asarray([[1.0, 1.0], [0.0, 1.0]]))[0, 1])


def test_generate_cli_prints_text_from_a_checkpoint(short_run, capsys):
    args = [f"--checkpoint={short_run}", "--prompt=def f(x):", "--max_new_tokens=8",
            "--num_samples=2", "--temperature=1.0", "--seed=3", "--jsonl"]
    assert generate.main(args) == 0
    first = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [(r["prompt"], r["sample"]) for r in first] == [(0, 0), (0, 1)]
    assert all(r["tokens"] <= 8 and isinstance(r["text"], str) for r in first)
    assert generate.main(args) == 0
    assert [json.loads(ln) for ln in capsys.readouterr().out.splitlines()] == first


@pytest.mark.parametrize("extra, message", [
    (["--prompt=" + "word " * 200], "exceed the model's context of 128 tokens"),
    (["--prompt=x", "--config=amber_tiny"], "a checkpoint of config 'crystalcoder_tiny'"),
    (["--prompt=x", "--top_p=0"], "--top_p=0.0: must be in (0, 1]"),
    ([], "give --prompt=TEXT or --prompts=FILE"),
])
def test_generate_bad_input_is_one_line(short_run, capsys, extra, message):
    assert generate.main([f"--checkpoint={short_run}", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_generate_refuses_a_missing_checkpoint(tmp_path, capsys):
    assert generate.main([f"--checkpoint={tmp_path}/run/checkpoints/7", "--prompt=x"]) == 2
    assert "no restorable checkpoint" in capsys.readouterr().err


def test_stop_strings_cut_the_text(short_run):
    gen = generate.Generator.from_checkpoint(short_run)
    free = gen.generate(["a b c"], 24)[0][0]
    assert free.finish == "length" and len(free.text) > 2
    stop = free.text[2:4]
    cut = gen.generate(["a b c"], 24, stop=[stop])[0][0]
    assert cut.finish == "stop" and cut.text == free.text[:free.text.find(stop)]
