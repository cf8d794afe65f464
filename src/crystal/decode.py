"""Token-level decoding with a KV cache: prefill, then one token per step, on device.

`Decoder(params, cfg, mesh)` holds a model's params in the unrolled layer layout (a decode
step then updates each layer's cache in place) and compiles two programs per shape: the
prefill (the prompts, left-padded to a common length, written into the cache in one call;
the first new token chosen) and a decode segment (a `while_loop` of up to `segment` steps
that feeds the last token, chooses the next, and stops early when every row is done). The
host looks at the rows between segments, so stop strings cost no device round trip per
token.

Choosing a token: greedy (`temperature=0`) is argmax; otherwise softmax at the temperature,
cut to the smallest set of tokens whose probability reaches `top_p` (nucleus sampling), one
draw with the key `fold_in(fold_in(key(seed), row_id), t)` for the t-th new token of row
`row_id`: the same seed, row ids and prompts give the same tokens.

Shapes are bucketed (prompt length to a multiple of 16, cache length to a multiple of 64)
so that a sweep of prompts of many lengths compiles a few programs, not one per prompt.
Shape suffixes: B rows, P prompt slots, S cache slots, N new tokens, V vocab.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from crystal import config as config_lib
from crystal.interop import tree as layout_lib
from crystal import model as model_lib
from crystal import sharding as sharding_lib
from crystal.data.tokenizer import EOS_ID
from crystal.errors import UsageError

PROMPT_BUCKET, CACHE_BUCKET = 16, 64
FINISH_EOS, FINISH_LENGTH, FINISH_STOP = "eos", "length", "stop"


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at temperature 0, else temperature + top-p."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise UsageError(f"--temperature={self.temperature}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top_p={self.top_p}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class Decoded:
    """One row's new tokens (without the EOS that ended it) and why it stopped."""
    tokens: list[int]
    finish: str


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def choose(logits_BxV, keys_B, temperature, top_p, greedy: bool, nucleus: bool):
    """The next token of each row (int32 B): argmax, or one draw from the temperature- and
    top-p-shaped distribution with that row's key."""
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    x_BxV = logits_BxV.astype(jnp.float32) / temperature
    if nucleus:   # keep the most likely tokens until their mass reaches top_p
        sorted_BxV = jnp.sort(x_BxV, axis=-1)[:, ::-1]
        p_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        before_BxV = jnp.cumsum(p_BxV, axis=-1) - p_BxV
        cutoff_B = jnp.min(jnp.where(before_BxV < top_p, sorted_BxV, jnp.inf), axis=-1)
        x_BxV = jnp.where(x_BxV >= cutoff_B[:, None], x_BxV, -jnp.inf)
    return jax.vmap(jax.random.categorical)(keys_B, x_BxV).astype(jnp.int32)


def unrolled(cfg) -> ml_collections.ConfigDict:
    """`cfg` with unrolled layers: the decoder's layout (each layer's cache is its own
    buffer, updated in place by the decode loop)."""
    return config_lib.with_overrides(cfg.copy_and_resolve_references(),
                                     {"model.scan_layers": False})


def _next(logits_BxV, state, temperature, top_p, greedy, nucleus):
    """Chooses token `state['count']` of every row and records it."""
    t = state["count"]
    keys_B = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(state["key"], r), t))(
        state["row_ids"])
    tok_B = choose(logits_BxV, keys_B, temperature, top_p, greedy, nucleus)
    tok_B = jnp.where(state["done"], EOS_ID, tok_B)
    out = jax.lax.dynamic_update_index_in_dim(state["out"], tok_B, t, axis=1)
    done = state["done"] | ((tok_B == EOS_ID) & state["stop_at_eos"])
    return dict(state, out=out, count=t + 1, done=done, last=tok_B)


def _logits(params, h_BxD, spec):
    return model_lib.logits(h_BxD, model_lib.output_head(params, spec), spec)


@functools.partial(jax.jit, static_argnames=("spec", "length", "greedy", "nucleus"))
def _prefill(params, tokens_BxP, start_B, row_ids_B, key_data, stop_at_eos, temperature,
             top_p, spec, length, greedy, nucleus):
    """The prompts into a fresh cache of `length` slots; the first new token chosen."""
    B, Pn = tokens_BxP.shape
    cache = model_lib.init_cache(spec, B, length, start_B)
    h_BxPxD, cache = model_lib.hidden(params, tokens_BxP, spec, cache=cache)
    state = dict(cache=cache, out=jnp.full((B, length - Pn + 1), EOS_ID, jnp.int32),
                 count=jnp.zeros([], jnp.int32), done=jnp.zeros((B,), bool),
                 last=jnp.zeros((B,), jnp.int32), row_ids=row_ids_B,
                 key=jax.random.wrap_key_data(key_data), stop_at_eos=stop_at_eos)
    return _next(_logits(params, h_BxPxD[:, -1], spec), state, temperature, top_p, greedy,
                 nucleus)


@functools.partial(jax.jit, static_argnames=("spec", "segment", "greedy", "nucleus"),
                   donate_argnums=(1,))
def _decode(params, state, limit, temperature, top_p, spec, segment, greedy, nucleus):
    """Up to `segment` steps, while fewer than `limit` tokens and a row is live."""
    end = jnp.minimum(state["count"] + segment, limit)

    def live(s):
        return (s["count"] < end) & ~jnp.all(s["done"])

    def step(s):
        h_Bx1xD, cache = model_lib.hidden(params, s["last"][:, None], spec, cache=s["cache"])
        return _next(_logits(params, h_Bx1xD[:, 0], spec), dict(s, cache=cache), temperature,
                     top_p, greedy, nucleus)
    return jax.lax.while_loop(live, step, state)


class Decoder:
    """Prefill + cached decoding for one model; see the module docstring. The compiled
    programs are shared by every Decoder of the same model shape (a sweep over checkpoints
    compiles once)."""

    def __init__(self, params, cfg, mesh=None, segment: int = 32):
        self.cfg = unrolled(cfg)
        self.spec = model_lib.ModelSpec.from_config(self.cfg)
        self.mesh, self.segment = mesh, int(segment)
        host = layout_lib.with_layout(jax.device_get(params), scan_layers=False)
        self.params = sharding_lib.put_params(host, self.cfg, mesh)

    # ------------------------------------------------------------------ host side

    def _rows(self, x):
        """A per-row array on the mesh: rows over the batch axes when they divide them."""
        if self.mesh is None:
            return jnp.asarray(x)
        axes = sharding_lib.batch_axes(self.cfg, self.mesh)
        n = int(np.prod([self.mesh.shape[a] for a in axes])) if axes else 1
        spec = P(axes if len(axes) > 1 else axes[0]) if axes and len(x) % n == 0 else P()
        return jax.device_put(np.asarray(x), NamedSharding(self.mesh, spec))

    def _mesh_ctx(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        return sharding_lib.mesh_context(self.cfg, self.mesh)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: Sampling = Sampling(), row_ids: Sequence[int] | None = None,
                 stop_at_eos: bool = True,
                 stop: Callable[[int, list[int]], bool] | None = None) -> list[Decoded]:
        """New tokens for each prompt (one batch: every row at once).

        row_ids: each row's sampling identity (default 0..B-1). stop(row, tokens): called
        between segments with a live row's tokens so far; True ends that row (finish
        'stop', the tokens kept as they are: the caller cuts at its stop string)."""
        B = len(prompts)
        if B == 0:
            return []
        lens = [len(p) for p in prompts]
        if min(lens) < 1:
            raise UsageError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise UsageError(f"--max_new_tokens={max_new_tokens}: must be >= 1")
        Pn = _round_up(max(lens), PROMPT_BUCKET)
        S = _round_up(Pn + max_new_tokens - 1, CACHE_BUCKET)
        tokens_BxP = np.zeros((B, Pn), np.int32)
        for i, p in enumerate(prompts):
            tokens_BxP[i, Pn - len(p):] = p
        start_B = np.asarray([Pn - n for n in lens], np.int32)
        row_ids = np.arange(B) if row_ids is None else np.asarray(row_ids)
        key_data = jax.random.key_data(jax.random.key(int(sampling.seed)))
        flags = dict(greedy=sampling.greedy, nucleus=sampling.top_p < 1)
        knobs = (jnp.float32(max(sampling.temperature, 1e-6)), jnp.float32(sampling.top_p))
        with self._mesh_ctx():
            state = _prefill(self.params, self._rows(tokens_BxP), self._rows(start_B),
                             self._rows(row_ids.astype(np.int32)), key_data,
                             jnp.asarray(bool(stop_at_eos)), *knobs, spec=self.spec, length=S,
                             **flags)
            stopped_at = np.full(B, -1)
            while True:
                count, done = int(state["count"]), np.asarray(state["done"])
                if count >= max_new_tokens or done.all():
                    break
                if stop is not None:
                    out = np.asarray(state["out"])
                    for i in np.flatnonzero(~done):
                        if stop(int(i), _cut(out[i, :count].tolist(), stop_at_eos)):
                            stopped_at[i] = count
                    if (stopped_at >= 0).any():
                        state["done"] = self._rows(done | (stopped_at >= 0))
                        if (done | (stopped_at >= 0)).all():
                            break
                state = _decode(self.params, state, jnp.int32(max_new_tokens), *knobs,
                                spec=self.spec, segment=self.segment, **flags)
        out = np.asarray(state["out"])[:, :min(int(state["count"]), max_new_tokens)].tolist()
        return [_finish(row, int(at), stop_at_eos) for row, at in zip(out, stopped_at)]


def _cut(row: list[int], stop_at_eos: bool) -> list[int]:
    """A row's tokens before its EOS (when EOS ends rows)."""
    return row[:row.index(EOS_ID)] if stop_at_eos and EOS_ID in row else row


def _finish(row: list[int], stopped_at: int, stop_at_eos: bool) -> Decoded:
    """One row's result: stopped by the host at `stopped_at` tokens (-1: not), else ended
    by EOS or by the length limit."""
    if stopped_at >= 0:
        return Decoded(row[:stopped_at], FINISH_STOP)
    cut = _cut(row, stop_at_eos)
    return Decoded(cut, FINISH_EOS if len(cut) < len(row) else FINISH_LENGTH)

