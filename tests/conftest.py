"""Test set-up: 8 fake CPU devices for sharding tests; deterministic CPU JAX."""
import os
import shutil

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# ----------------------------------------------------------------------------- loader data
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def loader_workdir(tmp_path_factory):
    """The tiny CrystalCoder config prepared once per session by crystal.data.prepare from
    a 2 MB sample corpus (every group the three stages name), for loader/replay tests."""
    from crystal import config as cfg_lib
    from crystal.data import prepare
    cfg = cfg_lib.load("crystalcoder_tiny", {"data.sample_max_mb": 2.0})
    wd = tmp_path_factory.mktemp("loader_workdir")
    prepare.prepare(cfg, wd)
    return wd


# ----------------------------------------------------------------------------- a short run

# The short CrystalCoder run every analysis test and notebook reads: one layer, 64-token rows
# (memorization's k + l = 64 fit), 4-row batches, 4 + 2 + 2 steps, a release checkpoint at
# every data-chunk boundary (8 of them).
SHORT_RUN = {
    "model.num_layers": 1, "data.seq_len": 64, "model.max_seq_len": 128,
    "train.global_batch_size": 4, "stages.stage_1.steps": 4, "stages.stage_2.steps": 2,
    "stages.stage_3.steps": 2, "checkpoint.every_steps": 2, "metrics.tensorboard": False,
    "metrics.plot": False, "train.eval_batches": 0, "train.progress": False,
    "data.sample_max_mb": 2.0,
}


@pytest.fixture(scope="session")
def short_run(tmp_path_factory):
    """The workdir of SHORT_RUN, trained once per session. Read it, or copy it
    (`copy_run`) before writing into it."""
    from crystal import config, train
    wd = tmp_path_factory.mktemp("short_run") / "run"
    train.run(config.load("crystalcoder_tiny", SHORT_RUN), wd)
    return wd


@pytest.fixture
def copy_run(short_run, tmp_path):
    """A private copy of the short run's workdir (a few MB)."""
    dst = tmp_path / "run"
    shutil.copytree(short_run, dst)
    return dst
