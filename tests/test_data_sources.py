"""Source readers: real SlimPajama / StarCoder / text formats, and every bad-input case."""
import json
import os

import numpy as np
import pytest

import data_fixtures as F
from crystal.data import sources
from crystal.data.sources import BadRecordError, BadRecords, DataError


def _docs(root, mode="fail"):
    return list(sources.iter_documents(root, mode))


def test_discover_names_groups_and_halves(tmp_path):
    root = F.write_corpus(tmp_path / "c")
    shards = sources.discover(root)
    assert [s.index for s in shards] == list(range(len(shards)))
    rel = [s.relpaths[0] for s in shards]
    assert rel == sorted(rel)
    sp = [s for s in shards if s.kind == "slimpajama"]
    assert [s.parity for s in sp] == ["even", "odd", "even", "odd"]
    assert {s.group for s in shards if s.kind == "starcoder"} == {"starcoder.python",
                                                                   "starcoder.css"}
    text = [s for s in shards if s.kind == "text"]
    assert len(text) == 1 and text[0].group == "text.notes" and len(text[0].paths) == 4
    groups = {g for g, _ in _docs(root)}
    assert groups == {"slimpajama.even.RedPajamaC4", "slimpajama.odd.RedPajamaC4",
                      "slimpajama.even.RedPajamaWikipedia", "slimpajama.odd.RedPajamaWikipedia",
                      "starcoder.python", "starcoder.css", "text.notes"}


def test_documents_read_back_exactly(tmp_path):
    root = F.write_corpus(tmp_path / "c")
    docs = _docs(root)
    want = F.docstrings()
    got_sp = [t for g, t in docs if g.startswith("slimpajama")]
    assert sorted(got_sp) == sorted(want)
    # file order: shard 0 first, lines in order
    assert got_sp[0] == want[0] and got_sp[1] == want[4]
    assert [t for g, t in docs if g == "starcoder.python"] == F.sources(F.MODULES[:8])


def test_records_are_numbered_as_errors_count_them(tmp_path):
    """Each document's record (JSON line, Parquet row, from 1; 1 for a text file) and its
    file's index among all input files: what provenance names."""
    root = F.write_corpus(tmp_path / "c")
    shards = sources.discover(root)
    assert [s.first_file for s in shards] == list(np.cumsum([0] + [len(s.paths)
                                                                   for s in shards[:-1]]))
    bad = BadRecords("fail")
    for s in shards:
        for i, docs in enumerate(sources.iter_files(s, bad)):
            path = s.paths[i]
            for group, text, record in docs:
                rec = sources.read_record(path, record)
                assert text == rec.get("text", rec.get("content"))
    sp = [s for s in shards if s.kind == "slimpajama"][0]
    assert [r for _, _, r in sources.read_file(sp, 0, bad)] == list(range(1, 1 + len(
        F.docstrings()[0::4])))
    with pytest.raises(DataError, match="has no record 999"):
        sources.read_record(sp.paths[0], 999)


# ----------------------------------------------------------------------------- bad input


def _good(text="A perfectly good document about heaps and queues.", name="RedPajamaC4"):
    return {"text": text, "meta": {"redpajama_set_name": name}}


def _jsonl(root, lines: list[bytes], name="example_train_0.jsonl", zst=False):
    p = root / "sp" / name
    raw = b"".join(l + b"\n" for l in lines)
    if zst:
        F.write_zst(p.with_name(p.name + ".zst"), raw)
        return p.with_name(p.name + ".zst")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(raw)
    return p


def _good_line():
    return json.dumps(_good()).encode()


def case_invalid_json(root):
    return _jsonl(root, [_good_line(), b'{"text": "unterminated', _good_line()]), 2


def case_not_object(root):
    return _jsonl(root, [_good_line(), b'["a", "list"]']), 2


def case_non_utf8_line(root):
    return _jsonl(root, [_good_line(), b'{"text": "caf\xe9 latte", "meta": '
                                       b'{"redpajama_set_name": "RedPajamaC4"}}']), 2


def case_lone_surrogate(root):
    return _jsonl(root, [_good_line(), b'{"text": "bad \\ud800 here", "meta": '
                                       b'{"redpajama_set_name": "RedPajamaC4"}}'], zst=True), 2


def case_empty_document(root):
    return _jsonl(root, [_good_line(), _good_line(), json.dumps(_good("  \n ")).encode()]), 3


def case_missing_text(root):
    return _jsonl(root, [_good_line(),
                         json.dumps({"meta": {"redpajama_set_name": "RedPajamaC4"}}).encode()]), 2


def case_missing_set_name(root):
    return _jsonl(root, [_good_line(), json.dumps({"text": "hello there", "meta": {}}).encode()],
                  zst=True), 2


def case_text_not_string(root):
    return _jsonl(root, [json.dumps({"text": 42, "meta": {"redpajama_set_name": "X"}}).encode(),
                         _good_line()]), 1


def case_empty_line(root):
    return _jsonl(root, [_good_line(), b"", _good_line()]), 2


def case_truncated_zst(root):
    p = _jsonl(root, [_good_line()] * 200, zst=True)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    return p, None


def case_garbage_zst(root):
    p = root / "sp" / "example_train_3.jsonl.zst"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"this is not a zstd frame at all" * 10)
    return p, None


def case_empty_zst(root):
    p = root / "sp" / "example_train_3.jsonl.zst"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"")
    return p, None


def case_corrupt_parquet(root):
    p = root / "sc" / "python" / "train-00000.parquet"
    F.write_parquet(p, ["print('hello world')\n"] * 50)
    raw = p.read_bytes()
    p.write_bytes(raw[:-40])  # footer gone
    return p, None


def case_parquet_missing_column(root):
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = root / "sc" / "python" / "train-00000.parquet"
    p.parent.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["x = 1\n"]}), p)
    return p, None


def case_parquet_null_content(root):
    p = root / "sc" / "python" / "train-00000.parquet"
    F.write_parquet(p, ["x = 1  # one\n", None, "y = 2  # two\n"])
    return p, 2


def case_parquet_non_utf8(root):
    p = root / "sc" / "python" / "train-00000.parquet"
    F.write_parquet(p, [b"x = 1  # ok\n", b"s = '\xff\xfe'\n"], binary=True)
    return p, 2


def case_parquet_empty_content(root):
    p = root / "sc" / "css" / "train-00000.parquet"
    F.write_parquet(p, ["a { color: red }\n", ""])
    return p, 2


def case_text_non_utf8(root):
    p = root / "code" / "blob.c"
    p.parent.mkdir(parents=True)
    (root / "code" / "ok.c").write_text("int main(void) { return 0; }\n")
    p.write_bytes(b"int x = '\xff';\n")
    return p, None


def case_text_empty(root):
    p = root / "code" / "empty.py"
    p.parent.mkdir(parents=True)
    (root / "code" / "ok.py").write_text("print('hi')\n")
    p.write_text("\n\n")
    return p, None


def case_missing_file(root):
    p = root / "code" / "gone.py"
    p.parent.mkdir(parents=True)
    (root / "code" / "ok.py").write_text("print('hi')\n")
    os.symlink(root / "nowhere.py", p)  # listed, but cannot be opened
    return p, None


BAD_CASES = {
    "invalid_json": (case_invalid_json, "invalid_json"),
    "not_object": (case_not_object, "invalid_json"),
    "non_utf8_line": (case_non_utf8_line, "non_utf8"),
    "lone_surrogate": (case_lone_surrogate, "non_utf8"),
    "empty_document": (case_empty_document, "empty_document"),
    "missing_text": (case_missing_text, "missing_field"),
    "missing_set_name": (case_missing_set_name, "missing_field"),
    "text_not_string": (case_text_not_string, "bad_field_type"),
    "empty_line": (case_empty_line, "empty_line"),
    "truncated_zst": (case_truncated_zst, "corrupt_zstd"),
    "garbage_zst": (case_garbage_zst, "corrupt_zstd"),
    "empty_zst": (case_empty_zst, "corrupt_zstd"),
    "corrupt_parquet": (case_corrupt_parquet, "corrupt_parquet"),
    "parquet_missing_column": (case_parquet_missing_column, "missing_column"),
    "parquet_null_content": (case_parquet_null_content, "missing_field"),
    "parquet_non_utf8": (case_parquet_non_utf8, "non_utf8"),
    "parquet_empty_content": (case_parquet_empty_content, "empty_document"),
    "text_non_utf8": (case_text_non_utf8, "non_utf8"),
    "text_empty": (case_text_empty, "empty_document"),
    "missing_file": (case_missing_file, "missing_file"),
}


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_input_fails_with_file_and_line(tmp_path, name):
    make, reason = BAD_CASES[name]
    path, line = make(tmp_path)
    with pytest.raises(BadRecordError) as ei:
        _docs(tmp_path, "fail")
    e = ei.value
    msg = str(e)
    assert "\n" not in msg
    assert e.reason == reason and e.path == str(path) and e.line == line
    assert msg.startswith(f"{path}:{line}: {reason}" if line else f"{path}: {reason}")


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_input_skipped_and_counted(tmp_path, name):
    make, reason = BAD_CASES[name]
    path, line = make(tmp_path)
    bad = BadRecords("skip")
    docs = []
    for shard in sources.discover(tmp_path):
        for d in sources.iter_files(shard, bad):
            docs.extend(d or [])
    assert bad.skipped == 1 and bad.by_reason == {reason: 1}
    ex = bad.examples[0]
    assert ex["file"] == path.relative_to(tmp_path).as_posix() and ex["line"] == line
    # the good records around it survive; a broken file is dropped whole
    texts = [t for _, t, _ in docs]
    if line is None and path.suffix in (".zst", ".parquet"):
        assert texts == [] and bad.files_skipped == 1
    else:
        assert texts and all(t.strip() for t in texts)


def test_truncated_zst_drops_whole_file_not_a_prefix(tmp_path):
    """Half a file must never reach the data: the records before the cut are dropped too."""
    p = _jsonl(tmp_path, [json.dumps(_good(f"document number {i} " * 20)).encode()
                          for i in range(2000)], zst=True)
    raw = p.read_bytes()
    p.write_bytes(raw[: int(len(raw) * 0.8)])
    bad = BadRecords("skip")
    (shard,) = sources.discover(tmp_path)
    assert list(sources.iter_files(shard, bad)) == [None]
    assert bad.files_skipped == 1 and bad.by_reason == {"corrupt_zstd": 1}
    assert bad.documents_discarded > 0  # records were readable before the cut, yet dropped


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        sources.discover(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no input files"):
        sources.discover(tmp_path / "empty")
    _jsonl(tmp_path / "x", [_good_line()], name="data.jsonl")
    with pytest.raises(DataError, match="trailing shard number"):
        sources.discover(tmp_path / "x")


def test_concatenated_zst_frames_read_fully(tmp_path):
    import zstandard
    p = tmp_path / "example_train_1.jsonl.zst"
    a = zstandard.ZstdCompressor().compress(_good_line() + b"\n")
    b = zstandard.ZstdCompressor().compress(json.dumps(_good("second frame text")).encode()
                                             + b"\n")
    p.write_bytes(a + b)
    docs = _docs(tmp_path)
    assert [g for g, _ in docs] == ["slimpajama.odd.RedPajamaC4"] * 2
    assert docs[1][1] == "second frame text"
