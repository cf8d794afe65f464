"""Configs load and validate; a bad value is a one-line error naming the field, from the
Python API and from the absl CLI; `crystal.info` prints the counts users quote."""
import json
import os
import subprocess
import sys

import pytest

from crystal import config as config_lib
from crystal import info
from crystal import metrics

CONFIGS = ["amber_7b", "amber_tiny", "crystalcoder_7b", "crystalcoder_tiny"]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_and_validates(name):
    cfg = config_lib.load(name)
    assert cfg.name == name
    assert config_lib.validate(cfg) is cfg


def test_7b_shapes_are_llm360s():
    a, c = config_lib.load("amber_7b"), config_lib.load("crystalcoder_7b")
    assert (a.model.d_model, a.model.num_layers, a.model.num_heads, a.model.ffn_dim,
            a.model.vocab_size, a.model.norm, a.model.tie_embeddings) == (
        4096, 32, 32, 11008, 32000, "rmsnorm", False)
    assert (c.model.ffn_dim, c.model.vocab_size, c.model.norm, c.model.tie_embeddings) == (
        10922, 32032, "layernorm", True)
    assert config_lib.rotary_dims(c) == 32 and c.model.rotary_pairing == "interleaved"
    assert config_lib.head_dim(a) == config_lib.head_dim(c) == 128


BAD = [
    ({"model.num_heads": 3}, "model.num_heads"),             # does not divide d_model 128
    ({"model.rotary_fraction": 3 / 32}, "model.rotary_fraction"),   # 3 rotary dims: odd
    ({"model.rotary_fraction": 0.0}, "model.rotary_fraction"),
    ({"model.rotary_fraction": 1.5}, "model.rotary_fraction"),
    ({"model.norm": "batchnorm"}, "model.norm"),
    ({"model.d_model": -128}, "model.d_model"),
    ({"model.ffn_dim": -1}, "model.ffn_dim"),
    ({"model.num_layers": 0}, "model.num_layers"),
    ({"model.vocab_size": -5}, "model.vocab_size"),
    ({"model.rotary_pairing": "zigzag"}, "model.rotary_pairing"),
    ({"model.remat": "sometimes"}, "model.remat"),
    ({"model.compute_dtype": "float16"}, "model.compute_dtype"),
    ({"model.norm_eps": -1e-5}, "model.norm_eps"),
    ({"mup.base_width": 0}, "mup.base_width"),
    ({"model.vocab_size": 1024}, "model.vocab_size"),         # cannot hold 2000 + 18 tokens
    ({"optim.rule": "adafactor"}, "optim.rule"),
    ({"optim.eps_placement": "inside"}, "optim.eps_placement"),
    ({"optim.schedule_index": "epoch"}, "optim.schedule_index"),
    ({"train.loss_denominator": "rows"}, "train.loss_denominator"),
]


@pytest.mark.parametrize("override,field", BAD, ids=[f for _, f in BAD])
def test_bad_value_is_one_line_naming_the_field(override, field):
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load("crystalcoder_tiny", override)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"config field {field}:"), msg


def test_llm360_optimizer_and_amber_mix_are_the_published_ones():
    c, a = config_lib.load("crystalcoder_7b"), config_lib.load("amber_7b")
    assert (c.optim.rule, c.optim.eps_placement, c.optim.schedule_index,
            c.train.loss_denominator) == ("cerebras", "before_correction", "step", "batch")
    assert [config_lib.stage(c, n).reset_optimizer for n in (1, 2, 3)] == [False, False, True]
    mix = {k: v.weight for k, v in a.stages.stage_1.mixture.items()}
    assert mix == {"refinedweb": 665, "starcoder": 292, "c4": 198, "arxiv": 30, "book": 29,
                   "wikipedia": 24, "stackexchange": 22}          # billions of tokens
    assert a.optim.wd_mask == "all"


def test_recorded_configs_load_from_json(tmp_path):
    """A config recorded as JSON (run.json, crystal_config.json) loads with --config; one
    recorded before a field existed gets that field's default."""
    d = config_lib.to_json_dict(config_lib.load("crystalcoder_tiny"))
    del d["optim"]["rule"], d["train"]["loss_denominator"]
    del d["stages"]["stage_1"]["reset_optimizer"]
    (tmp_path / "old.json").write_text(json.dumps(d))
    cfg = config_lib.load(str(tmp_path / "old.json"), {"train.global_batch_size": "8"})
    assert (cfg.optim.rule, cfg.train.loss_denominator) == ("mup", "tokens")
    assert cfg.stages.stage_1.reset_optimizer is False and cfg.train.global_batch_size == 8
    (tmp_path / "run.json").write_text(json.dumps(
        {"fingerprint": "x", "config": dict(d, optim=dict(d["optim"], nope=1))}))
    with pytest.raises(config_lib.ConfigError, match=r"run.json: config field optim.nope"):
        config_lib.load(str(tmp_path / "run.json"))


def test_unknown_field_and_missing_file():
    with pytest.raises(config_lib.ConfigError, match="model.nope: no such field"):
        config_lib.load("amber_tiny", {"model.nope": 1})
    with pytest.raises(config_lib.ConfigError, match="config file nope.py: not found"):
        config_lib.load("nope.py")


def _info(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "crystal.info", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def _error_lines(stderr):
    # absl/jax INFO log lines (I1201 ...) are not errors; only our line is
    return [ln for ln in stderr.splitlines() if ln.strip() and ln[:1] not in "IW"]


@pytest.mark.parametrize("args,field", [
    (["--config.model.num_heads=3"], "model.num_heads"),          # the default config
    (["--config=configs/amber_tiny.py", "--config.model.nope=3"], "nope"),
    (["--config=configs/nope.py"], "configs/nope.py"),
])
def test_cli_bad_input_exits_nonzero_with_one_line(args, field):
    r = _info(*args)
    assert r.returncode == 2 and r.stdout == ""
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], r.stderr


def test_cli_info_prints_amber_7b_count():
    r = _info("--config=configs/amber_7b.py")
    assert r.returncode == 0, r.stderr
    assert "parameters: 6,738,415,616" in r.stdout
    assert "formula: 6 * N_matmul + 12 * num_layers * d_model * seq_len" in r.stdout
    assert "layers/block/mlp/w_gate" in r.stdout and "(32, 4096, 11008)" in r.stdout


def test_info_report_crystalcoder_7b():
    cfg = config_lib.load("crystalcoder_7b")
    text = info.report(cfg)
    assert "parameters: 6,575,278,720" in text
    assert f"{metrics.flops_per_token(cfg):,.0f}" in text
    rows = info.param_rows(cfg)
    assert sum(1 for r in rows if r[0].startswith("layers/block/")) == 18
    for path, shape, dtype, axes, cls in rows:
        assert path in text and len(axes) == len(shape) and dtype == "float32"
    assert "lm_head" not in text  # tied


def test_match_groups_and_stage_order():
    groups = ["slimpajama.even.RedPajamaC4", "slimpajama.odd.RedPajamaGithub", "starcoder.css"]
    assert config_lib.match_groups("slimpajama.*,-*.RedPajamaGithub", groups) == [
        "slimpajama.even.RedPajamaC4"]
    cfg = config_lib.load("crystalcoder_tiny")
    assert config_lib.stage_names(cfg) == ["stage_1", "stage_2", "stage_3"]
    cfg.stages.stage_5 = cfg.stages.stage_3
    with pytest.raises(config_lib.ConfigError, match="stages.stage_5"):
        config_lib.validate(cfg)
