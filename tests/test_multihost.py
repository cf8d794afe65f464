"""Two real local processes x 2 CPU devices (jax.distributed, gloo) train, checkpoint, stop,
restart and continue, matching one process with 4 devices; each reads only its rows."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
STEPS, STOP = 4, 2
B = 8
# Same reasoning as tests/mesh_equivalence.py: a small LR and Adam eps 1e-5 keep float
# noise from reordered reductions (gloo vs in-process) far below the 1e-5 tolerance.
OVERRIDES = {"train.global_batch_size": B, "stages.stage_1.schedule.peak_lr": 1e-3,
             "stages.stage_1.schedule.warmup_steps": 2, "optim.eps": 1e-5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(workdir, run_dir, out, devices, env_extra, stop_after=0, cache=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_"))}
    env.update(env_extra)
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    cmd = [sys.executable, str(HERE / "multihost_worker.py"), f"--workdir={workdir}",
           f"--run_dir={run_dir}", f"--devices={devices}", f"--steps={STEPS}",
           f"--stop_after={stop_after}", f"--out={out}",
           f"--config_overrides={json.dumps(OVERRIDES)}"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait(procs, timeout=600):
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]


def _two_processes(workdir, run_dir, tmp, tag, stop_after, cache):
    port = _free_port()
    procs = [_spawn(workdir, run_dir, tmp / f"{tag}{i}.json", 2,
                    {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                     "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)},
                    stop_after, cache) for i in range(2)]
    return procs


@pytest.fixture(scope="module")
def runs(loader_workdir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    cache = tmp / "jax_cache"
    ref = _spawn(loader_workdir, tmp / "single", tmp / "ref.json", 4, {})
    first = _two_processes(loader_workdir, tmp / "multi", tmp, "a", STOP, cache)
    _wait(first)
    second = _two_processes(loader_workdir, tmp / "multi", tmp, "b", 0, cache)
    _wait(second + [ref])
    load = lambda n: json.loads((tmp / n).read_text())  # noqa: E731
    return dict(tmp=tmp, ref=load("ref.json"), a=[load("a0.json"), load("a1.json")],
                b=[load("b0.json"), load("b1.json")])


def test_two_processes_stop_restart_match_one_process(runs):
    ref, a, b = runs["ref"], runs["a"], runs["b"]
    assert ref["process_count"] == 1 and ref["settings"] == "default"
    for i in range(2):
        assert (a[i]["process_index"], a[i]["process_count"], a[i]["settings"]) == (i, 2, "env")
        assert a[i]["start"] == 0 and len(a[i]["losses"]) == STOP
        assert b[i]["start"] == STOP and b[i]["step"] == STEPS      # resumed, not restarted
        np.testing.assert_allclose(a[i]["losses"] + b[i]["losses"], ref["losses"],
                                   rtol=1e-5, atol=0)
    assert len(ref["losses"]) == STEPS
    got = np.load(runs["tmp"] / "b0.json.params.npz", allow_pickle=False)
    want = np.load(runs["tmp"] / "ref.json.params.npz", allow_pickle=False)
    assert sorted(got.files) == sorted(want.files)
    for k in want.files:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5, err_msg=k)
    # Training moved the params (so the comparison above is not of two initial states).
    init = np.load(runs["tmp"] / "a0.json.init.npz", allow_pickle=False)
    assert max(np.max(np.abs(init[k] - want[k])) for k in want.files) > 1e-4


def test_each_process_reads_only_its_slice(runs):
    ref, a, b = runs["ref"], runs["a"], runs["b"]
    assert [p["data_slice"] for p in a] == [[0, 2], [1, 2]]
    for step in range(STEPS):
        src = a if step < STOP else b
        k = step if step < STOP else step - STOP
        p0, p1 = src[0]["rows"][k], src[1]["rows"][k]
        assert src[0]["local_rows"][k] == src[1]["local_rows"][k] == B // 2
        assert not set(p0) & set(p1), f"step {step}: both processes read rows {set(p0) & set(p1)}"
        # Process 0 holds the first half of the global batch, process 1 the second.
        assert p0 + p1 == ref["rows"][step], step
    assert ref["local_rows"] == [B] * STEPS


def test_train_cli_two_processes_match(runs, loader_workdir):
    """`python -m crystal.train` itself, two processes from the JAX_* environment, gives the
    single-process reference's first losses."""
    import shutil
    wd = runs["tmp"] / "cli"
    shutil.copytree(Path(loader_workdir) / "data", wd / "data")
    port = _free_port()
    over = {"data.sample_max_mb": 2.0, "mesh.fsdp": 2, "mesh.tensor": 2,
            "metrics.tensorboard": False, "metrics.plot": False, **OVERRIDES}
    procs = []
    for i in range(2):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("JAX_", "SLURM_", "TPU_"))}
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=2 "
                             "--xla_backend_optimization_level=0")
        cmd = [sys.executable, "-m", "crystal.train", "--config=configs/crystalcoder_tiny.py",
               f"--workdir={wd}", f"--stop_after_steps={STOP}"] + \
              [f"--config.{k}={v}" for k, v in over.items()]
        procs.append(subprocess.Popen(cmd, env=env, cwd=HERE.parent, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    _wait(procs)
    recs = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r and "step" in r][:STOP]
    np.testing.assert_allclose(losses, runs["ref"]["losses"][:STOP], rtol=1e-5, atol=0)
