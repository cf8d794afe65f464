"""Exact batch replay: replayed batches equal what the training loader yielded."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from crystal import config as cfg_lib
from crystal.data.loader import StageLoader
from crystal.data.replay import replay_batch

KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "source_id", "shard", "row", "group",
        "epoch", "index", "fim")


@pytest.fixture(scope="module")
def wd(loader_workdir):
    return loader_workdir


def test_replay_equals_training_loader_in_every_stage(wd):
    cfg = cfg_lib.load("crystalcoder_tiny")
    for stage in (1, 2, 3):
        ld = StageLoader(cfg, wd, stage, process_index=1, process_count=2)
        ld.set_state(dict(ld.get_state(), step=ld.steps - 3))   # the stage's last steps
        trained = [next(ld) for _ in range(3)]
        for i, got in enumerate(trained):
            step = ld.steps - 3 + i
            rep = replay_batch(cfg, wd, stage, step)
            assert rep["inputs"].shape == (16, 128)
            # This process's rows are rows 8..15 of the replayed global batch.
            for k in KEYS:
                assert np.array_equal(rep[k][8:], got[k]), (stage, step, k)
            assert np.all(rep["index"] == step * 16 + np.arange(16))


def test_replay_cli(wd, tmp_path):
    out = tmp_path / "batch.npz"
    env = dict(os.environ, CRYSTAL_CONFIG="")
    r = subprocess.run([sys.executable, "-m", "crystal.data.replay", f"--workdir={wd}",
                        "--stage=2", "--step=7", f"--out={out}", "--decode"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    cfg = cfg_lib.load("crystalcoder_tiny")      # the config the manifest recorded
    ref = replay_batch(cfg, wd, 2, 7)
    with np.load(out, allow_pickle=False) as z:
        for k in KEYS:
            assert np.array_equal(z[k], ref[k])
        names = list(z["group_names"])
    man = json.loads((wd / "data" / "manifest.json").read_text())
    assert names == sorted(man["groups"])
    lines = r.stdout.splitlines()
    assert lines[0].startswith("stage 2 step 7: 16 rows x 128 tokens")
    first = f"{names[ref['group'][0]]}:{ref['shard'][0]}  row {ref['row'][0]}"
    assert first in r.stdout
    if ref["fim"].any():
        assert "<fim_prefix>" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "crystal.data.replay", f"--workdir={wd}",
                          "--stage=2", "--step=100000"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: step 100000")
