"""Parity with transformers, the independent reference: crystal and HF logits agree to 1e-4
(float32) on real text tokens, both conversion directions, and a wrong permutation or a
missing muP fold makes them disagree."""
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from model_fixtures import random_params  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from crystal import config as config_lib  # noqa: E402
from crystal import hf  # noqa: E402
from crystal import model as model_lib  # noqa: E402
from crystal.data import tokenizer as tokenizer_lib  # noqa: E402

TOL = 1e-4          # float32 parity
BROKEN = 1e-2       # what a wrong conversion must exceed

_apply = jax.jit(model_lib.apply, static_argnums=2)


def crystal_logits(params, tokens, cfg):
    spec = model_lib.ModelSpec.from_config(cfg)
    return np.asarray(_apply(params, jnp.asarray(tokens), spec))


def hf_model(hcfg, state_dict=None):
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(hcfg, attn_implementation="eager")
    if state_dict is not None:
        m.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    return m.eval()


def hf_logits(m, tokens):
    with torch.no_grad():
        return m(torch.from_numpy(np.asarray(tokens)).long()).logits.numpy()


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
    ids = tok.encode((lib / "heapq.py").read_text())
    rows = np.asarray(ids[: 4 * 48], np.int32).reshape(4, 48)
    assert len(np.unique(rows)) > 50 and rows.max() < 600
    return rows


STABLELM_ZERO = ("b_o", "b_gate", "b_up", "b_down")  # HF StableLm has no such biases


def _variant(name):
    """Configs covering both HF classes, both pairings, tied/untied, muP/SP, biases."""
    base, o = {
        "amber_tiny": ("amber_tiny", {}),
        "crystalcoder_tiny": ("crystalcoder_tiny", {}),
        # Llama with muP, every bias and interleaved pairs (permuted to rotate-half)
        "amber_mup_bias_interleaved": ("amber_tiny", {
            "mup.enabled": True, "mup.base_width": 32, "mup.embedding_multiplier": 5.0,
            "mup.output_alpha": 3.0, "model.qkv_bias": True, "model.out_bias": True,
            "model.ffn_bias": True, "model.rotary_pairing": "interleaved"}),
        # StableLm untied, SP, no norm bias, rotate-half, half the head rotated
        "crystalcoder_sp_untied_half": ("crystalcoder_tiny", {
            "mup.enabled": False, "model.tie_embeddings": False, "model.norm_bias": False,
            "model.rotary_pairing": "half", "model.rotary_fraction": 0.5,
            "model.qkv_bias": False}),
    }[name]
    return config_lib.load(base, o)


VARIANTS = ["amber_tiny", "crystalcoder_tiny", "amber_mup_bias_interleaved",
            "crystalcoder_sp_untied_half"]


def _random_crystal(cfg, seed=0):
    return random_params(cfg, seed, zero=STABLELM_ZERO if cfg.model.norm == "layernorm" else ())


@pytest.mark.parametrize("variant", VARIANTS)
def test_crystal_to_hf_parity(variant, tokens):
    cfg = _variant(variant)
    params = _random_crystal(cfg)
    hcfg, sd = hf.to_hf(params, cfg)
    assert type(hcfg).__name__ == {"rmsnorm": "LlamaConfig",
                                   "layernorm": "StableLmConfig"}[cfg.model.norm]
    assert hcfg.tie_word_embeddings is False
    lc, lh = crystal_logits(params, tokens, cfg), hf_logits(hf_model(hcfg, sd), tokens)
    assert np.abs(lc).max() > 0.1  # logits of a real size, so 1e-4 means something
    np.testing.assert_allclose(lh, lc, atol=TOL, rtol=0)


def _random_hf(cfg, seed=1):
    """A transformers model with random weights everywhere (HF's init is as uniform-attention
    as crystal's)."""
    hcfg = hf.hf_config(cfg)
    m = hf_model(hcfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:  # (out, in) matrices; q, k large so attention is far from uniform
                big = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
                p.copy_(big / p.shape[1] ** 0.5 * torch.randn(p.shape, generator=g))
        if cfg.model.tie_embeddings:  # one tensor E: embed = E x emb_mult, head = E x logit
            spec = model_lib.ModelSpec.from_config(cfg)
            m.lm_head.weight.copy_(m.model.embed_tokens.weight / spec.embedding_multiplier
                                   * spec.logit_multiplier)
    return m


@pytest.mark.parametrize("variant", ["amber_mup_bias_interleaved", "crystalcoder_tiny"])
def test_hf_to_crystal_parity(variant, tokens):
    cfg = _variant(variant)
    m = _random_hf(cfg)
    params = hf.from_hf(m.state_dict(), cfg)
    np.testing.assert_allclose(crystal_logits(params, tokens, cfg), hf_logits(m, tokens),
                               atol=TOL, rtol=0)
    # and back: the same HF tensors
    _, sd = hf.to_hf(params, cfg)
    for k, v in m.state_dict().items():
        np.testing.assert_allclose(sd[k], v.numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    # the param tree is the model's own (names, shapes, layout)
    want = jax.tree.map(lambda s: s.shape, model_lib.abstract_params(cfg))
    assert jax.tree.map(np.shape, params) == want


def test_from_hf_scan_and_unrolled_layouts(tokens):
    cfg = _variant("crystalcoder_tiny")
    m = _random_hf(cfg)
    cfg_u = config_lib.load("crystalcoder_tiny", {"model.scan_layers": False})
    p_u = hf.from_hf(m.state_dict(), cfg_u)
    assert "layers_0" in p_u and "layers" not in p_u
    np.testing.assert_allclose(crystal_logits(p_u, tokens, cfg_u), hf_logits(m, tokens),
                               atol=TOL, rtol=0)


def test_wrong_permutation_breaks_parity(tokens, monkeypatch):
    """Identity instead of interleave -> rotate-half: the parity test must catch it."""
    cfg = _variant("crystalcoder_tiny")
    params = _random_crystal(cfg)
    lc = crystal_logits(params, tokens, cfg)
    monkeypatch.setattr(hf, "rotary_perm", lambda spec: np.arange(spec.head_dim))
    hcfg, sd = hf.to_hf(params, cfg)
    assert np.abs(hf_logits(hf_model(hcfg, sd), tokens) - lc).max() > BROKEN


@pytest.mark.parametrize("which", ["embedding", "logits", "q"])
def test_missing_multiplier_breaks_parity(which, tokens, monkeypatch):
    cfg = _variant("crystalcoder_tiny")
    params = _random_crystal(cfg)
    lc = crystal_logits(params, tokens, cfg)
    real = hf.folds
    assert real(model_lib.ModelSpec.from_config(cfg))[which] != 1.0
    monkeypatch.setattr(hf, "folds", lambda spec: {**real(spec), which: 1.0})
    hcfg, sd = hf.to_hf(params, cfg)
    assert np.abs(hf_logits(hf_model(hcfg, sd), tokens) - lc).max() > BROKEN


def test_folds_are_the_mup_numbers():
    spec = model_lib.ModelSpec.from_config(config_lib.load("crystalcoder_7b"))
    f = hf.folds(spec)
    assert f["embedding"] == pytest.approx(14.6)
    assert f["logits"] == pytest.approx(2.22 * 256 / 4096)      # 0.13875
    assert f["q"] == pytest.approx(128 ** -1 / 128 ** -0.5)     # 1/d vs 1/sqrt(d)
    perm = hf.rotary_perm(spec)                                  # 32 of 128 dims rotate
    assert list(perm[:32]) == list(range(0, 32, 2)) + list(range(1, 32, 2))
    assert list(perm[32:]) == list(range(32, 128))


@pytest.mark.parametrize("bias,hf_name", [("b_o", "o_proj"), ("b_up", "up_proj"),
                                          ("b_down", "down_proj")])
def test_stablelm_refuses_nonzero_out_and_ffn_biases(bias, hf_name):
    cfg = _variant("crystalcoder_tiny")
    params = _random_crystal(cfg)
    sub = params["layers"]["block"]["attn" if bias == "b_o" else "mlp"]
    sub[bias] = sub[bias] + 0.5
    with pytest.raises(hf.ConversionError, match=f"StableLmForCausalLM has no .*{hf_name}"):
        hf.to_hf(params, cfg)


def test_llama_refuses_partial_rotary():
    cfg = config_lib.load("amber_tiny", {"model.rotary_fraction": 0.5})
    with pytest.raises(hf.ConversionError, match="rotary_fraction"):
        hf.to_hf(random_params(cfg), cfg)
    with pytest.raises(hf.ConversionError, match="rotary_fraction"):
        hf.from_hf({}, cfg)


def test_from_hf_refuses_untied_weights_for_a_tied_config():
    cfg = _variant("crystalcoder_tiny")
    sd = {k: v.clone() for k, v in _random_hf(cfg).state_dict().items()}
    sd["lm_head.weight"] += 0.01
    with pytest.raises(hf.ConversionError, match="tie_embeddings"):
        hf.from_hf(sd, cfg)


def test_from_hf_refuses_what_crystal_cannot_hold():
    cfg = _variant("crystalcoder_tiny")
    sd = {k: v.clone() for k, v in _random_hf(cfg).state_dict().items()}
    bad = dict(sd, **{"model.layers.0.mlp.up_proj.bias": torch.ones(cfg.model.ffn_dim)})
    with pytest.raises(hf.ConversionError, match="up_proj.bias is non-zero .* no FFN bias"):
        hf.from_hf(bad, cfg)
    extra = dict(sd, **{"model.layers.0.self_attn.q_layernorm.weight": torch.ones(32)})
    with pytest.raises(hf.ConversionError, match="no place for.*q_layernorm"):
        hf.from_hf(extra, cfg)
    short = {k: v for k, v in sd.items() if k != "model.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(hf.ConversionError, match="missing model.layers.1.self_attn.k_proj"):
        hf.from_hf(short, cfg)
    cfg_nb = config_lib.load("crystalcoder_tiny", {"model.norm_bias": False})
    with pytest.raises(hf.ConversionError, match="input_layernorm.bias is non-zero"):
        hf.from_hf(sd, cfg_nb)


def test_save_pretrained_loads_in_transformers(tokens, tmp_path):
    cfg = _variant("crystalcoder_tiny")
    params = _random_crystal(cfg)
    out = hf.save_pretrained(params, cfg, tmp_path / "release")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "crystal_config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "StableLmForCausalLM"]
    m = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    np.testing.assert_allclose(hf_logits(m.eval(), tokens),
                               crystal_logits(params, tokens, cfg), atol=TOL, rtol=0)
    back = hf.load_pretrained(out, cfg)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 back, jax.tree.map(np.asarray, params))
    with pytest.raises(hf.ConversionError, match="not empty"):
        hf.save_pretrained(params, cfg, out)
    hf.save_pretrained(params, cfg, out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
    with pytest.raises(hf.ConversionError, match="num_hidden_layers is 2, config expects 3"):
        hf.load_pretrained(out, config_lib.load("crystalcoder_tiny", {"model.num_layers": 3}))
    with pytest.raises(hf.ConversionError, match="architectures 'StableLmForCausalLM'"):
        hf.load_pretrained(out, config_lib.load("amber_tiny"))
