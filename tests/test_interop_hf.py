"""crystal <-> Hugging Face folders in the three layouts: bitwise round trips with non-zero
biases and norm gains, logits of exports run by transformers (llama, stablelm) and by an
independent torch reference of LLM360's layout (llm360), LLM360's config.json literally,
folders crystal did not write, bad input, and a trained run out and back into training."""
import json
import os
import re
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import llm360_reference  # noqa: E402
from model_fixtures import random_params  # noqa: E402
from crystal import checkpoint as ckpt_lib  # noqa: E402
from crystal import config as config_lib  # noqa: E402
from crystal import model as model_lib  # noqa: E402
from crystal import train  # noqa: E402
from crystal.data import tokenizer as tokenizer_lib  # noqa: E402
from crystal.errors import ConversionError  # noqa: E402
from crystal.interop import hf, hf_classes, llm360, registry  # noqa: E402

TOL = 1e-4          # float32 parity
BROKEN = 1e-2       # what a wrong conversion must exceed
STABLELM_ZERO = ("b_o", "b_gate", "b_up", "b_down")  # StableLm has no such biases

VARIANTS = {
    "amber_tiny": ("amber_tiny", {}),
    "crystalcoder_tiny": ("crystalcoder_tiny", {}),
    # Llama with muP, every bias and interleaved pairs (permuted to rotate-half)
    "amber_mup_bias_interleaved": ("amber_tiny", {
        "mup.enabled": True, "mup.base_width": 32, "mup.embedding_multiplier": 5.0,
        "mup.output_alpha": 3.0, "model.qkv_bias": True, "model.out_bias": True,
        "model.ffn_bias": True, "model.rotary_pairing": "interleaved"}),
    # Llama under SP with biases and GPT-J pairs: exact (a permutation, no folds)
    "amber_bias_interleaved": ("amber_tiny", {
        "model.qkv_bias": True, "model.out_bias": True, "model.ffn_bias": True,
        "model.rotary_pairing": "interleaved"}),
    # LayerNorm, untied, SP, no norm bias, rotate-half, half the head rotated
    "crystalcoder_sp_untied_half": ("crystalcoder_tiny", {
        "mup.enabled": False, "model.tie_embeddings": False, "model.norm_bias": False,
        "model.rotary_pairing": "half", "model.rotary_fraction": 0.5,
        "model.qkv_bias": False, "model.out_bias": False, "model.ffn_bias": False}),
    "crystalcoder_unrolled": ("crystalcoder_tiny", {"model.scan_layers": False}),
}


def variant(name):
    base, over = VARIANTS[name]
    return config_lib.load(base, over)


def crystal_params(cfg, layout="llm360", seed=0):
    return random_params(cfg, seed, zero=STABLELM_ZERO if layout == "stablelm" else ())


_apply = jax.jit(model_lib.apply, static_argnums=2)


def crystal_logits(params, tokens, cfg):
    return np.asarray(_apply(params, jnp.asarray(tokens), model_lib.ModelSpec.from_config(cfg)))


def hf_logits(m, tokens):
    with torch.no_grad():
        return m(torch.from_numpy(np.asarray(tokens)).long()).logits.numpy()


def transformers_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager").eval()


def same_bits(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(
        lambda x, y: np.asarray(x).dtype == np.asarray(y).dtype
        and np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """4 x 48 ids of real text: Python stdlib source through crystal's sentencepiece
    tokenizer, trained here on other stdlib files."""
    lib = Path(os.__file__).parent
    lines = []
    for name in ("argparse.py", "textwrap.py", "string.py", "shlex.py"):
        lines += [ln for ln in (lib / name).read_text().splitlines() if ln.strip()]
    cfg = config_lib.load("amber_tiny", {"tokenizer.vocab_size": 600})
    tok = tokenizer_lib.train_from_lines(cfg, lines, tmp_path_factory.mktemp("tok") / "t.model")
    rows = np.asarray(tok.encode((lib / "heapq.py").read_text())[: 4 * 48], np.int32)
    assert len(np.unique(rows)) > 50 and rows.max() < 600
    return rows.reshape(4, 48)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name,layout", [
    ("amber_tiny", "llama"), ("amber_bias_interleaved", "llama"),
    ("crystalcoder_tiny", "llm360"), ("crystalcoder_unrolled", "llm360"),
    ("crystalcoder_sp_untied_half", "llm360"), ("crystalcoder_sp_untied_half", "stablelm")])
def test_round_trip_is_bitwise(name, layout, tmp_path):
    """Both variants through every layout that holds them exactly: the same float32 bits
    (non-zero biases and norm gains), the same config, sharded files read back."""
    cfg = variant(name)
    params = crystal_params(cfg, layout)
    out = hf.save(params, cfg, tmp_path / "hf", layout, max_shard_bytes=400_000)
    assert out["exact"] and len(out["files"]) > 1
    assert (tmp_path / "hf" / hf.INDEX_FILE).is_file()
    back, cfg_back, lay = hf.load(tmp_path / "hf")
    assert lay.name == layout
    assert same_bits(back, params)
    assert config_lib.to_json_dict(cfg_back) == config_lib.to_json_dict(cfg)


def test_stablelm_folds_mup_into_the_weights_to_one_ulp(tmp_path):
    """CrystalCoder's muP multipliers have to be multiplied into StableLm's weights: the
    round trip is within 1 ulp, and the export says it is not bitwise."""
    cfg = variant("crystalcoder_tiny")
    params = crystal_params(cfg, "stablelm")
    assert not hf.save(params, cfg, tmp_path / "hf", "stablelm")["exact"]
    back, _, _ = hf.load(tmp_path / "hf")
    jax.tree.map(lambda a, b: np.testing.assert_array_max_ulp(a, np.asarray(b), maxulp=1),
                 back, params)
    assert not same_bits(back, params)


def test_auto_layout_and_what_each_layout_refuses():
    amber, cc = variant("amber_tiny"), variant("crystalcoder_tiny")
    assert registry.pick(amber, "auto").name == "llama"
    assert registry.pick(cc, "auto").name == "llm360"
    with pytest.raises(ConversionError, match="use --layout=llm360"):
        registry.pick(cc, "llama")
    with pytest.raises(ConversionError, match="use --layout=llama"):
        registry.pick(amber, "llm360")
    with pytest.raises(ConversionError, match="rotary_fraction"):
        registry.pick(config_lib.load("amber_tiny", {"model.rotary_fraction": 0.5}), "llama")
    with pytest.raises(ConversionError, match="RoPE base"):
        registry.pick(config_lib.load("crystalcoder_tiny", {"model.rotary_base": 5e5}),
                      "llm360")
    # A trained CrystalCoder has attention-output and FFN biases StableLm cannot hold.
    params = crystal_params(cc)
    with pytest.raises(ConversionError, match=r"no attention-output \(o_proj\) bias; layer 0's "
                       r"is non-zero .*use --layout=llm360"):
        hf_classes.STABLELM.to_tensors(params, cc)


# ----------------------------------------------------------------------------- logits


@pytest.mark.parametrize("name,layout", [
    ("amber_tiny", "llama"), ("amber_mup_bias_interleaved", "llama"),
    ("crystalcoder_tiny", "stablelm"), ("crystalcoder_sp_untied_half", "stablelm")])
def test_transformers_runs_the_export(name, layout, tokens, tmp_path):
    cfg = variant(name)
    params = crystal_params(cfg, layout)
    hf.save(params, cfg, tmp_path / "hf", layout)
    m = transformers_model(tmp_path / "hf")
    assert type(m).__name__ == registry.get(layout).architecture
    lc = crystal_logits(params, tokens, cfg)
    assert np.abs(lc).max() > 0.1  # logits of a real size, so 1e-4 means something
    np.testing.assert_allclose(hf_logits(m, tokens), lc, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["crystalcoder_tiny", "crystalcoder_sp_untied_half"])
def test_llm360_reference_runs_the_export(name, tokens, tmp_path):
    """An independent torch implementation of LLM360's CrystalCoder (from the published
    facts: names, Conv1D orientation, muP fields, GPT-J RoPE) computes crystal's logits
    from the exported folder alone."""
    cfg = variant(name)
    params = crystal_params(cfg)
    hf.save(params, cfg, tmp_path / "hf", "llm360")
    hc, sd = llm360_reference.read_folder(tmp_path / "hf")
    lc = crystal_logits(params, tokens, cfg)
    assert np.abs(lc).max() > 0.1
    np.testing.assert_allclose(llm360_reference.logits(hc, sd, tokens), lc, atol=TOL, rtol=0)
    # the reference is sensitive to what the layout must get right
    for key, value in (("mup_width_scale", 1.0), ("mup_scale_qk_dot_by_d",
                                                  not hc["mup_scale_qk_dot_by_d"])):
        wrong = llm360_reference.logits(dict(hc, **{key: value}), sd, tokens)
        if hc[key] != value:
            assert np.abs(wrong - lc).max() > BROKEN, key
    flipped = dict(sd)
    for i in range(cfg.model.num_layers):   # (out, in) instead of Conv1D's (in, out)
        w = sd[f"transformer.h.{i}.attn.c_proj.weight"]
        flipped[f"transformer.h.{i}.attn.c_proj.weight"] = np.ascontiguousarray(w.T)
    assert np.abs(llm360_reference.logits(hc, flipped, tokens) - lc).max() > BROKEN


def test_wrong_permutation_or_missing_fold_breaks_transformers_parity(tokens, tmp_path,
                                                                     monkeypatch):
    cfg = variant("crystalcoder_tiny")
    params = crystal_params(cfg, "stablelm")
    lc = crystal_logits(params, tokens, cfg)
    real = hf_classes.folds
    cases = [("perm", lambda: monkeypatch.setattr(hf_classes, "rotary_perm",
                                                  lambda spec: np.arange(spec.head_dim)))]
    cases += [(w, lambda w=w: monkeypatch.setattr(hf_classes, "folds",
                                                  lambda spec: {**real(spec), w: 1.0}))
              for w in ("embedding", "logits", "q")]
    for i, (what, patch) in enumerate(cases):
        with monkeypatch.context():
            patch()
            hf.save(params, cfg, tmp_path / str(i), "stablelm")
        lh = hf_logits(transformers_model(tmp_path / str(i)), tokens)
        assert np.abs(lh - lc).max() > BROKEN, what


def test_folds_are_the_mup_numbers():
    spec = model_lib.ModelSpec.from_config(config_lib.load("crystalcoder_7b"))
    f = hf_classes.folds(spec)
    assert f["embedding"] == pytest.approx(14.6)
    assert f["logits"] == pytest.approx(2.22 * 256 / 4096)      # 0.13875
    assert f["q"] == pytest.approx(128 ** -1 / 128 ** -0.5)     # 1/d vs 1/sqrt(d)
    perm = hf_classes.rotary_perm(spec)                          # 32 of 128 dims rotate
    assert list(perm[:32]) == list(range(0, 32, 2)) + list(range(1, 32, 2))
    assert list(perm[32:]) == list(range(32, 128))
    sp = model_lib.ModelSpec.from_config(config_lib.load("amber_7b"))
    assert set(hf_classes.folds(sp).values()) == {1.0}          # SP: nothing multiplied


# ----------------------------------------------------------------------------- llm360 layout


def test_llm360_config_json_is_llm360s():
    """CrystalCoder 7B's config.json carries LLM360's published fields and auto_map, value
    for value (shared/reference/llm360.md)."""
    hc = llm360.LLM360.config_json(config_lib.load("crystalcoder_7b"))
    published = {
        "model_type": "crystalcoder", "architectures": ["CrystalCoderLMHeadModel"],
        "n_embd": 4096, "n_layer": 32, "n_head": 32, "n_inner": 10922, "n_positions": 2048,
        "vocab_size": 32032, "layer_norm_epsilon": 1e-5, "activation_function": "swiglu",
        "position_embedding_type": "rotary", "rotary_dim": 32, "mup_embeddings_scale": 14.6,
        "mup_output_alpha": 2.22, "mup_width_scale": 0.0625, "mup_scale_qk_dot_by_d": True,
        "scale_attn_weights": True, "tie_word_embeddings": True, "bos_token_id": 1,
        "eos_token_id": 2, "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "use_cache": True,
        "auto_map": {
            "AutoConfig": "configuration_crystalcoder.CrystalCoderConfig",
            "AutoModel": "modeling_crystalcoder.CrystalCoderModel",
            "AutoModelForCausalLM": "modeling_crystalcoder.CrystalCoderLMHeadModel"}}
    assert {k: hc[k] for k in published} == published
    assert {type(hc[k]) for k in ("mup_embeddings_scale", "mup_width_scale")} == {float}


def test_llm360_tensor_names_and_conv1d_orientation():
    cfg = variant("crystalcoder_tiny")
    params = crystal_params(cfg)
    sd = llm360.LLM360.to_tensors(params, cfg)
    per_layer = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                 "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                 "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_fc2.weight", "mlp.c_fc2.bias",
                 "mlp.c_proj.weight", "mlp.c_proj.bias"]
    want = (["transformer.wte.weight"]
            + [f"transformer.h.{i}.{n}" for i in range(2) for n in per_layer]
            + ["transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"])
    assert list(sd) == want
    D, F = cfg.model.d_model, cfg.model.ffn_dim
    blk = jax.tree.map(lambda x: np.asarray(x[0]), params["layers"]["block"])
    # Conv1D (in, out): x @ W; q|k|v side by side; c_fc is up, c_fc2 the SiLU gate.
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (D, 3 * D)
    np.testing.assert_array_equal(sd["transformer.h.0.attn.c_attn.weight"][:, D:2 * D],
                                  blk["attn"]["w_k"].reshape(D, D))
    np.testing.assert_array_equal(sd["transformer.h.0.attn.c_attn.bias"][2 * D:],
                                  blk["attn"]["b_v"].reshape(D))
    assert sd["transformer.h.0.mlp.c_proj.weight"].shape == (F, D)
    np.testing.assert_array_equal(sd["transformer.h.0.mlp.c_fc.weight"], blk["mlp"]["w_up"])
    np.testing.assert_array_equal(sd["transformer.h.0.mlp.c_fc2.bias"], blk["mlp"]["b_gate"])
    np.testing.assert_array_equal(sd["lm_head.weight"], sd["transformer.wte.weight"])


# ----------------------------------------------------------------------------- foreign folders


def test_import_a_transformers_llama_folder(tokens, tmp_path):
    """A Llama that crystal did not write (no crystal_config.json): the config comes from
    config.json (SP, rotate-half, untied) and crystal computes the same logits."""
    hcfg = transformers.LlamaConfig(vocab_size=640, hidden_size=64, intermediate_size=96,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=64, rope_theta=5e4,
                                    tie_word_embeddings=False)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(hcfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            big = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
            p.copy_((1 + 0.2 * torch.randn(p.shape, generator=g)) if p.ndim == 1 else
                    big / p.shape[-1] ** 0.5 * torch.randn(p.shape, generator=g))
    m.save_pretrained(tmp_path / "llama", safe_serialization=True)
    params, cfg, lay = hf.load(tmp_path / "llama", overrides={"model.compute_dtype": "float32"})
    assert lay.name == "llama" and cfg.name == "amber_7b"
    assert (cfg.model.d_model, cfg.model.rotary_base, cfg.mup.enabled) == (64, 5e4, False)
    np.testing.assert_allclose(crystal_logits(params, tokens, cfg), hf_logits(m.eval(), tokens),
                               atol=TOL, rtol=0)


def test_import_an_llm360_folder_from_config_json_alone(tmp_path):
    """LLM360's own folders have no crystal_config.json: muP (base width, multipliers) and
    the architecture come from config.json, and the params are the same bits."""
    cfg = variant("crystalcoder_tiny")
    params = crystal_params(cfg)
    hf.save(params, cfg, tmp_path / "hf", "llm360")
    (tmp_path / "hf" / hf.CRYSTAL_CONFIG_FILE).unlink()
    back, derived, _ = hf.load(tmp_path / "hf")
    assert derived.name == "crystalcoder_7b"       # the other sections' default
    runtime = ("compute_dtype", "remat")           # how to run it: the base config's
    model = {k: v for k, v in config_lib.to_json_dict(derived)["model"].items()
             if k not in runtime}
    assert model == {k: v for k, v in config_lib.to_json_dict(cfg)["model"].items()
                     if k not in runtime}
    assert config_lib.to_json_dict(derived)["mup"] == config_lib.to_json_dict(cfg)["mup"]
    assert same_bits(back, params)


# ----------------------------------------------------------------------------- bad input


def _rewrite(folder: Path, change):
    sd = load_file(str(folder / "model.safetensors"))
    change(sd)
    save_file(sd, str(folder / "model.safetensors"))


def _bad_folders(src: Path, root: Path):
    """(name, folder, expected error) for one broken copy of `src` each."""
    def copy(name):
        d = root / name
        shutil.copytree(src, d)
        return d
    cases = []
    d = copy("missing")
    _rewrite(d, lambda sd: sd.pop("transformer.h.1.attn.c_proj.weight"))
    cases.append((d, "missing transformer.h.1.attn.c_proj.weight"))
    d = copy("misshapen")
    _rewrite(d, lambda sd: sd.update({"transformer.h.0.mlp.c_fc.weight": np.zeros((3, 4),
                                                                                 np.float32)}))
    cases.append((d, r"transformer.h.0.mlp.c_fc.weight has shape \(3, 4\), expected"))
    d = copy("extra")
    _rewrite(d, lambda sd: sd.update({"transformer.h.0.attn.q_norm.weight": np.ones(
        4, np.float32)}))
    cases.append((d, "no place for, e.g. transformer.h.0.attn.q_norm.weight"))
    d = copy("untied")
    _rewrite(d, lambda sd: sd.update({"lm_head.weight": sd["lm_head.weight"] + 1}))
    cases.append((d, "lm_head.weight differs from transformer.wte.weight"))
    d = copy("pickle")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    cases.append((d, "pytorch_model.bin is a pickle"))
    d = copy("json")
    (d / "config.json").write_text('{\n "n_embd": 128,\n oops\n}\n')
    cases.append((d, r"config.json:3: bad JSON"))
    d = copy("arch")
    hc = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(hc, architectures=["BertModel"])))
    cases.append((d, "BertModel.*no layout crystal reads"))
    d = copy("field")
    (d / "config.json").write_text(json.dumps(dict(hc, n_layer=3)))
    cases.append((d, "field n_layer is 3, the crystal config expects 2"))
    return cases


def test_bad_folders_are_one_line_errors(tmp_path, capsys):
    assert hf.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(w in text for w in ("export CHECKPOINT", "import HF_DIR", "--layout",
                                   "--max_shard_size"))
    cfg = config_lib.load("crystalcoder_tiny", {"model.num_layers": 2})
    params = crystal_params(cfg)
    src = tmp_path / "good"
    hf.save(params, cfg, src, "llm360")
    for folder, want in _bad_folders(src, tmp_path / "bad"):
        out = tmp_path / "out" / folder.name
        assert hf.main(["import", str(folder), str(out)]) == 2, folder.name
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: "), err
        assert re.search(want, err), (folder.name, err)
        assert not out.exists() and not list((tmp_path / "out").glob(".*"))
    # export refusals: an output that exists is never overwritten; a layout that cannot
    # hold the model names the one that can
    ck = tmp_path / "ck"
    hf.write_checkpoint(ckpt_lib.checkpoint_dir(ck), params, cfg, {})
    assert hf.main(["export", str(ck), str(src)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert hf.main(["export", str(ck), str(tmp_path / "x"), "--layout=llama"]) == 2
    assert "use --layout=llm360" in capsys.readouterr().err
    assert hf.main(["export", str(ck), str(tmp_path / "x"), "--max_shard_size=lots"]) == 2
    assert "--max_shard_size=lots" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- a real run


RUN = {"model.num_layers": 1, "data.seq_len": 32, "train.global_batch_size": 4,
       "stages.stage_1.steps": 3, "checkpoint.every_steps": 3, "metrics.tensorboard": False,
       "metrics.plot": False, "train.eval_batches": 0, "train.progress": False,
       "data.sample_max_mb": 2.0}


def test_trained_run_exports_imports_and_trains_on(tmp_path, capsys):
    """The README's tiny CrystalCoder, trained (non-zero biases), leaves through the CLI in
    LLM360's layout with its tokenizer, comes back bit-exactly as a crystal checkpoint, and
    `crystal.train --init_from` trains on from it."""
    cfg = config_lib.load("crystalcoder_tiny", RUN)
    run = tmp_path / "run"
    train.run(cfg, run, stage=1)
    assert hf.main(["export", str(run), str(tmp_path / "hf")]) == 0
    assert "llm360 layout" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert names == ["README.md", "config.json", "crystal_config.json", "model.safetensors",
                     "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    # deterministic: the same checkpoint exports to the same bytes
    assert hf.main(["export", str(run / "checkpoints"), str(tmp_path / "hf2")]) == 0
    for n in names:
        assert (tmp_path / "hf" / n).read_bytes() == (tmp_path / "hf2" / n).read_bytes(), n

    assert hf.main(["import", str(tmp_path / "hf"), str(tmp_path / "imp")]) == 0
    with ckpt_lib.Checkpointer(run / "checkpoints", read_only=True) as c:
        trained, _ = c.restore_params(3)
    with ckpt_lib.Checkpointer(tmp_path / "imp" / "checkpoints", read_only=True) as c:
        imported, meta = c.restore_params(0)
        state = c.abstract_state(0)
    assert same_bits(imported, trained)
    assert np.any(np.asarray(trained["layers"]["block"]["mlp"]["b_down"]) != 0)
    assert meta["imported_from"]["layout"] == "llm360" and meta["step"] == 0
    assert "opt_state" in state                             # a full train state

    cfg_imp = config_lib.load(str(tmp_path / "imp" / hf.CRYSTAL_CONFIG_FILE))
    assert cfg_imp.tokenizer.model_path == str(tmp_path / "imp" / "tokenizer.model")
    cont = tmp_path / "cont"
    out = train.run(cfg_imp, cont, stage=1, init_from=str(tmp_path / "imp"),
                    stop_after_steps=2)
    assert out["start"]["kind"] == "init_from" and out["final_step"] == 2
    recs = [json.loads(x) for x in (cont / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in recs if "loss" in r)
