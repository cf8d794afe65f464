"""The Beam pipeline writes the same chunks and manifest as the local path."""
import json

import pytest

import data_fixtures as F
from crystal.data import prepare, verify
from crystal.data.sources import BadRecordError, DataError

beam = pytest.importorskip(
    "apache_beam", reason="apache-beam is not installed (optional extra: pip install -e "
    "'.[beam]'; it pins protobuf<7, pyarrow<26 and pillow<13, so it is kept out of the default env)")

from crystal.data import beam as beam_lib  # noqa: E402


def _same_data(wd_a, wd_b):
    ma = json.loads((wd_a / "data" / "manifest.json").read_bytes())
    mb = json.loads((wd_b / "data" / "manifest.json").read_bytes())
    assert ma == mb
    for e in ma["groups"].values():
        for c in e["chunks"] + [e["val"]]:
            assert (wd_a / "data" / c["path"]).read_bytes() == \
                (wd_b / "data" / c["path"]).read_bytes()
    return ma


def test_beam_equals_local_on_sample_corpus(tmp_path):
    cfg = F.small_config(tmp_path, **{"data.seq_len": 64, "data.num_chunks": 4})
    local = prepare.prepare(cfg, tmp_path / "local", workers=2)
    man = beam_lib.run(cfg, tmp_path / "beam", pipeline_args=["--runner=DirectRunner"])
    assert man == local and man["input"]["kind"] == "sample"
    m = _same_data(tmp_path / "local", tmp_path / "beam")
    assert len(m["groups"]) == 18
    assert verify.verify(tmp_path / "beam")[1] == []
    assert not (tmp_path / "beam" / "data" / prepare.TMP_DIR).exists()


def test_beam_multiprocess_runner_and_bad_records(tmp_path):
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
