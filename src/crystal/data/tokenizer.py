"""The tokenizer: a LLaMA-style sentencepiece BPE model plus StarCoder special tokens.

Ids follow LLaMA (`<unk>`=0, `<s>`=1, `</s>`=2, byte fallback, no normalisation) and then
the config's special tokens, from id `base_vocab_size` on, exactly as CrystalCoder appended
StarCoder's 18 tokens after LLaMA's 32000. The specials live outside the sentencepiece
model, so `encode` never turns a `<fim_prefix>` that appears in code into a special id.

Train one:  python -m crystal.data.tokenizer --config=configs/crystalcoder_tiny.py \
                --out=/tmp/tok.model [--input=DIR]   (no --input: the sample corpus)
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import sentencepiece as spm

from crystal import cli, fileio
from crystal.data import sample
from crystal.data.sources import BadRecords, DataError, read_file, discover

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
TRAINER_VERSION = 1  # bump when train() changes what it produces (invalidates the cache)

# LLaMA's trainer settings: BPE, raw text (no NFKC), digits split, bytes for unseen chars.
_LLAMA_TRAINER = dict(
    model_type="bpe", unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
    byte_fallback=True, normalization_rule_name="identity", split_digits=True,
    add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
    # One thread and no internal sampling: sentencepiece is only bit-reproducible so.
    num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
)


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class Tokenizer:
    """sentencepiece base vocabulary + special tokens; built from bytes, so any process can
    construct it from the model path (grain workers do)."""

    def __init__(self, model_proto: bytes, special_tokens=(), path: str | None = None):
        self._proto = bytes(model_proto)
        self.path = path
        self.special_tokens = tuple(special_tokens)
        self.sha256 = _sha256(self._proto)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on junk
            raise DataError(f"{path or 'tokenizer'}: not a sentencepiece model ({e})") from None
        sp = self._sp
        if (sp.unk_id(), sp.bos_id(), sp.eos_id()) != (UNK_ID, BOS_ID, EOS_ID):
            raise DataError(f"{path or 'tokenizer'}: not LLaMA-style (<unk>, <s>, </s> must be "
                            f"ids 0, 1, 2; got {sp.unk_id()}, {sp.bos_id()}, {sp.eos_id()})")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise DataError("tokenizer.special_tokens: duplicate special tokens")
        self.base_vocab_size = sp.get_piece_size()
        self.vocab_size = self.base_vocab_size + len(self.special_tokens)
        self._special = {t: self.base_vocab_size + i for i, t in enumerate(self.special_tokens)}
        self._special_re = None

    # -- construction

    @classmethod
    def load(cls, path, special_tokens=()) -> "Tokenizer":
        p = Path(path)
        try:
            proto = p.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{p}: tokenizer model not found") from None
        return cls(proto, special_tokens, path=str(p))

    @classmethod
    def from_config(cls, cfg, model_path) -> "Tokenizer":
        """Loads `model_path` with the config's specials; checks it fits the config."""
        tok = cls.load(model_path, tuple(cfg.tokenizer.special_tokens))
        if tok.base_vocab_size != cfg.tokenizer.vocab_size:
            raise DataError(f"{model_path}: base vocabulary is {tok.base_vocab_size}, config "
                            f"field tokenizer.vocab_size says {cfg.tokenizer.vocab_size}")
        if tok.vocab_size > cfg.model.vocab_size:
            raise DataError(f"{model_path}: {tok.vocab_size} ids do not fit config field "
                            f"model.vocab_size={cfg.model.vocab_size}")
        return tok

    def __getstate__(self):
        return dict(proto=self._proto, special_tokens=self.special_tokens, path=self.path)

    def __setstate__(self, state):
        self.__init__(state["proto"], state["special_tokens"], state["path"])

    # -- ids

    eos_id = EOS_ID
    bos_id = BOS_ID
    unk_id = UNK_ID

    def special_id(self, token: str) -> int:
        try:
            return self._special[token]
        except KeyError:
            raise KeyError(f"{token!r} is not a special token of this tokenizer "
                           f"({', '.join(self.special_tokens) or 'none'})") from None

    def id_to_piece(self, i: int) -> str:
        if i >= self.base_vocab_size:
            return self.special_tokens[i - self.base_vocab_size]
        return self._sp.id_to_piece(int(i))

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; no BOS/EOS. Special-token strings stay plain text unless
        `allow_special` (then each becomes its id; the text between is encoded apart)."""
        if not allow_special or not self.special_tokens:
            return self._sp.encode(text)
        if self._special_re is None:
            alts = sorted(self.special_tokens, key=len, reverse=True)
            self._special_re = re.compile("(" + "|".join(map(re.escape, alts)) + ")")
        ids: list[int] = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:
                ids.append(self._special[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=1) if texts else []

    def decode(self, ids) -> str:
        """Text of `ids`; special ids decode to their strings."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        out, run = [], []
        for i in ids:
            if 0 <= i < self.base_vocab_size:
                run.append(i)
                continue
            if not self.base_vocab_size <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary "
                                 f"(0..{self.vocab_size - 1})")
            if run:
                out.append(self._sp.decode(run))
                run = []
            out.append(self.special_tokens[i - self.base_vocab_size])
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    @property
    def model_proto(self) -> bytes:
        return self._proto


# ----------------------------------------------------------------------------- training


def _shard_order(shards):
    """Shards round-robin over their (kind, group, half) buckets, so an early stop still
    sees every source."""
    buckets: dict = {}
    for s in shards:
        buckets.setdefault((s.kind, s.group, s.parity), []).append(s)
    keys = sorted(buckets)
    out = []
    for i in range(max(len(v) for v in buckets.values())):
        out.extend(buckets[k][i] for k in keys if i < len(buckets[k]))
    return out


def training_sentences(input_dir, max_sentences: int, seed: int, on_bad_record="fail"):
    """Non-empty lines of the corpus, at most `max_sentences`, chosen reproducibly."""
    pool: list[str] = []
    bad = BadRecords(on_bad_record)
    for shard in _shard_order(discover(input_dir)):
        for i in range(len(shard.paths)):
            for _, text, _ in read_file(shard, i, bad) or ():
                pool.extend(l for l in text.split("\n") if l.strip())
        if len(pool) >= 2 * max_sentences:
            break
    if len(pool) > max_sentences:
        keep = np.sort(np.random.default_rng(seed).choice(len(pool), max_sentences,
                                                          replace=False))
        pool = [pool[i] for i in keep]
    return pool


def train_from_lines(cfg, lines, out_path, where="corpus") -> Tokenizer:
    """Trains the config's base vocabulary on `lines`; writes the model atomically."""
    t = cfg.tokenizer
    if not lines:
        raise DataError(f"{where}: no text to train a tokenizer on")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf,
                                       vocab_size=t.vocab_size,
                                       character_coverage=t.character_coverage,
                                       **_LLAMA_TRAINER)
    except RuntimeError as e:
        raise DataError(f"{where}: sentencepiece training failed: "
                        f"{str(e).strip().splitlines()[-1]}") from None
    fileio.atomic_write_bytes(out_path, buf.getvalue())
    return Tokenizer.load(out_path, tuple(t.special_tokens))


def train(cfg, input_dir, out_path, on_bad_record=None) -> Tokenizer:
    """Trains the config's base vocabulary on `input_dir`."""
    lines = training_sentences(input_dir, cfg.tokenizer.train_max_sentences, cfg.seed,
                               on_bad_record or cfg.data.on_bad_record)
    return train_from_lines(cfg, lines, out_path, where=str(input_dir))


def cache_key(cfg, lines) -> str:
    """Identity of a training run: its exact input lines and every trainer setting."""
    t = cfg.tokenizer
    h = hashlib.sha256(json.dumps(dict(
        vocab_size=t.vocab_size, coverage=t.character_coverage, spm=spm.__version__,
        trainer=TRAINER_VERSION, settings=_LLAMA_TRAINER), sort_keys=True).encode())
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:24]


def obtain(cfg, input_dir, on_bad_record=None) -> Tokenizer:
    """The config's tokenizer: `tokenizer.model_path` if set, else one trained on the input,
    cached under the cache dir by (exact training lines, trainer settings)."""
    if cfg.tokenizer.model_path:
        return Tokenizer.from_config(cfg, cfg.tokenizer.model_path)
    lines = training_sentences(input_dir, cfg.tokenizer.train_max_sentences, cfg.seed,
                               on_bad_record or cfg.data.on_bad_record)
    path = fileio.cache_root(cfg) / "tokenizers" / f"{cache_key(cfg, lines)}.model"
    with fileio.file_lock(path.with_suffix(".lock")):
        if not path.exists():
            train_from_lines(cfg, lines, path, where=str(input_dir))
    return Tokenizer.from_config(cfg, path)


# ----------------------------------------------------------------------------- CLI


def main(argv=None):
    def body(a):
        input_dir = a.input or a.cfg.data.input or str(sample.ensure_sample(a.cfg))
        tok = train(a.cfg, input_dir, a.out)
        print(f"wrote {a.out}: {tok.base_vocab_size} pieces + "
              f"{len(tok.special_tokens)} specials, sha256 {tok.sha256}")
    flags = [cli.Flag("out", "where to write the trained tokenizer.model", required=True),
             cli.Flag("input", "corpus folder (default: data.input, else the sample corpus)")]
    return cli.run(body, doc=__doc__.split("\n\n")[0], config=cli.CONFIG_REQUIRED, argv=argv,
                   flags=flags)


if __name__ == "__main__":
    raise SystemExit(main())
