"""Log-likelihoods of token sequences under a checkpoint: what the lm-evaluation-harness
model (crystal.eval.harness) and bits per byte (crystal.eval.humaneval_bpb) measure.

A request is (context ids, continuation ids). Its score is the sum of the continuation
tokens' log-probabilities given everything before them, and whether greedy decoding would
produce the continuation. The per-token losses are crystal's training loss
(`train/loss.py`: the same output projection and cross-entropy in the same chunks), so a
harness log-likelihood is minus the training loss summed over the same tokens.

Windows: a request longer than the context (`max_length` model inputs) is scored in
disjoint windows of at most `max_length` continuation tokens, each with as much of what
precedes it as fits; every continuation token is scored exactly once, and the last window
has a full context. For a context of one token (EOS) these are lm-eval's
`loglikelihood_rolling` windows (`lm_eval.utils.get_rolling_token_windows`).

Batches: windows are sorted longest first (similar lengths share a batch), right-padded to
the next of four lengths per octave (16, 20, 24, 28, 32, 40, ..., 64, 80, 96, 112, 128,
160, ...; at most `max_length`; padding counts no token and, attention being causal,
changes no real position), `batch_size` rows a call with the last batch filled by empty
rows. So a run compiles at most four programs per doubling of length (about 30 up to 2,048
tokens), not one per request, and wastes under a quarter of a row on padding (a multiple of
64 wasted 0.6 of the compute on ARC-sized requests of 65 to 80 tokens).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from crystal import model as model_lib
from crystal.data.tokenizer import EOS_ID
from crystal.errors import UsageError
from crystal.train import loss as loss_lib

MIN_LENGTH = 16


@dataclasses.dataclass(frozen=True)
class Score:
    """A request's score: sum of log p (nats) of its continuation tokens, whether each was
    the argmax, and how many tokens were scored."""
    logprob: float
    greedy: bool
    tokens: int


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval splits them (TemplateLM._encode_pair, with
    crystal's EOS in front): the context's trailing spaces move to the continuation, and
    the continuation is what the tokens of the whole text add after the context's own
    tokens (a word split across the boundary is tokenized as in running text)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = [EOS_ID] + tokenizer.encode(context)
    return ctx, ([EOS_ID] + tokenizer.encode(context + continuation))[len(ctx):]


@dataclasses.dataclass(frozen=True)
class _Window:
    request: int
    inputs: list[int]
    targets: list[int]
    first: int            # index in targets of the first scored token


def windows(context: Sequence[int], continuation: Sequence[int], max_length: int,
            request: int = 0) -> list[_Window]:
    """The disjoint windows that score `continuation` after `context` (module docstring)."""
    if len(context) < 1:
        raise UsageError("a scored continuation needs at least one context token (EOS)")
    seq = list(context) + list(continuation)
    out = []
    for p0 in range(len(context), len(seq), max_length):
        p1 = min(p0 + max_length, len(seq))
        s = max(0, p1 - 1 - max_length)
        out.append(_Window(request, seq[s:p1 - 1], seq[s + 1:p1], p0 - (s + 1)))
    return out


@functools.partial(jax.jit, static_argnames=("spec",))
def _row_scores(params, inputs_BxL, targets_BxL, mask_BxL, spec):
    """(sum of log p over each row's masked tokens, are they all the argmax) per row."""
    h_BxLxD = model_lib.hidden(params, inputs_BxL, spec)
    loss_BxL, hit_BxL = loss_lib.scores(h_BxLxD, model_lib.output_head(params, spec),
                                        targets_BxL, multiplier=spec.logit_multiplier,
                                        dtype=spec.dtype, chunk=spec.loss_chunk)
    return -jnp.sum(loss_BxL * mask_BxL, axis=-1), jnp.all(hit_BxL | (mask_BxL == 0), axis=-1)


def padded_length(n: int) -> int:
    """The batch length for a longest window of n tokens: n rounded up to a multiple of a
    quarter of the power of two below it (module docstring), at least MIN_LENGTH."""
    if n <= MIN_LENGTH:
        return MIN_LENGTH
    step = 1 << max(0, (n - 1).bit_length() - 3)
    return -(-n // step) * step


class Scorer:
    """Scores (context, continuation) token requests with `params` (on the device or a
    mesh, in `cfg`'s layer layout); see the module docstring."""

    def __init__(self, params, cfg, batch_size: int = 16, max_length: int = 0):
        if int(batch_size) < 1:
            raise UsageError(f"batch_size={batch_size}: must be >= 1")
        self.params, self.batch_size = params, int(batch_size)
        self.spec = model_lib.ModelSpec.from_config(cfg)
        context = int(cfg.model.max_seq_len)
        self.max_length = min(int(max_length), context) if int(max_length) > 0 else context

    def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
              progress: Callable[[int], None] | None = None) -> list[Score]:
        """One Score per (context ids, continuation ids), in order; `progress(n)` after
        each batch of n windows."""
        wins = [w for i, (c, t) in enumerate(requests)
                for w in windows(c, t, self.max_length, i)]
        wins.sort(key=lambda w: -len(w.inputs))
        logprob, greedy = np.zeros(len(requests)), np.ones(len(requests), bool)
        tokens = np.zeros(len(requests), np.int64)
        for b in range(0, len(wins), self.batch_size):
            part = wins[b:b + self.batch_size]
            lp_B, ok_B = self._run(part)
            for w, lp, ok in zip(part, lp_B, ok_B):
                logprob[w.request] += lp
                greedy[w.request] &= bool(ok)
                tokens[w.request] += len(w.targets) - w.first
            if progress is not None:
                progress(len(part))
        return [Score(float(lp), bool(g), int(n)) for lp, g, n in zip(logprob, greedy, tokens)]

    def _run(self, part: list[_Window]):
        """One batch of windows through the model: (log p sums, greedy) per window."""
        L = min(padded_length(max(len(w.inputs) for w in part)), self.max_length)
        inputs_BxL = np.zeros((self.batch_size, L), np.int32)
        targets_BxL = np.zeros((self.batch_size, L), np.int32)
        mask_BxL = np.zeros((self.batch_size, L), np.float32)
        for r, w in enumerate(part):
            n = len(w.inputs)
            inputs_BxL[r, :n], targets_BxL[r, :n] = w.inputs, w.targets
            mask_BxL[r, w.first:n] = 1.0
        lp_B, ok_B = jax.device_get(_row_scores(self.params, inputs_BxL, targets_BxL,
                                                mask_BxL, spec=self.spec))
        return lp_B[:len(part)], ok_B[:len(part)]
