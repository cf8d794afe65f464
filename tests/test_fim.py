"""FIM: layout, round trip of the text, rates, per-epoch determinism, padding and masks."""
import glob
import os

import numpy as np
import pytest

from crystal import config as cfg_lib
from crystal.data import fim
from crystal.data import tokenizer as tok_lib
from crystal.data.loader import make_example

STDLIB = os.path.dirname(os.__file__)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A real LLaMA-style tokenizer (the project's trainer) on Python stdlib sources."""
    cfg = cfg_lib.load("crystalcoder_tiny", {"tokenizer.vocab_size": 1000})
    lines = []
    for f in sorted(glob.glob(os.path.join(STDLIB, "*.py")))[:15]:
        lines += [l for l in open(f, encoding="utf-8").read().split("\n") if l.strip()]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return tok_lib.train_from_lines(cfg, lines, path)


@pytest.fixture(scope="module")
def codec(tok):
    return fim.FimCodec(tok.model_proto)


@pytest.fixture(scope="module")
def ids(tok):
    return fim.FimIds.from_specials(tok.base_vocab_size, cfg_lib.STARCODER_SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def docs():
    files = sorted(glob.glob(os.path.join(STDLIB, "json", "*.py")))
    return [open(f, encoding="utf-8").read()[:1500] for f in files]


def _packed_row(tok, docs, T):
    ids_ = np.concatenate([np.asarray(tok.encode(d) + [2], np.int32) for d in docs])
    return ids_[:T]


def test_special_ids_follow_base_vocab(tok, ids):
    base = tok.base_vocab_size
    assert (ids.prefix, ids.middle, ids.suffix, ids.pad) == (base, base + 1, base + 2, base + 3)
    assert tok.special_id("<fim_pad>") == ids.pad
    with pytest.raises(ValueError, match="fim_prefix"):
        fim.FimIds.from_specials(base, ())


@pytest.mark.parametrize("spm_order", [False, True])
def test_layout_and_text_round_trip(tok, codec, ids, docs, spm_order):
    frag = np.asarray(tok.encode(docs[0]), np.int32)
    text = codec.decode(frag)
    assert text.lstrip(" ") == docs[0]      # only the dummy-prefix space differs
    out = fim.permute(frag, codec, ids, (0.2, 0.7), spm_order)
    sentinels = [int(i) for i in out if i >= ids.prefix]
    pos = {s: int(np.flatnonzero(out == s)[0]) for s in (ids.prefix, ids.suffix, ids.middle)}
    assert sorted(sentinels) == sorted([ids.prefix, ids.suffix, ids.middle])
    lo, hi = int(0.2 * (len(text) + 1)), int(0.7 * (len(text) + 1))
    prefix, middle, suffix = text[:lo], text[lo:hi], text[hi:]
    if spm_order:   # <pre> <suf> suffix <mid> prefix middle
        assert pos[ids.prefix] == 0 and pos[ids.suffix] == 1
        assert codec.decode(out[2:pos[ids.middle]]) == suffix
        assert codec.decode(out[pos[ids.middle] + 1:]) == prefix + middle
    else:           # <pre> prefix <suf> suffix <mid> middle
        assert pos[ids.prefix] == 0 < pos[ids.suffix] < pos[ids.middle]
        assert codec.decode(out[1:pos[ids.suffix]]) == prefix
        assert codec.decode(out[pos[ids.suffix] + 1:pos[ids.middle]]) == suffix
        assert codec.decode(out[pos[ids.middle] + 1:]) == middle


def test_rates_and_eos_structure(tok, codec, ids, docs):
    row = _packed_row(tok, docs * 3, 4000)
    n_frag = int((row == 2).sum()) + 1
    fim_total, spm_total, frags = 0, 0, 0
    for r in range(60):
        rng = fim.fim_rng(0, 3, 0, 1, 0, r)
        out, n_valid, n_fim = fim.apply_fim(row, rng, codec, ids, 0.3, 0.5)
        assert out.shape == row.shape and out.dtype == np.int32
        fim_total += n_fim
        frags += n_frag
        # EOS stays the document separator: the same count unless truncated away.
        assert (out == 2).sum() <= (row == 2).sum()
        spm_total += int(np.sum((out[:-1] == ids.prefix) & (out[1:] == ids.suffix)))
    assert abs(fim_total / frags - 0.3) < 0.06
    assert abs(spm_total / max(fim_total, 1) - 0.5) < 0.15
    out, n_valid, n_fim = fim.apply_fim(row, fim.fim_rng(0, 3, 0, 1, 0, 0), codec, ids, 0.0,
                                        0.5)
    assert n_fim == 0 and n_valid == len(row) and np.array_equal(out, row)


def test_deterministic_per_record_and_independent_per_epoch(tok, codec, ids, docs):
    row = _packed_row(tok, docs, 600)

    def draw(epoch, r):
        return fim.apply_fim(row, fim.fim_rng(7, 2, epoch, 3, 1, r), codec, ids, 0.9, 0.5)[0]

    for r in range(5):
        assert np.array_equal(draw(0, r), draw(0, r))
    assert any(not np.array_equal(draw(0, r), draw(1, r)) for r in range(5))
    assert any(not np.array_equal(draw(0, r), draw(0, r + 5)) for r in range(5))


def _char_level_row(tok, text, T):
    """A row tokenised one character per token: re-tokenising it merges, so FIM shrinks it."""
    sp = tok._sp
    ids_ = [sp.piece_to_id("\u2581" if c == " " else c) for c in text]
    ids_ = [i for i in ids_ if i > 2][:T - 1] + [2]
    return np.asarray(ids_, np.int32)


def test_cut_or_pad_to_length_and_mask(tok, codec, ids, docs):
    T = 129
    seen_pad = seen_cut = False
    for r in range(60):
        row = (_packed_row(tok, docs, T) if r % 2 else
               _char_level_row(tok, docs[0].replace("\n", " "), T))
        assert row.shape == (T,)
        out, n_valid, n_fim = fim.apply_fim(row, fim.fim_rng(0, 2, 0, 0, 0, r), codec, ids,
                                            1.0, 0.5)
        assert out.shape == (T,)
        assert np.all(out[n_valid:] == ids.pad) and not np.any(out[:n_valid] == ids.pad)
        ex = make_example(out, n_valid, dict(group=0, component=0, shard=0, row=r, epoch=0,
                                             index=r), n_fim)
        # Loss only on real targets; padding inputs are segment 0.
        assert np.array_equal(ex["loss_mask"] == 0, ex["targets"] == ids.pad)
        assert np.all((ex["segment_ids"] == 0) == (ex["inputs"] == ids.pad))
        seen_pad |= n_valid < T
        seen_cut |= n_valid == T and n_fim > 0
    assert seen_cut and seen_pad


def test_segment_ids_count_documents():
    toks = np.asarray([5, 6, 2, 7, 8, 9, 2, 10, 11], np.int32)
    ex = make_example(toks, len(toks), dict(group=0, component=0, shard=0, row=0, epoch=0,
                                            index=0))
    assert ex["segment_ids"].tolist() == [1, 1, 1, 2, 2, 2, 2, 3]
    assert ex["loss_mask"].tolist() == [1.0] * 8


def test_fragments_with_special_ids_are_left_alone(tok, codec, ids, docs):
    row = _packed_row(tok, [d[:300] for d in docs], 200).copy()
    row[10] = ids.middle                       # a special id inside the first document
    first_eos = int(np.flatnonzero(row == 2)[0])
    out, _, _ = fim.apply_fim(row, fim.fim_rng(0, 2, 0, 0, 0, 0), codec, ids, 1.0, 0.5)
    assert np.array_equal(out[:first_eos + 1], row[:first_eos + 1])


def test_codec_pickles_without_processor(codec):
    import pickle
    c2 = pickle.loads(pickle.dumps(codec))
    assert c2._sp is None and c2.encode("def f(x):\n  return x") .tolist() == \
        codec.encode("def f(x):\n  return x").tolist()
