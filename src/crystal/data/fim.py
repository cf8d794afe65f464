"""Fill-in-the-middle at load time, per packed sample (bigcode/Megatron style).

A packed row of `seq_len + 1` tokens is split at EOS into document fragments. Each fragment
is, with probability `fim_rate`, decoded to text, cut at two uniformly drawn character
positions into prefix / middle / suffix, the pieces are re-tokenised and laid out as

    PSM: <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
    SPM: <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle

(SPM with probability `spm_rate`). The EOS tokens stay where they were; the re-assembled row
is cut, or padded with `<fim_pad>`, back to `seq_len + 1` tokens, and the number of valid
tokens is returned so the loss mask can drop the padding.

Why at load time and not at preparation: every draw is a pure function of
(seed, stage, epoch, group, shard, row), so an epoch's FIM samples are recomputed on demand
instead of stored. LLM360 materialised each epoch on disk (2 epochs of StarCoder in stage 2,
3 in stage 3: ~5x the code tokens); here the prepared data is stored once, is identical for
every stage and FIM rate, and replay/resume stay exact because the map is stateless.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

FIM_TOKENS = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>")
EOS_ID = 2


@dataclasses.dataclass(frozen=True)
class FimIds:
    prefix: int
    middle: int
    suffix: int
    pad: int
    eos: int = EOS_ID

    @classmethod
    def from_specials(cls, base_vocab: int, special_tokens) -> "FimIds":
        """Special token k has id base_vocab + k (docs/data_format.md)."""
        special_tokens = list(special_tokens)
        missing = [t for t in FIM_TOKENS if t not in special_tokens]
        if missing:
            raise ValueError(f"FIM needs special tokens {missing} (have {special_tokens})")
        ids = {t: base_vocab + special_tokens.index(t) for t in FIM_TOKENS}
        return cls(prefix=ids["<fim_prefix>"], middle=ids["<fim_middle>"],
                   suffix=ids["<fim_suffix>"], pad=ids["<fim_pad>"])


class FimCodec:
    """Text <-> ids for FIM pieces: the run's sentencepiece model without its dummy prefix.

    With LLaMA's `add_dummy_prefix`, encoding a piece cut mid-line would invent a leading
    space and decoding a fragment would drop one; both are switched off here (and
    whitespace folding), so decode(fragment) -> cut -> encode(pieces) keeps the characters.
    Picklable (grain workers): the processor is rebuilt from the model bytes on first use.
    """

    def __init__(self, model_bytes: bytes):
        self._model_bytes = bytes(model_bytes)
        self._sp = None

    @classmethod
    def from_file(cls, path) -> "FimCodec":
        with open(path, "rb") as f:
            return cls(f.read())

    def __getstate__(self):
        return {"_model_bytes": self._model_bytes, "_sp": None}

    @property
    def sp(self) -> spm.SentencePieceProcessor:
        if self._sp is None:
            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(self._model_bytes)
            proto.normalizer_spec.add_dummy_prefix = False
            proto.normalizer_spec.remove_extra_whitespaces = False
            self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        return self._sp

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def decode(self, ids_N) -> str:
        return self.sp.decode(np.asarray(ids_N).tolist())

    def encode(self, text: str) -> np.ndarray:
        if not text:
            return np.zeros((0,), np.int32)
        return np.asarray(self.sp.encode(text), np.int32)


def fim_rng(seed: int, stage: int, epoch: int, group: int, shard: int, row: int):
    """The generator of one record's FIM draws; independent per epoch (and stage)."""
    words = [seed, 0x46494D, stage, epoch, group, shard, row]
    # As a uint32 array the same entropy is read 6x faster than as a list of Python ints
    # (SeedSequence takes each int below 2**32 as one word either way).
    if all(0 <= w < 1 << 32 for w in words):
        words = np.asarray(words, np.uint32)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))


def permute(frag_N: np.ndarray, codec: FimCodec, ids: FimIds, cuts: tuple[float, float],
            spm_order: bool) -> np.ndarray:
    """One fragment in FIM layout; `cuts` are uniform [0, 1) draws for the two positions."""
    text = codec.decode(frag_N)
    n = len(text)
    lo, hi = sorted(min(int(u * (n + 1)), n) for u in cuts)
    # Python lists until the end: a few short pieces, where numpy's per-call cost dominates.
    prefix, middle, suffix = (codec.sp.encode(t) if t else []
                              for t in (text[:lo], text[lo:hi], text[hi:]))
    seq = ([ids.prefix, ids.suffix, *suffix, ids.middle, *prefix, *middle] if spm_order
           else [ids.prefix, *prefix, ids.suffix, *suffix, ids.middle, *middle])
    return np.asarray(seq, np.int32)


def apply_fim(row_T: np.ndarray, rng: np.random.Generator, codec: FimCodec, ids: FimIds,
              fim_rate: float, spm_rate: float) -> tuple[np.ndarray, int, int]:
    """FIM on each EOS-delimited fragment of a packed row; back to the row's length.

    Returns (tokens_T int32, num_valid, num_fim): tokens past num_valid are <fim_pad>.
    The draws are vectorised up front (4 per fragment), so one fragment's outcome never
    shifts another's randomness. Fragments holding ids outside the sentencepiece vocab
    (special tokens) or control ids are left as they are: they cannot round-trip as text.
    """
    row_T = np.asarray(row_T, np.int32)
    T = row_T.shape[0]
    eos_at = np.flatnonzero(row_T == ids.eos).tolist()
    starts, ends = [0] + [i + 1 for i in eos_at], eos_at + [T]
    # [apply, spm, cut1, cut2] per fragment, as Python floats (numpy scalars cost more here)
    u = rng.random((len(starts), 4)).tolist()
    base = codec.vocab_size
    eos = np.asarray([ids.eos], np.int32)
    out, num_fim = [], 0
    for (a, b), (apply, spm_draw, cut1, cut2) in zip(zip(starts, ends), u):
        frag = row_T[a:b]
        if b > a and apply < fim_rate and frag.min() > ids.eos and frag.max() < base:
            out.append(permute(frag, codec, ids, (cut1, cut2), spm_draw < spm_rate))
            num_fim += 1
        else:
            out.append(frag)
        if b < T:
            out.append(eos)
    tokens = np.concatenate(out)
    num_valid = min(tokens.shape[0], T)
    if tokens.shape[0] >= T:
        tokens = tokens[:T]
    else:
        tokens = np.concatenate([tokens, np.full((T - tokens.shape[0],), ids.pad, np.int32)])
    return tokens, num_valid, num_fim
