"""Text generation from any checkpoint, with the run's own tokenizer and a KV cache.

    python -m crystal.generate --checkpoint=PATH --prompt=TEXT [--prompts=FILE]
        [--max_new_tokens=64] [--temperature=0] [--top_p=1] [--seed=0] [--num_samples=1]
        [--stop=STR,...] [--batch_size=32] [--mesh=data=D,fsdp=F,tensor=T] [--jsonl]

PATH is a workdir (its latest checkpoint), its checkpoints/ directory or one step
directory; the model's config is the checkpoint's own. A prompt is encoded by the run's
tokenizer after an EOS, which is how every document starts in training (crystal's data has
no BOS). Each row stops at EOS, at a stop string (the text is cut before it) or after
max_new_tokens. temperature 0 is greedy; otherwise sampling at that temperature, cut to the
top_p nucleus, reproducible from --seed: sample j of prompt i draws with row id
i * num_samples + j, whatever the batch it lands in.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
from pathlib import Path
from typing import Sequence

from crystal import checkpoint as ckpt_lib
from crystal import cli
from crystal import config as config_lib
from crystal import decode as decode_lib
from crystal import sharding as sharding_lib
from crystal.data import replay
from crystal.data.tokenizer import EOS_ID
from crystal.errors import CheckpointError, UsageError
from crystal.train.loop import enable_compilation_cache


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sample: the new text (cut before a stop string), the tokens decoded (with a stop
    string, up to one decode segment past it) and why it ended: eos, stop or length."""
    text: str
    tokens: list[int]
    finish: str


class Generator:
    """Text in, text out over a Decoder and the run's tokenizer (see the module doc)."""

    def __init__(self, decoder: decode_lib.Decoder, tokenizer):
        self.decoder, self.tokenizer = decoder, tokenizer
        self.context = int(decoder.cfg.model.max_seq_len)

    @classmethod
    def from_checkpoint(cls, path, mesh_flag: str = "", config_file: str | None = None,
                        overrides: dict | None = None) -> "Generator":
        cfg, params, workdir = load_checkpoint(path, config_file, overrides)
        enable_compilation_cache(cfg)
        mesh = sharding_lib.mesh_from_flag(cfg, mesh_flag)
        return cls(decode_lib.Decoder(params, cfg, mesh), replay.run_tokenizer(workdir))

    def encode(self, prompt: str) -> list[int]:
        return [EOS_ID] + self.tokenizer.encode(prompt)

    def new_text(self, prompt_ids: list[int], new_ids: list[int]) -> str:
        """The text `new_ids` add after the prompt (decoded together: sentencepiece drops
        a word's leading space when it starts the text it decodes)."""
        head = self.tokenizer.decode(prompt_ids[1:])
        return self.tokenizer.decode(prompt_ids[1:] + list(new_ids))[len(head):]

    def fits(self, prompt_ids: Sequence[int], max_new_tokens: int) -> bool:
        return len(prompt_ids) + max_new_tokens <= self.context

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64,
                 sampling: decode_lib.Sampling = decode_lib.Sampling(), num_samples: int = 1,
                 stop: Sequence[str] = (), batch_size: int = 32,
                 truncate: bool = False) -> list[list[Completion]]:
        """`num_samples` completions of each prompt, in prompt order. A prompt whose tokens
        and `max_new_tokens` exceed the context is an error, or with `truncate` loses its
        oldest tokens (the leading EOS kept), as evaluation harnesses cut contexts."""
        if num_samples < 1 or batch_size < 1:
            raise UsageError("--num_samples and --batch_size must be >= 1")
        if max_new_tokens >= self.context:
            raise UsageError(f"--max_new_tokens={max_new_tokens}: must be below the model's "
                             f"context of {self.context} tokens (model.max_seq_len)")
        ids = [self.encode(p) for p in prompts]
        for i, t in enumerate(ids):
            if not self.fits(t, max_new_tokens):
                if truncate:
                    keep = self.context - max_new_tokens - 1
                    ids[i] = t[:1] + t[len(t) - keep:]
                    continue
                raise UsageError(f"prompt {i}: {len(t)} tokens + --max_new_tokens="
                                 f"{max_new_tokens} exceed the model's context of "
                                 f"{self.context} tokens (model.max_seq_len)")
        rows = [(i, j) for i in range(len(ids)) for j in range(num_samples)]
        out: list[list[Completion]] = [[] for _ in ids]
        stop = [s for s in stop if s]
        for b in range(0, len(rows), batch_size):
            part = rows[b:b + batch_size]
            got = self.decoder.generate(
                [ids[i] for i, _ in part], max_new_tokens, sampling,
                row_ids=[i * num_samples + j for i, j in part],
                stop=(lambda r, toks, part=part: _cut(self.new_text(ids[part[r][0]], toks),
                                                      stop) is not None) if stop else None)
            for (i, _), d in zip(part, got):
                text = self.new_text(ids[i], d.tokens)
                cut = _cut(text, stop)
                finish = decode_lib.FINISH_STOP if cut is not None else d.finish
                out[i].append(Completion(text if cut is None else text[:cut], d.tokens,
                                         finish))
        return out


def _cut(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def load_checkpoint(path, config_file: str | None = None, overrides: dict | None = None):
    """(config, params on the host, workdir) of the checkpoint at PATH (see the module
    doc). With `config_file` or `overrides`, the resulting config must define the same run
    as the checkpoint's (config.fingerprint), else a CheckpointError."""
    directory, step = ckpt_lib.find_checkpoint(path)
    with ckpt_lib.Checkpointer(directory, read_only=True) as reader:
        params, meta = reader.restore_params(step)
    where = f"{directory}/{step}"
    if "config" not in meta:
        raise CheckpointError(f"{where}: no config in the checkpoint's meta")
    cfg = config_lib.from_json_dict(meta["config"], where)
    if config_file or overrides:
        mine = config_lib.load(config_file, overrides) if config_file else \
            config_lib.with_overrides(cfg.copy_and_resolve_references(), overrides)
        if config_lib.fingerprint(mine) != config_lib.fingerprint(cfg):
            raise CheckpointError(f"{where}: a checkpoint of config {cfg.name!r} "
                                  f"(fingerprint {config_lib.fingerprint(cfg)}), not of "
                                  f"{mine.name!r} ({config_lib.fingerprint(mine)})")
        cfg = mine
    return cfg, params, directory.parent


def _escapes(text: str) -> str:
    r"""'\n' typed on a command line as the newline it means."""
    return codecs.decode(text, "unicode_escape")


def read_prompts(path) -> list[str]:
    """Prompts from a file: .jsonl (one JSON string, or {"prompt": ...}, a line) or plain
    text (one prompt a line)."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--prompts={path}: cannot read: {e}") from None
    if p.suffix != ".jsonl":
        return [ln for ln in lines if ln.strip()]
    out = []
    for n, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            v = json.loads(ln)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: bad JSON: {e.msg}") from None
        v = v.get("prompt") if isinstance(v, dict) else v
        if not isinstance(v, str):
            raise UsageError(f"{path}:{n}: expected a JSON string or {{\"prompt\": ...}}")
        out.append(v)
    return out


FLAGS = (
    cli.Flag("checkpoint", "a workdir, its checkpoints/ or a step directory", required=True),
    cli.Flag("prompt", "one prompt (text)", str, ""),
    cli.Flag("prompts", "a file of prompts: one a line, or .jsonl of JSON strings", str, ""),
    cli.Flag("max_new_tokens", "new tokens at most per sample", int, 64),
    cli.Flag("temperature", "0: greedy; else sampling temperature", float, 0.0),
    cli.Flag("top_p", "nucleus sampling: the smallest set of tokens with this much "
             "probability", float, 1.0),
    cli.Flag("seed", "sampling seed", int, 0),
    cli.Flag("num_samples", "samples per prompt", int, 1),
    cli.Flag("stop", r"stop strings, comma-separated (\n etc. understood)", list, []),
    cli.Flag("batch_size", "rows decoded at once", int, 32),
    cli.Flag("mesh", "data=D,fsdp=F,tensor=T: decode on a device mesh", str, ""),
    cli.Flag("jsonl", "print one JSON object per sample", bool, False),
)


def main(argv=None):
    def body(a):
        prompts = ([a.prompt] if a.prompt else []) + (read_prompts(a.prompts)
                                                      if a.prompts else [])
        if not prompts:
            raise UsageError("give --prompt=TEXT or --prompts=FILE")
        gen = Generator.from_checkpoint(a.checkpoint, a.mesh, a.config_file, a.overrides)
        sampling = decode_lib.Sampling(a.temperature, a.top_p, a.seed)
        res = gen.generate(prompts, a.max_new_tokens, sampling, a.num_samples,
                           [_escapes(s) for s in a.stop], a.batch_size)
        for i, (p, samples) in enumerate(zip(prompts, res)):
            for j, c in enumerate(samples):
                if a.jsonl:
                    print(json.dumps(dict(prompt=i, sample=j, text=c.text, finish=c.finish,
                                          tokens=len(c.tokens))))
                else:
                    print(f"--- prompt {i} sample {j} ({c.finish}, {len(c.tokens)} tokens)")
                    print(p + c.text)
    return cli.run(body, doc=__doc__.split("\n\n")[0], flags=FLAGS,
                   config=cli.CONFIG_OPTIONAL, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
