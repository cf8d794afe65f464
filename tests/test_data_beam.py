"""The Beam pipeline writes the same shards and manifest as the local path."""
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

import data_fixtures as F
from crystal.data import prepare, verify
from crystal.data.sources import BadRecordError

HAVE_BEAM = importlib.util.find_spec("apache_beam") is not None
# apache-beam pins protobuf<7, which sentencepiece's model proto cannot load, so it lives in
# its own environment (.ci/run makes one, with the main env's packages visible) and these
# tests run there, as a real subprocess, when this interpreter has no Beam.
BEAM_PYTHON = os.environ.get("CRYSTAL_BEAM_PYTHON", "")


@pytest.mark.skipif(HAVE_BEAM or not BEAM_PYTHON, reason="runs the Beam tests under "
                    "$CRYSTAL_BEAM_PYTHON (an environment with apache-beam installed)")
def test_beam_tests_in_beam_environment():
    here = Path(__file__).resolve()
    r = subprocess.run([BEAM_PYTHON, "-m", "pytest", "-q", "-p",
                        "no:cacheprovider", str(here)],
                       cwd=here.parents[1], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "2 passed" in r.stdout, r.stdout[-2000:]


needs_beam = pytest.mark.skipif(not HAVE_BEAM, reason="apache-beam is not installed here "
                                "(pip install -e '.[beam]' in its own environment)")


def _same_data(wd_a, wd_b):
    ma = json.loads((wd_a / "data" / "manifest.json").read_bytes())
    mb = json.loads((wd_b / "data" / "manifest.json").read_bytes())
    assert ma == mb
    for rel in ["sources.json"] + [c["path"] for e in ma["groups"].values()
                                   for c in e["shards"] + [e["val"], e["documents"]]]:
        assert (wd_a / "data" / rel).read_bytes() == (wd_b / "data" / rel).read_bytes()
    return ma


@needs_beam
def test_beam_equals_local_on_sample_corpus(tmp_path):
    from crystal.data import beam as beam_lib
    cfg = F.small_config(tmp_path, **{"data.seq_len": 64, "data.num_shards": 4})
    local = prepare.prepare(cfg, tmp_path / "local", workers=2)
    man = beam_lib.run(cfg, tmp_path / "beam", pipeline_args=["--runner=DirectRunner"])
    assert man == local and man["input"]["kind"] == "sample"
    m = _same_data(tmp_path / "local", tmp_path / "beam")
    assert len(m["groups"]) == 18
    assert verify.verify(tmp_path / "beam")[1] == []
    assert not (tmp_path / "beam" / "data" / prepare.TMP_DIR).exists()


@needs_beam
def test_beam_multiprocess_runner_and_bad_records(tmp_path):
    from crystal.data import beam as beam_lib
    from test_data_prepare import _bad_corpus
    root = _bad_corpus(tmp_path / "bad")
    cfg = F.small_config(tmp_path)
    with pytest.raises(BadRecordError) as ei:
        beam_lib.run(cfg, tmp_path / "b0", root)
    assert str(ei.value).startswith(str(root / "slimpajama/chunk1/example_train_1.jsonl.zst"))
    assert not (tmp_path / "b0" / "data" / "manifest.json").exists()
    assert not (tmp_path / "b0" / "data" / prepare.TMP_DIR).exists()
    local = prepare.prepare(cfg, tmp_path / "local", root, on_bad_record="skip")
    man = beam_lib.run(cfg, tmp_path / "b1", root, on_bad_record="skip", pipeline_args=[
        "--runner=DirectRunner", "--direct_num_workers=2",
        "--direct_running_mode=multi_processing"])
    assert man["bad_records"] == local["bad_records"] and man["bad_records"]["skipped"] == 3
    _same_data(tmp_path / "local", tmp_path / "b1")
