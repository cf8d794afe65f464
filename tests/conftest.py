"""Test set-up: 8 fake CPU devices for sharding tests; deterministic CPU JAX."""
import os

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
