"""The tokenizer: LLaMA id conventions, StarCoder specials, reproducible training."""
import hashlib
import pickle
import subprocess
import sys

import numpy as np
import pytest

import data_fixtures as F
from crystal import config as cfg_lib
from crystal.data import tokenizer as tok_lib
from crystal.data.sources import DataError
from crystal.data.tokenizer import Tokenizer

SPECIALS = cfg_lib.STARCODER_SPECIAL_TOKENS


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    root = F.write_corpus(tmp / "corpus")
    cfg = F.small_config(tmp)
    tok = tok_lib.train(cfg, root, tmp / "a.model")
    return cfg, root, tmp, tok


def test_llama_conventions(trained):
    cfg, _, _, tok = trained
    assert tok.base_vocab_size == cfg.tokenizer.vocab_size == 512
    assert [tok.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert tok.eos_id == 2 and tok.bos_id == 1 and tok.unk_id == 0
    assert tok.id_to_piece(3) == "<0x00>"  # byte fallback pieces follow
    ids = tok.encode("漢字 ok")  # never seen in training: bytes, not <unk>
    assert 0 not in ids and tok.decode(ids) == "漢字 ok"
    assert tok.encode("x") and tok.encode("x")[0] != tok.bos_id  # no BOS added
    assert 2 not in tok.encode("end of text")                    # no EOS added


def test_text_round_trips_exactly(trained):
    _, _, _, tok = trained
    for text in F.sources(["heapq.py", "bisect.py"]) + ["  two  spaces\n\n\ttab\r\nend 12345"]:
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_after_base_vocab(trained):
    cfg, _, tmp, tok = trained
    t = Tokenizer.load(tmp / "a.model", SPECIALS)
    assert t.vocab_size == 512 + 18 and t.sha256 == tok.sha256
    assert [t.special_id(s) for s in SPECIALS] == list(range(512, 530))
    assert t.special_id("<fim_prefix>") == 512 and t.special_id("<reponame>") == 529
    with pytest.raises(KeyError, match="not a special token"):
        t.special_id("<nope>")
    # special strings inside text stay plain text ...
    ids = t.encode("a <fim_prefix> b")
    assert all(i < 512 for i in ids) and t.decode(ids) == "a <fim_prefix> b"
    # ... special ids decode to their strings
    pre, mid, suf = (t.special_id(s) for s in ("<fim_prefix>", "<fim_middle>", "<fim_suffix>"))
    ids = [pre] + t.encode("def f(") + [suf] + t.encode("):") + [mid] + t.encode("x")
    assert t.decode(ids) == "<fim_prefix>def f(<fim_suffix>):<fim_middle>x"
    assert t.decode(np.asarray(ids, np.uint16)) == t.decode(ids)
    # opt-in: special strings in text become their ids
    assert t.encode("<fim_prefix>def f(<fim_suffix>):<fim_middle>x", allow_special=True) == ids
    with pytest.raises(ValueError, match="outside the vocabulary"):
        t.decode([530])


def test_from_config_checks_sizes(trained):
    cfg, _, tmp, _ = trained
    t = Tokenizer.from_config(cfg, tmp / "a.model")
    assert t.vocab_size == 530 and t.special_tokens == tuple(SPECIALS)
    bad = F.small_config(tmp, **{"tokenizer.vocab_size": 600, "model.vocab_size": 640})
    with pytest.raises(DataError, match="tokenizer.vocab_size"):
        Tokenizer.from_config(bad, tmp / "a.model")


def test_training_is_reproducible(trained):
    cfg, root, tmp, tok = trained
    again = tok_lib.train(cfg, root, tmp / "b.model")
    assert (tmp / "b.model").read_bytes() == (tmp / "a.model").read_bytes()
    assert again.sha256 == tok.sha256 == hashlib.sha256((tmp / "a.model").read_bytes()).hexdigest()
    other = tok_lib.train(F.small_config(tmp, **{"tokenizer.vocab_size": 600,
                                                 "model.vocab_size": 640}), root, tmp / "c.model")
    assert other.sha256 != tok.sha256 and other.base_vocab_size == 600


def test_cache_reuses_the_same_training(trained):
    cfg, root, tmp, tok = trained
    a = tok_lib.obtain(cfg, root)
    cached = list((tmp / "cache" / "tokenizers").glob("*.model"))
    assert len(cached) == 1 and a.sha256 == tok.sha256
    mtime = cached[0].stat().st_mtime_ns
    b = tok_lib.obtain(cfg, root)
    assert b.sha256 == a.sha256 and cached[0].stat().st_mtime_ns == mtime


def test_constructible_in_another_process(trained):
    """grain workers build the tokenizer from the path or receive it pickled."""
    _, _, tmp, tok = trained
    t = Tokenizer.load(tmp / "a.model", SPECIALS)
    t2 = pickle.loads(pickle.dumps(t))
    text = "for i in range(10):\n    print(i)"
    assert t2.encode(text) == t.encode(text) and t2.vocab_size == t.vocab_size
    code = (f"from crystal.data.tokenizer import Tokenizer; "
            f"t = Tokenizer.load({str(tmp / 'a.model')!r}); print(t.encode({text!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == str(t.encode(text))


def test_rejects_junk_and_missing(tmp_path):
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a sentencepiece model"):
        Tokenizer.load(tmp_path / "junk.model")
    with pytest.raises(DataError, match="not found"):
        Tokenizer.load(tmp_path / "missing.model")


def test_cli_trains_a_model(trained, tmp_path):
    _, root, _, tok = trained
    out = tmp_path / "cli.model"
    r = subprocess.run([sys.executable, "-m", "crystal.data.tokenizer",
                        "--config=configs/crystalcoder_tiny.py",
                        "--config.tokenizer.vocab_size=512", "--config.model.vocab_size=576",
                        f"--input={root}", f"--out={out}"],
                       capture_output=True, text=True, cwd=cfg_lib.REPO_ROOT)
    assert r.returncode == 0, r.stderr
    assert Tokenizer.load(out).sha256 == tok.sha256
    r = subprocess.run([sys.executable, "-m", "crystal.data.tokenizer",
                        "--config=configs/crystalcoder_tiny.py",
                        f"--input={tmp_path / 'nope'}", f"--out={out}"],
                       capture_output=True, text=True, cwd=cfg_lib.REPO_ROOT)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "does not exist" in r.stderr
