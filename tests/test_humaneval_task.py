"""HumanEval in the sweep on the session's short run: a complete record (completions from
the checkpoint, run in the sandbox, pass@k, failure kinds, the isolation), and the
canonical solutions' bits per byte, from crystal's own losses, falling over training."""
import math
import shutil

import numpy as np
import pytest

from crystal.eval import humaneval as he
from crystal.eval import humaneval_bpb, records, sandbox, scoring, sweep

# 2 problems, 2 samples and 8 new tokens: every path of the task in seconds.
SMALL = ["humaneval.problems=2", "humaneval.num_samples=2", "humaneval.max_new_tokens=8",
         "humaneval_bpb.problems=2"]


@pytest.fixture(scope="module")
def swept(short_run, tmp_path_factory):
    wd = tmp_path_factory.mktemp("humaneval") / "run"
    shutil.copytree(short_run, wd)
    r = sweep.sweep(wd, ["humaneval", "humaneval_bpb"], "1,8", settings=SMALL,
                    flags=dict(allow_code_execution=True), progress=False)
    return wd, r


def _records(wd, task):
    [d] = list((records.evals_dir(wd) / task).iterdir())
    return records.read_all(d)


def test_humaneval_record_is_complete(swept):
    wd, r = swept
    assert r["evaluated"] == 4
    rec = _records(wd, "humaneval")[-1]
    assert rec["step"] == 8 and rec["settings"]["temperature"] == 0.2
    assert rec["result"]["max_new_tokens"] == 8
    assert rec["result"]["isolation"] == sandbox.Sandbox(True).isolation.describe()
    assert rec["inputs"]["dataset_sha256"] == he.dataset_sha256()
    rows = rec["result"]["problems"]
    assert [p["task_id"] for p in rows] == ["HumanEval/0", "HumanEval/1"]
    for p in rows:
        assert len(p["samples"]) == 2 and p["greedy"]["kind"] in sandbox.KINDS
        assert all(s["kind"] in sandbox.KINDS and isinstance(s["completion"], str)
                   for s in p["samples"])
        assert p["passed"] == sum(s["passed"] for s in p["samples"]) and p["cpu_limit"] >= 4
        assert p["truncated_prompt"]            # the short run's context is 128 tokens
    m = rec["metrics"]
    assert set(m) == {"pass@1", "greedy_pass@1", "bpb", "bpb_pooled", "truncated_prompts"}
    assert m["pass@1"] == np.mean([he.pass_at_k(2, p["passed"], 1) for p in rows])
    assert "seconds" not in str(rec["result"])      # no timings: re-evaluation, same bytes


def test_bits_per_byte_are_crystals_losses_and_fall_with_training(swept):
    wd, _ = swept
    bpb = _records(wd, "humaneval_bpb")
    first, last = (r["metrics"]["bpb"] for r in bpb)
    assert last < first
    # the same numbers in the humaneval record, and the per-problem arithmetic
    assert math.isclose(_records(wd, "humaneval")[-1]["metrics"]["bpb"], last, rel_tol=1e-6)
    rows = bpb[-1]["result"]["problems"]
    probs = he.problems()
    for row in rows:
        size = len(probs[row["task_id"]].canonical_solution.encode())
        assert row["bytes"] == size and math.isclose(row["bpb"], row["bits"] / size)
    assert math.isclose(last, np.mean([r["bpb"] for r in rows]))


def test_encode_pair_splits_as_lm_eval():
    class Chars:     # a tokenizer of one id per character
        def encode(self, s):
            return [ord(c) for c in s]
    ctx, cont = scoring.encode_pair(Chars(), "def f(x):  ", "return x")
    assert ctx == [2] + [ord(c) for c in "def f(x):"] and cont == [ord(c) for c in
                                                                    "  return x"]


def test_bpb_settings_are_checked():
    with pytest.raises(Exception, match="humaneval_bpb.problems=200: expected 1 to 164"):
        humaneval_bpb.check(dict(problems=200, batch_size=4))
