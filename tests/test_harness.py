"""crystal as an lm-evaluation-harness model: its log-likelihoods are crystal's own training
losses on the same tokens, its windows are lm-eval's, the real `lm_eval` command runs
crystal's local tasks on a checkpoint of the session's short run, and the sweep writes
lm-eval records with the harness version and hashes of the task config and documents."""
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import lm_eval
import numpy as np
import pytest
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from crystal import checkpoint as ckpt_lib
from crystal import config
from crystal.data import replay
from crystal.data.tokenizer import EOS_ID
from crystal.eval import __main__ as eval_cli
from crystal.eval import harness, harness_task, records, scoring, sweep
from crystal.train import step as step_lib

REPO = Path(__file__).resolve().parents[1]
TEXT = "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def lm(short_run):
    """The adapter over the short run's last checkpoint, and its params and config."""
    with ckpt_lib.Checkpointer(short_run / "checkpoints", read_only=True) as c:
        params, meta = c.restore_params(8)
    cfg = config.from_json_dict(meta["config"])
    return harness.CrystalLM(params, cfg, replay.run_tokenizer(short_run), batch_size=4)


def own_loglikelihood(lm, ids: list[int], first: int) -> float:
    """Minus crystal's training loss (train.step.token_losses) summed over ids[first:],
    each predicted from the ids before it, in one row."""
    x = np.asarray([ids[:-1]], np.int32)
    batch = dict(inputs=x, targets=np.asarray([ids[1:]], np.int32),
                 loss_mask=(np.arange(len(ids) - 1) >= first - 1)[None].astype(np.float32))
    loss_BxL, _, _ = jax.jit(step_lib.token_losses, static_argnums=2)(lm.scorer.params, batch,
                                                                    lm.scorer.spec)
    return -float(jnp.sum(loss_BxL))


def requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihoods_are_crystals_own_token_losses(lm):
    ids = [EOS_ID] + lm.tokenizer.encode(TEXT)
    ctx = "def add(a, b):\n    return"
    n_ctx = len(lm.tok_encode(ctx))
    (whole, _), (part, _) = lm.loglikelihood(requests("loglikelihood", [("", TEXT),
                                                                       (ctx, TEXT[len(ctx):])]))
    np.testing.assert_allclose(whole, own_loglikelihood(lm, ids, 1), rtol=1e-5)
    np.testing.assert_allclose(part, own_loglikelihood(lm, ids, n_ctx), rtol=1e-5)
    [rolling] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(TEXT,)]))
    np.testing.assert_allclose(rolling, whole, rtol=1e-6)
    assert whole < part < 0


def test_greedy_flag_and_windows_past_the_context(lm):
    gen = lm.generator()
    prompt = gen.encode("import os\n")
    own = gen.decoder.generate([prompt], 8, stop_at_eos=False)[0].tokens
    other = own[:-1] + [(own[-1] + 1) % lm.cfg.model.vocab_size]
    s = lm.scorer.score([(prompt, own), (prompt, other)])
    assert [x.greedy for x in s] == [True, False] and s[0].logprob > s[1].logprob
    # A text longer than the context is scored in windows: with 16-token windows each
    # token is still scored once, so the sum is near the one-window number (not equal: the
    # windows see less context).
    short = scoring.Scorer(lm.scorer.params, lm.cfg, batch_size=3, max_length=16)
    ids = lm.tokenizer.encode(TEXT * 3)
    long_, one = short.score([([EOS_ID], ids)])[0], lm.scorer.score([([EOS_ID], ids)])[0]
    assert long_.tokens == one.tokens == len(ids) and long_.logprob != one.logprob
    assert abs(long_.logprob - one.logprob) < 0.5 * abs(one.logprob)


@pytest.mark.parametrize("n, max_length", [(1, 4), (5, 4), (16, 4), (17, 16), (40, 7)])
def test_windows_are_lm_evals_rolling_windows(n, max_length):
    tokens = list(range(100, 100 + n))
    ours = [(w.inputs, w.targets[w.first:]) for w in scoring.windows([EOS_ID], tokens,
                                                                   max_length)]
    theirs = [make_disjoint_window(p) for p in get_rolling_token_windows(
        tokens, EOS_ID, max_length, 1)]
    # lm-eval gives (context, continuation) with the inputs = context + continuation[:-1]
    assert [(i, t) for i, t in ours] == [(c + t[:-1], t) for c, t in theirs]
    assert all(len(i) <= max_length for i, _ in ours)


# the `lm_eval` console script of this interpreter's environment, not whichever is on PATH
LM_EVAL = str(Path(sys.executable).with_name("lm_eval"))


def test_lm_eval_command_runs_crystals_local_tasks(short_run, tmp_path):
    """`lm_eval --model crystal` in a fresh interpreter: the .pth hook registered the
    model without importing crystal or JAX at start-up; mc, generation and perplexity
    tasks ran end to end on a checkpoint."""
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; start = {'crystal', 'jax'} & set(sys.modules); "
         "from lm_eval.api.registry import get_model; "
         "print(sorted(start), get_model('crystal').__name__, get_model('dummy').__name__)"],
        capture_output=True, text=True, timeout=120)
    assert probe.stdout.split() == ["[]", "CrystalLM", "DummyLM"], probe.stderr[-2000:]
    out = subprocess.run(
        [LM_EVAL, "--model", "crystal", "--model_args",
         f"checkpoint={short_run}/checkpoints/8", "--batch_size", "4", "--tasks",
         "crystal_mc,crystal_gen,crystal_ppl", "--include_path", str(harness_task.LOCAL_TASKS),
         "--limit", "4", "--output_path", str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    [path] = (tmp_path / "out").rglob("results_*.json")
    res = json.loads(path.read_text())
    assert res["config"]["model"] == "crystal"
    r = res["results"]
    assert 0 <= r["crystal_mc"]["acc,none"] <= 1 and 0 <= r["crystal_gen"]["exact_match,none"]
    assert r["crystal_ppl"]["bits_per_byte,none"] > 0
    assert {t: n["effective"] for t, n in res["n-samples"].items()} == dict(
        crystal_mc=4, crystal_gen=4, crystal_ppl=4)


SMALL = ["lm_eval:crystal_mc.limit=4", "lm_eval:crystal_gen.limit=3"]


def test_sweep_writes_lm_eval_records(copy_run):
    r = sweep.sweep(copy_run, ["lm_eval:crystal_mc", "lm_eval:crystal_gen"], "4,8",
                    settings=SMALL, progress=False)
    assert r["evaluated"] == 4 and sorted(Path(f).name for f in r["figures"]) == [
        "lm_eval-crystal_gen.png", "lm_eval-crystal_mc.png"]
    [mc] = [records.read_all(d) for d in (records.evals_dir(copy_run) / "lm_eval-crystal_mc")
            .iterdir()]
    rec = mc[-1]
    assert rec["task"] == "lm_eval:crystal_mc" and rec["step"] == 8
    assert rec["inputs"]["harness_version"] == lm_eval.__version__ == "0.4.13"
    sha = rec["inputs"]["config_sha256"]["crystal_mc"]
    assert len(sha) == 64 and sha == mc[0]["inputs"]["config_sha256"]["crystal_mc"]
    assert rec["inputs"]["docs_sha256"] == mc[0]["inputs"]["docs_sha256"]
    assert set(rec["metrics"]) == {"acc", "acc_norm"} and 0 <= rec["metrics"]["acc"] <= 1
    docs = rec["result"]["tasks"]["crystal_mc"]["docs"]
    assert [d["doc_id"] for d in docs] == [0, 1, 2, 3]
    assert all(len(d["filtered_resps"]) == 3 and d["acc"] in (0, 1) for d in docs)
    assert rec["metrics"]["acc"] == np.mean([d["acc"] for d in docs])
    # A second sweep does nothing; other settings (few-shot) write beside.
    again = sweep.sweep(copy_run, ["lm_eval:crystal_mc"], "8",
                        settings=["lm_eval:crystal_mc.limit=4"], progress=False)
    assert again["evaluated"] == 0 and again["skipped"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--tasks=lm_eval:crystal_mcq"], "has no task 'crystal_mcq' (did you mean "
                                      "lm_eval:crystal_mc?)"),
    (["--tasks=lm_eval:crystal_mc", "--settings=lm_eval:crystal_mc.include_path=/nope"],
     "/nope: no such directory"),
    (["--tasks=humaneval"], "--tasks=humaneval: this task needs --allow_code_execution"),
    (["--tasks=humaneval", "--allow_code_execution", "--settings=humaneval.problems=0"],
     "humaneval.problems=0: expected 1 to 164"),
    (["--tasks=humaneval", "--allow_code_execution", "--settings=humaneval.temperature=0"],
     "humaneval.temperature=0.0: must be > 0"),
])
def test_bad_input_is_one_line_and_writes_nothing(copy_run, capsys, argv, message):
    assert eval_cli.main([f"--workdir={copy_run}", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not records.evals_dir(copy_run).exists()


def test_a_checkpoint_of_another_config_is_refused(copy_run, capsys):
    run = json.loads((copy_run / "run.json").read_text())
    run["config"]["seed"] = 1
    (copy_run / "run.json").write_text(json.dumps(run))
    assert eval_cli.main([f"--workdir={copy_run}", "--tasks=lm_eval:crystal_mc"]) == 2
    assert "a checkpoint of another config" in capsys.readouterr().err
    assert not records.evals_dir(copy_run).exists()


def test_batch_lengths_waste_under_a_quarter_and_compile_few_programs():
    lengths = [scoring.padded_length(n) for n in range(1, 2049)]
    assert all(n <= p < max(1.25 * n, scoring.MIN_LENGTH + 1)
               for n, p in zip(range(1, 2049), lengths))
    assert len(set(lengths)) <= 4 * 7 + 1        # four per doubling from 16 to 2,048
