"""Analysis of checkpoints: LLM360's memorization score (Biderman et al. 2023).

The score of a training sequence is the share of its l tokens after a k-token prompt that
greedy decoding reproduces exactly (k = l = 32 in LLM360); 1.0 means "32-extractable".
Reads params from any checkpoint and rows straight from the prepared chunks, so a score can
be lined up with the chunk and the step that trained on it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from crystal import model as model_lib


@functools.partial(jax.jit, static_argnames=("cfg_key", "k", "l"))
def _greedy(params, prompt_NxK, cfg_key, k: int, l: int):
    cfg = _CFGS[cfg_key]
    buf_NxT = jnp.concatenate([prompt_NxK, jnp.zeros((prompt_NxK.shape[0], l), jnp.int32)], 1)

    def body(i, buf):  # causal: positions after k + i do not change logits at k + i - 1
        logits = model_lib.apply(params, buf, cfg)
        nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, k + i - 1, 1, False), -1)
        return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(jnp.int32), k + i, 1)

    return jax.lax.fori_loop(0, l, body, buf_NxT)[:, k:]


_CFGS: dict = {}


def greedy_continuation(params, cfg, prompt_NxK, l: int = 32) -> np.ndarray:
    """The l greedy next tokens after each prompt row (no sampling, no cache: exact)."""
    key = cfg.to_json()
    _CFGS.setdefault(key, cfg)
    prompt = jnp.asarray(prompt_NxK, jnp.int32)
    return np.asarray(_greedy(params, prompt, key, int(prompt.shape[1]), int(l)))


def memorization_scores(params, cfg, rows_NxT, k: int = 32, l: int = 32,
                        batch_size: int = 64) -> np.ndarray:
    """Per-row memorization score in [0, 1]: prompt rows[:, :k], compare to rows[:, k:k+l]."""
    rows = np.asarray(rows_NxT)
    if rows.shape[1] < k + l:
        raise ValueError(f"rows have {rows.shape[1]} tokens; k + l = {k + l} needed")
    out = []
    for i in range(0, len(rows), batch_size):
        r = rows[i:i + batch_size]
        cont = greedy_continuation(params, cfg, r[:, :k], l)
        out.append((cont == r[:, k:k + l]).mean(axis=1))
    return np.concatenate(out) if out else np.zeros((0,))
