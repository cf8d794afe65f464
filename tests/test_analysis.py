"""Memorization score: exact on what the model itself would say, low on text it can't."""
import jax
import numpy as np
import pytest

from crystal import analysis, config, model


@pytest.fixture(scope="module")
def setup():
    cfg = config.load("amber_tiny", {"model.num_layers": 1, "data.seq_len": 64,
                                     "model.max_seq_len": 64})
    params = model.init(cfg, jax.random.key(0))
    return cfg, params


def test_own_greedy_continuations_score_one_and_others_do_not(setup):
    cfg, params = setup
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, cfg.model.vocab_size, (6, 16)).astype(np.int32)
    cont = analysis.greedy_continuation(params, cfg, prompts, l=8)
    # The continuation is what a plain step-by-step argmax gives (no off-by-one).
    buf = prompts.copy()
    for _ in range(3):
        logits = np.asarray(model.apply(params, buf, cfg))
        buf = np.concatenate([buf, logits[:, -1].argmax(-1)[:, None].astype(np.int32)], 1)
    np.testing.assert_array_equal(cont[:, :3], buf[:, 16:])
    own = np.concatenate([prompts, cont], 1)
    np.testing.assert_array_equal(analysis.memorization_scores(params, cfg, own, 16, 8), 1.0)
    other = own.copy()
    other[:, 16:] = (other[:, 16:] + 1) % cfg.model.vocab_size
    assert analysis.memorization_scores(params, cfg, other, 16, 8).max() == 0.0


def test_rows_too_short_is_a_clear_error(setup):
    cfg, params = setup
    with pytest.raises(ValueError, match="k \\+ l = 64"):
        analysis.memorization_scores(params, cfg, np.zeros((2, 40), np.int32))
