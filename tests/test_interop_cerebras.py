"""Cerebras Model Zoo params.yaml <-> crystal configs, against CrystalCoder's three phases
(fixtures written from the published facts in shared/reference/llm360.md): every derived
number is configs/crystalcoder_7b.py's, each phase's LR curve is the Cerebras schedule step
by step, both file formats, export and back, and bad input as one line."""
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from crystal import config as config_lib
from crystal import optim
from crystal.errors import ConfigError
from crystal.interop import cerebras, cerebras_export, cerebras_import

FIXTURES = Path(__file__).parent / "fixtures" / "cerebras"
PHASES = [FIXTURES / f"crystalcoder_phase{n}.yaml" for n in (1, 2, 3)]
REFERENCE = config_lib.load("crystalcoder_7b")
MODEL_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "ffn_dim", "max_seq_len",
                "norm", "norm_eps", "norm_bias", "qkv_bias", "out_bias", "ffn_bias",
                "rotary_fraction", "rotary_base", "rotary_pairing", "tie_embeddings",
                "init_std", "compute_dtype")
OPTIM_FIELDS = ("b1", "b2", "eps", "weight_decay", "clip_norm", "wd_mask", "rule",
                "eps_placement", "schedule_index")


def neutral_base():
    """A base config unlike CrystalCoder everywhere a params.yaml speaks (Amber: SP,
    optax's eps, decay everywhere, batch 2240, one stage), so nothing passes by leaking
    from the base."""
    return config_lib.load("amber_7b", {
        "tokenizer.special_tokens": config_lib.STARCODER_SPECIAL_TOKENS,
        "model.vocab_size": 32032})


@pytest.fixture(scope="module")
def imported():
    return cerebras_import.to_config([str(p) for p in PHASES], neutral_base())


def test_every_derived_number_is_the_references(imported):
    cfg, _ = imported
    for f in MODEL_FIELDS:
        assert cfg.model[f] == REFERENCE.model[f], f
    assert config_lib.to_json_dict(cfg)["mup"] == config_lib.to_json_dict(REFERENCE)["mup"]
    for f in OPTIM_FIELDS:
        assert cfg.optim[f] == REFERENCE.optim[f], f
    for f in ("global_batch_size", "loss_denominator"):
        assert cfg.train[f] == REFERENCE.train[f], f
    assert cfg.data.seq_len == 2048 and cfg.checkpoint.every_steps == 1500
    assert config_lib.stage_names(cfg) == ["stage_1", "stage_2", "stage_3"]
    for n in (1, 2, 3):
        got, want = config_lib.stage(cfg, n), config_lib.stage(REFERENCE, n)
        assert config_lib.to_json_dict(got.schedule) == config_lib.to_json_dict(want.schedule)
        assert (got.steps, got.init, got.reset_optimizer) == (want.steps, want.init,
                                                            want.reset_optimizer), n
    # the published mixtures
    s1, s2, s3 = (config_lib.stage(cfg, n).mixture for n in (1, 2, 3))
    assert config_lib.to_json_dict(s1) == config_lib.to_json_dict(REFERENCE.stages.stage_1
                                                                  .mixture)
    odd = [c for c in s2.values() if c.groups.startswith("slimpajama.odd.")]
    assert len(odd) == 7 and sum(c.weight for c in odd) == pytest.approx(0.372, abs=1e-5)
    assert [c.weight for c in s2.values() if c.groups == "starcoder.*"] == [0.628]
    for lang, w in (("python", 0.3427), ("html", 0.1854), ("javascript", 0.1837),
                    ("css", 0.0879)):
        assert (s3[lang].groups, s3[lang].weight, s3[lang].fim_rate) == (
            f"starcoder.{lang}", w, 0.3)
    pj = [c for c in s3.values() if c.groups.startswith("slimpajama.*.")]
    assert len(pj) == 6 and sum(c.weight for c in pj) == pytest.approx(0.167, abs=1e-5)
    assert not any("Github" in c.groups for c in pj)


def cerebras_lr(learning_rate: list, s: np.ndarray) -> np.ndarray:
    """Cerebras' LR list at steps s (float64), independently of crystal: each scheduler
    runs for its steps in turn (Linear: initial + (end - initial) x t / steps), the last
    then holds its end."""
    out, start = np.full(s.shape, np.nan), 0
    for i, sch in enumerate(learning_rate):
        n = sch.get("steps", sch.get("decay_steps"))
        sel = (s >= start) & ((s < start + n) | (i == len(learning_rate) - 1))
        t = np.minimum(s[sel] - start, n)
        a, b = sch["initial_learning_rate"], sch["end_learning_rate"]
        out[sel] = a + (b - a) * t / n
        start += n
    return out


def test_each_phase_lr_curve_is_the_cerebras_schedule_step_by_step(imported):
    """Update k of a phase (k = 1 .. max_steps) runs at the LR list's step k - 1: phase 1
    stops at 79,721 part-way down its line, phase 2 re-warms to where it stood."""
    cfg, _ = imported
    last = {}
    for n, path in enumerate(PHASES, start=1):
        lr_list = yaml.safe_load(path.read_text())["optimizer"]["learning_rate"]
        stage = config_lib.stage(cfg, n)
        steps = np.arange(stage.steps)
        got = np.asarray(jax.jit(optim.schedule(stage, cfg.optim.schedule_index))(
            jnp.asarray(steps)))
        want = cerebras_lr(lr_list, steps)
        # equal to float32 resolution of the phase's peak (crystal's schedule is float32)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * want.max(),
                                   err_msg=f"phase {n}")
        assert got[0] == 0.0                           # the first update has LR 0
        last[n] = (got[-1], float(np.max(got)))
    assert config_lib.stage(cfg, 1).steps == 79_721
    assert last[2][1] == pytest.approx(last[1][0], rel=1e-3)   # 0.0087825 vs 0.0087869
    assert last[3][0] == pytest.approx(2e-4, rel=1e-3)


def test_notes_and_keys_nothing_used_are_listed(imported):
    _, report = imported
    notes = "\n".join(report["notes"])
    assert "checkpoint.every_steps = 1000" in notes                       # phase 3
    assert "data_subset 0.0-0.1" in notes and "scale_glu_initialization" in notes
    assert "StarCoder_fim_shuffled is FIM data but names no rate" in notes  # amber base
    for p in PHASES:
        assert report["unknown"][str(p)] == []
        assert "runconfig.num_csx" in report["runtime"][str(p)]
        assert "eval_input.data_dir" in report["runtime"][str(p)]
    # with crystalcoder_7b as the base, the FIM rate and epochs come from it
    cfg, report = cerebras_import.to_config([str(p) for p in PHASES], REFERENCE)
    sc = [c for c in cfg.stages.stage_2.mixture.values() if c.groups == "starcoder.*"][0]
    assert (sc.fim_rate, sc.epochs) == (0.9, 2)


def test_trainer_format_imports_the_same(imported):
    cfg2, report = cerebras_import.to_config([str(FIXTURES / "crystalcoder_phase1_trainer.yaml")],
                                             neutral_base())
    cfg, _ = imported
    for section in ("model", "mup", "optim"):
        assert config_lib.to_json_dict(cfg2)[section] == config_lib.to_json_dict(cfg)[section]
    assert config_lib.to_json_dict(cfg2.stages.stage_1) == config_lib.to_json_dict(
        cfg.stages.stage_1)
    assert not any(report["unknown"].values())


@pytest.mark.parametrize("n", [1, 2, 3])
def test_export_writes_llm360s_numbers_and_reads_back(n, tmp_path):
    out = tmp_path / f"phase{n}.yaml"
    assert cerebras.main(["export", "--config=configs/crystalcoder_7b.py", f"--stage={n}",
                          f"--out={out}"]) == 0
    d = yaml.safe_load(out.read_text())
    m, o = d["model"], d["optimizer"]
    assert (m["output_logits_scale"], m["embeddings_scale"], m["loss_weight"]) == (
        0.13875, 14.6, 0.00048828125)
    assert m["initializer"]["std"] == pytest.approx(0.01825, rel=1e-12)
    assert m["output_layer_initializer"]["std"] == pytest.approx(0.00228125, rel=1e-12)
    assert m["embedding_initializer"] == dict(name="truncated_normal", mean=0.0, std=0.073,
                                              a=-0.146, b=0.146)
    assert o["adjust_learning_rate"] == {"decoder_kernel": 0.0625}
    assert (o["optimizer_type"], o["eps"], o["weight_decay_rate"]) == ("AdamW", 1e-9, 0.1)
    assert d["runconfig"]["is_pretrained_checkpoint"] is (n == 3)
    cfg, report = cerebras_import.to_config([str(out)], REFERENCE)
    want = config_lib.to_json_dict(REFERENCE)
    got = config_lib.to_json_dict(cfg)
    for section in ("model", "mup", "optim"):
        assert got[section] == want[section], section
    s, w = got["stages"]["stage_1"], want["stages"][f"stage_{n}"]
    assert {k: s[k] for k in ("steps", "schedule", "mixture", "reset_optimizer")} == {
        k: w[k] for k in ("steps", "schedule", "mixture", "reset_optimizer")}
    assert not any(report["unknown"].values())


def _broken(tmp_path, name, change, source=PHASES[0]):
    d = yaml.safe_load(source.read_text())
    change(d)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def test_bad_params_are_one_line_errors(tmp_path, capsys):
    assert cerebras.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "import --params" in text and "export --config" in text
    def lr(d):
        return d["optimizer"]["learning_rate"]
    cases = [
        (_broken(tmp_path, "gelu", lambda d: d["model"].update(nonlinearity="gelu")),
         r"model.nonlinearity: 'gelu'; crystal can hold 'swiglu'"),
        (_broken(tmp_path, "bert", lambda d: d["trainer"]["init"]["model"].update(name="bert"),
                 FIXTURES / "crystalcoder_phase1_trainer.yaml"), r"model type 'bert'"),
        (_broken(tmp_path, "std", lambda d: d["model"]["initializer"].update(
            std=0.02, a=-0.04, b=0.04)), r"initializer.std: 0.02 contradicts the embedding"),
        (_broken(tmp_path, "steps", lambda d: lr(d)[1].update(decay_steps=5)),
         r"learning_rate.1.decay_steps: 5 contradicts steps 294337"),
        (_broken(tmp_path, "peak", lambda d: lr(d)[1].update(initial_learning_rate=0.01,
                                                              base_lr=0.01, learning_rate=0.01)),
         r"initial_learning_rate: 0.01 contradicts the warmup's end 0.012"),
        (_broken(tmp_path, "sgd", lambda d: d["optimizer"].update(optimizer_type="SGD")),
         r"optimizer.optimizer_type: 'SGD'; crystal runs AdamW"),
        (_broken(tmp_path, "nosteps", lambda d: d["runconfig"].pop("max_steps")),
         r"runconfig.max_steps: missing"),
    ]
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  hidden_size: 4096\n  oops: [1, 2\n")
    cases.append((bad_yaml, r"bad.yaml:\d+: bad YAML"))
    wide = _broken(tmp_path, "wide", lambda d: d["model"].update(hidden_size=8192),
                   PHASES[1])
    for path, want in cases + [(f"{PHASES[0]},{wide}", "contradicting phase 1's 4096")]:
        out = tmp_path / "out.json"
        assert cerebras.main(["import", f"--params={path}", f"--out={out}"]) == 2, want
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert re.search(want, err), (want, err)
        assert not out.exists()
    # a file:line names where the key is
    assert cerebras.main(["import", f"--params={cases[0][0]}", f"--out={tmp_path / 'o'}"]) == 2
    assert re.search(r"gelu.yaml:\d+: model.nonlinearity", capsys.readouterr().err)
    # what a params.yaml cannot describe is refused on export, naming the field
    assert cerebras.main(["export", "--config=configs/amber_7b.py", f"--out={tmp_path / 'a'}"
                          ]) == 2
    assert "optim.eps_placement" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="optim.rule: 'mup'"):
        cerebras_export.params(config_lib.load("crystalcoder_7b", {"optim.rule": "mup"}), 1)


def test_unknown_keys_are_listed_and_the_config_loads(tmp_path, capsys):
    extra = _broken(tmp_path, "extra", lambda d: d["model"].update(fancy_new_knob=3))
    out = tmp_path / "cc.json"
    assert cerebras.main(["import", f"--params={extra}", f"--out={out}"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"unknown keys in .*extra.yaml \(not used\): model.fancy_new_knob", text)
    cfg = config_lib.load(str(out))
    assert cfg.stages.stage_1.steps == 79_721 and json.loads(out.read_text())["mup"]["enabled"]
    assert cerebras.main(["import", f"--params={extra}", f"--out={out}"]) == 2   # no overwrite
    assert "already exists" in capsys.readouterr().err
