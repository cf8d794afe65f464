"""muP: the width rules, the transfer tool's CrystalCoder constants, the coordinate check."""
import json
import math

import numpy as np
import pytest

from crystal import config as config_lib
from crystal import mup
from crystal import fileio
from crystal.mup import coord_check, transfer


def test_rules_reproduce_crystalcoder_7b_constants():
    r = mup.rules(config_lib.load("configs/crystalcoder_7b.py"))
    assert r.enabled and r.width == 4096 and r.base_width == 256
    assert r.width_scale == pytest.approx(0.0625, rel=1e-12)
    assert r.logit_multiplier == pytest.approx(0.13875, rel=1e-12)
    assert r.embedding_multiplier == pytest.approx(14.6)
    assert r.init_std["embedding"] == pytest.approx(0.073)
    assert r.init_std["hidden"] == pytest.approx(0.01825, rel=1e-12)
    assert r.init_std["residual_out"] == pytest.approx(0.00228125, rel=1e-12)
    assert r.lr_mult["hidden"] == r.lr_mult["residual_out"] == pytest.approx(0.0625)
    assert r.lr_mult["embedding"] == r.lr_mult["vector"] == r.lr_mult["output"] == 1.0
    # LLM360's Cerebras AdamW (optim.rule='cerebras'): decay 0.1 as is, coupled to the LR
    assert set(r.wd_mult.values()) == {1.0}
    assert r.attn_scale(128) == pytest.approx(1 / 128)
    m = mup.rules(config_lib.load("configs/crystalcoder_7b.py", {"optim.rule": "mup"}))
    for c in mup.CLASSES:  # microsoft/mup's rule: lr x wd constant across widths
        assert m.lr_mult[c] * m.wd_mult[c] == pytest.approx(1.0)


def test_sp_is_the_same_code_with_mup_off():
    cfg = config_lib.load("configs/crystalcoder_7b.py", {"mup.enabled": False})
    r = mup.rules(cfg)
    assert not r.enabled
    assert r.embedding_multiplier == r.logit_multiplier == 1.0
    assert set(r.init_std.values()) == {0.073} and set(r.lr_mult.values()) == {1.0}
    assert r.attn_scale(128) == pytest.approx(128 ** -0.5)
    # SP does not depend on width; muP at the base width is the base hyperparameters.
    assert mup.rules(cfg, 64) == mup.rules(cfg, 64).__class__(**{**vars(r), "width": 64,
                                                                  "base_width": 64})
    on = mup.rules(config_lib.load("configs/crystalcoder_7b.py"), 256)
    assert on.width_mult == 1.0 and on.init_std["hidden"] == pytest.approx(0.073)


def test_transfer_tool_prints_llm360_values(capsys):
    assert transfer.main(["--config=configs/crystalcoder_7b.py"]) == 0
    out = capsys.readouterr().out
    for line in ("width scale            0.0625", "logit multiplier       0.13875",
                 "embedding multiplier   14.6"):
        assert line in out, out
    assert " 0.01825 " in out and " 0.00228125 " in out
    assert "hidden        peak      0.00075" in out  # stage 1 peak 0.012 x 0.0625
    assert transfer.main(["--config=configs/crystalcoder_7b.py", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["init_std"]["residual_out"] == pytest.approx(0.00228125)
    # LLM360 decayed the hidden matrices by 0.1 at LR x 0.0625 (not microsoft/mup's 1.6)
    assert d["stages"]["stage_1"]["classes"]["hidden"]["weight_decay"] == pytest.approx(0.1)
    n = sum(g["count"] for g in d["groups"].values())
    assert 6.4e9 < n < 6.7e9  # CrystalCoder 7B: ~6.58B parameters
    assert "layers/block/mlp/w_down" in d["groups"]["residual_out"]["params"]


def test_transfer_tool_width_override_and_errors(capsys):
    assert transfer.main(["--config=configs/crystalcoder_7b.py", "--width=1024", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["width_scale"] == pytest.approx(0.25)
    assert d["logit_multiplier"] == pytest.approx(2.22 * 0.25)
    assert d["init_std"]["hidden"] == pytest.approx(0.073 * 0.5)
    assert transfer.main(["--config=configs/crystalcoder_7b.py", "--width=1000"]) == 2
    assert "error: " in capsys.readouterr().err
    assert transfer.main(["--config=configs/no_such_config.py"]) == 2
    assert "no_such_config" in capsys.readouterr().err


def test_at_width_keeps_head_dim_and_base_hyperparameters():
    cfg = config_lib.load("configs/crystalcoder_tiny.py")
    c = coord_check.at_width(cfg, 512, mup=True)
    assert (c.model.d_model, c.model.num_heads, c.model.ffn_dim) == (512, 16, 1376)
    assert c.mup.base_width == cfg.mup.base_width and c.model.init_std == cfg.model.init_std
    assert mup.rules(c).width_mult == 16
    assert not coord_check.at_width(cfg, 512, mup=False).mup.enabled


WIDTHS = (64, 256, 1024)  # a 16x range
STEPS = 3


@pytest.fixture(scope="module")
def coord():
    """The coordinate check at CI size: 1 layer, seq 32, batch 4, real (stdlib) text."""
    cfg = config_lib.load("configs/crystalcoder_tiny.py")
    batch = coord_check.stdlib_batch(4, 32, 512)
    return coord_check.run(cfg, WIDTHS, STEPS, 0.012, batch, num_layers=1, vocab_size=576)


def test_coord_check_mup_is_flat_in_width_and_sp_is_not(coord):
    for k in coord_check.LAYER_TYPES:
        for p in ("mup", "sp"):
            assert set(coord[p][k]) == {str(w) for w in WIDTHS}
            assert all(len(v) == STEPS + 1 for v in coord[p][k].values())
        assert coord_check.spread(coord, "mup", k) < 2.0, (k, coord["mup"][k])
    # SP: hidden activations grow with width after Adam steps, by far more than 2x.
    for k in ("attn_logits", "attn_out", "mlp_out", "residual"):
        assert coord_check.spread(coord, "sp", k) > 8.0, (k, coord["sp"][k])
        assert coord["sp"][k]["1024"][-1] > coord["sp"][k]["64"][-1]
    # The steps are real training: the loss on the fixed batch goes down at every width.
    for w in WIDTHS:
        loss = coord["mup"]["loss"][str(w)]
        assert loss[-1] < loss[0] - 0.3, loss


def test_coord_check_outputs(coord, tmp_path):
    fileio.write_json(tmp_path / "coord_check.json", coord)
    coord_check.plot(coord, tmp_path / "coord_check.png")
    d = json.loads((tmp_path / "coord_check.json").read_text())
    assert set(d) == {"mup", "sp"} and set(coord_check.LAYER_TYPES) <= set(d["mup"])
    assert (tmp_path / "coord_check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_coord_check_cli_rejects_bad_widths(tmp_path, capsys):
    assert coord_check.main(["--widths=64", f"--out={tmp_path}"]) == 2
    assert capsys.readouterr().err.startswith("error: --widths=64: need two or more")
    assert not list(tmp_path.iterdir())


def test_stdlib_batch_is_real_deterministic_text():
    a = coord_check.stdlib_batch(2, 16, 400)
    b = coord_check.stdlib_batch(2, 16, 400)
    assert a.shape == (2, 17) and np.array_equal(a, b)
    assert a.max() < 400 and len(np.unique(a)) > 10


def test_sweep_premise_optimizer_update_is_linear_in_base_lr():
    """experiments.mup_transfer vmaps LRs as (update at base LR 1) x LR; the real optimizer
    (clip, Adam, muP LR groups, decoupled decay) must satisfy that exactly."""
    import jax.numpy as jnp
    from experiments import mup_transfer
    cfg = mup_transfer.sweep_config(config_lib.load("configs/crystalcoder_tiny.py"), 64,
                                    True, steps=10, warmup=2, end_ratio=0.1, num_layers=1,
                                    seq_len=16, head_dim=None)
    params = {"embedding": jnp.full((8, 4), 0.1),
              "layers": {"block": {"attn": {"w_q": jnp.full((4, 4), 0.2),
                                            "w_o": jnp.full((4, 4), -0.3)},
                                   "attn_norm": {"scale": jnp.ones((4,))}}}}
    mup_transfer.check_lr_linearity(cfg, params)


def test_sweep_helpers():
    from experiments import mup_transfer
    assert mup_transfer.parse_log2_lrs("-12:-4") == list(range(-12, -3))
    assert mup_transfer.parse_log2_lrs("-6,-10,-8") == [-10, -8, -6]
    with pytest.raises(ValueError, match="--log2_lrs"):
        mup_transfer.parse_log2_lrs("a:b")
    losses = np.array([[5.0, 4.0, np.nan], [4.0, 3.0, np.nan]])
    assert mup_transfer.final_train_loss(losses, frac=0.5).tolist()[:2] == [4.0, 3.0]
    assert mup_transfer.optimum([-8, -7, -6], [4.0, 3.0, math.nan]) == -7
    assert mup_transfer.optimum([-8, -7], [math.inf, math.nan]) is None
