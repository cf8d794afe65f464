"""Param conversion between crystal and transformers, both ways, with muP folded in.

Why: transformers is the independent reference for the forward pass (tests compare logits)
and the format a release ships in. The RMSNorm variant (Amber) maps to `LlamaForCausalLM`,
the LayerNorm variant (CrystalCoder) to `StableLmForCausalLM`. Neither HF class has muP
knobs, so the multipliers are folded into weights:

- embed_tokens = embedding x embedding_multiplier;
- lm_head = head x logit_multiplier (a tied crystal embedding becomes two untied HF
  tensors, `tie_word_embeddings=False`);
- HF scales attention scores by head_dim**-0.5; crystal's scale (head_dim**-1 under muP) is
  reached by multiplying w_q and b_q by attn_scale x sqrt(head_dim);
- interleaved (GPT-J) rotary pairs are permuted to HF's rotate-half layout on q and k
  (the q.k dot product is unchanged by a common permutation of both).

A crystal variant HF cannot express (partial RoPE in Llama; attention-output or FFN biases
in StableLm, when non-zero) is refused with a ConversionError. Files are config.json +
model.safetensors (never pickle), written to a temp folder and renamed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from crystal import config as config_lib
from crystal import model as model_lib
from crystal.errors import ConversionError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CRYSTAL_CONFIG_FILE = "crystal_config.json"  # provenance: the full crystal config

ARCHITECTURES = {"rmsnorm": "LlamaForCausalLM", "layernorm": "StableLmForCausalLM"}

# Relative tolerance when checking that HF's embed_tokens and lm_head are one tied tensor.
TIE_RTOL = 1e-5




# ----------------------------------------------------------------------------- layouts


def split_layers(params) -> list[dict]:
    """Per-layer param dicts (numpy), from the scanned (`layers/block`, leading layers axis)
    or the unrolled (`layers_i/block`) layout."""
    if "layers" in params:
        stacked = params["layers"]["block"]
        n = _leaves(stacked)[0].shape[0]
        return [_tree_map(lambda x, i=i: np.asarray(x[i]), stacked) for i in range(n)]
    n = sum(1 for k in params if k.startswith("layers_"))
    return [_tree_map(np.asarray, params[f"layers_{i}"]["block"]) for i in range(n)]


def join_layers(layers: list[dict], scan_layers: bool) -> dict:
    """The inverse of split_layers: the `layers` entries of a param tree."""
    if scan_layers:
        return {"layers": {"block": _tree_map(lambda *xs: np.stack(xs), *layers)}}
    return {f"layers_{i}": {"block": layer} for i, layer in enumerate(layers)}


def with_layout(params, scan_layers: bool) -> dict:
    """The same params in the scanned or unrolled layout."""
    out = {k: v for k, v in params.items() if k != "layers" and not k.startswith("layers_")}
    out.update(join_layers(split_layers(params), scan_layers))
    return out


def _tree_map(f, *trees):
    if isinstance(trees[0], dict):
        return {k: _tree_map(f, *(t[k] for t in trees)) for k in trees[0]}
    return f(*trees)


def _leaves(tree):
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)]
    return [tree]


# ----------------------------------------------------------------------------- folding


def rotary_perm(spec: model_lib.ModelSpec) -> np.ndarray:
    """HF head-dim index j holds crystal head-dim index perm[j].

    Interleaved pair i is dims (2i, 2i+1); rotate-half pair i is dims (i, i + r/2), both at
    frequency base**(-2i/r). Dims past rotary_dims pass through unrotated.
    """
    k, r = spec.head_dim, spec.rotary_dims
    if spec.rotary_pairing == "half":
        return np.arange(k)
    return np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2), np.arange(r, k)])


def folds(spec: model_lib.ModelSpec) -> dict:
    """The factors folded into HF weights: embedding, lm_head, and q (w_q and b_q)."""
    return dict(embedding=spec.embedding_multiplier, logits=spec.logit_multiplier,
                q=spec.attn_scale * math.sqrt(spec.head_dim))


# ----------------------------------------------------------------------------- config


def _arch(cfg) -> str:
    return ARCHITECTURES[cfg.model.norm]


def _check_expressible(spec: model_lib.ModelSpec):
    if spec.norm == "rmsnorm" and spec.rotary_dims != spec.head_dim:
        raise ConversionError(
            f"LlamaForCausalLM rotates every head dim; model.rotary_fraction "
            f"{spec.rotary_dims}/{spec.head_dim} cannot be expressed")
    if spec.norm == "layernorm":
        f = spec.rotary_dims / spec.head_dim
        if int(spec.head_dim * f) != spec.rotary_dims:
            raise ConversionError(f"partial_rotary_factor {f!r} x head_dim {spec.head_dim} "
                                  f"does not give {spec.rotary_dims} rotary dims in HF")


def hf_config(cfg):
    """The transformers config of the HF class that computes what crystal computes."""
    import transformers

    spec = model_lib.ModelSpec.from_config(cfg)
    _check_expressible(spec)
    m = cfg.model
    common = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.d_model,
        intermediate_size=spec.ffn_dim, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
        hidden_act="silu", max_position_embeddings=int(m.max_seq_len),
        initializer_range=float(m.init_std), tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, architectures=[_arch(cfg)], dtype="float32")
    rope = dict(rope_type="default", rope_theta=spec.rotary_base)
    if spec.norm == "rmsnorm":
        return transformers.LlamaConfig(
            **common, rms_norm_eps=spec.norm_eps, rope_parameters=rope, head_dim=spec.head_dim,
            attention_bias=spec.qkv_bias or spec.out_bias, mlp_bias=spec.ffn_bias)
    rope["partial_rotary_factor"] = spec.rotary_dims / spec.head_dim
    return transformers.StableLmConfig(
        **common, layer_norm_eps=spec.norm_eps, rope_parameters=rope,
        use_qkv_bias=spec.qkv_bias, qk_layernorm=False, use_parallel_residual=False)


# ----------------------------------------------------------------------------- crystal -> HF


def _f32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def to_hf(params, cfg):
    """(hf_config, {HF name: float32 numpy array}) computing the same logits as crystal."""
    spec = model_lib.ModelSpec.from_config(cfg)
    hcfg = hf_config(cfg)
    fold, perm = folds(spec), rotary_perm(spec)
    D, H, K = spec.d_model, spec.num_heads, spec.head_dim
    stable = spec.norm == "layernorm"
    attn_bias = (spec.qkv_bias or spec.out_bias) and not stable
    sd = {}

    def norm(prefix, p):
        sd[f"{prefix}.weight"] = _f32(p["scale"])
        if stable:  # nn.LayerNorm always has a bias; zero when crystal has none
            sd[f"{prefix}.bias"] = _f32(p["bias"]) if spec.norm_bias else np.zeros(D, np.float32)

    def refuse_nonzero(where, x):
        if np.any(np.asarray(x) != 0):
            raise ConversionError(f"StableLmForCausalLM has no {where} bias; this model's "
                                  f"is non-zero (max |b| {float(np.abs(x).max()):.3g})")

    for i, lp in enumerate(split_layers(params)):
        a, mlp, pre = lp["attn"], lp["mlp"], f"model.layers.{i}"
        for n in ("q", "k", "v"):
            w_DxHxK = np.asarray(a[f"w_{n}"], np.float32)
            b_HxK = np.asarray(a[f"b_{n}"], np.float32) if spec.qkv_bias else None
            if n in ("q", "k"):
                w_DxHxK = w_DxHxK[:, :, perm]
                b_HxK = None if b_HxK is None else b_HxK[:, perm]
            if n == "q":
                w_DxHxK = w_DxHxK * fold["q"]
                b_HxK = None if b_HxK is None else b_HxK * fold["q"]
            sd[f"{pre}.self_attn.{n}_proj.weight"] = _f32(w_DxHxK.reshape(D, H * K).T)
            if spec.qkv_bias:
                sd[f"{pre}.self_attn.{n}_proj.bias"] = _f32(b_HxK.reshape(H * K))
            elif attn_bias:
                sd[f"{pre}.self_attn.{n}_proj.bias"] = np.zeros(H * K, np.float32)
        sd[f"{pre}.self_attn.o_proj.weight"] = _f32(np.asarray(a["w_o"]).reshape(H * K, D).T)
        if spec.out_bias:
            if stable:
                refuse_nonzero("attention-output (o_proj)", a["b_o"])
            else:
                sd[f"{pre}.self_attn.o_proj.bias"] = _f32(a["b_o"])
        elif attn_bias:
            sd[f"{pre}.self_attn.o_proj.bias"] = np.zeros(D, np.float32)
        for n, hf_n in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            sd[f"{pre}.mlp.{hf_n}.weight"] = _f32(np.asarray(mlp[f"w_{n}"]).T)
            if spec.ffn_bias:
                if stable:
                    refuse_nonzero(f"FFN ({hf_n})", mlp[f"b_{n}"])
                else:
                    sd[f"{pre}.mlp.{hf_n}.bias"] = _f32(mlp[f"b_{n}"])
        norm(f"{pre}.input_layernorm", lp["attn_norm"])
        norm(f"{pre}.post_attention_layernorm", lp["mlp_norm"])
    norm("model.norm", params["final_norm"])
    emb_VxD = np.asarray(params["embedding"], np.float32)
    head_DxV = emb_VxD.T if spec.tie_embeddings else np.asarray(params["lm_head"], np.float32)
    sd["model.embed_tokens.weight"] = _f32(emb_VxD * fold["embedding"])
    sd["lm_head.weight"] = _f32(head_DxV.T * fold["logits"])
    return hcfg, sd


# ----------------------------------------------------------------------------- HF -> crystal


def from_hf(state_dict, cfg) -> dict:
    """Crystal params (numpy float32, the layout cfg.model.scan_layers asks for) from an HF
    state dict of the class `hf_config(cfg)` describes; refuses what crystal cannot hold."""
    spec = model_lib.ModelSpec.from_config(cfg)
    _check_expressible(spec)
    fold, perm = folds(spec), rotary_perm(spec)
    inv = np.argsort(perm)
    D, H, K = spec.d_model, spec.num_heads, spec.head_dim
    sd = {k: np.asarray(_numpy(v), np.float32) for k, v in state_dict.items()}
    used = set()

    def get(name, shape):
        if name not in sd:
            raise ConversionError(f"HF state dict: missing {name}")
        x = sd[name]
        if x.shape != tuple(shape):
            raise ConversionError(f"HF state dict: {name} has shape {x.shape}, "
                                  f"expected {tuple(shape)} for this config")
        used.add(name)
        return x

    def bias(name, shape, keep: bool, why: str):
        """A bias crystal keeps, or one it lacks (then it must be absent or zero)."""
        if keep:
            return get(name, shape)
        if name in sd:
            used.add(name)
            if np.any(sd[name] != 0):
                raise ConversionError(f"HF state dict: {name} is non-zero but this config "
                                      f"has {why}")
        return None

    def norm(prefix):
        p = {"scale": get(f"{prefix}.weight", (D,))}
        b = bias(f"{prefix}.bias", (D,), spec.norm_bias, "model.norm_bias=False")
        if b is not None:
            p["bias"] = b
        return p

    layers = []
    for i in range(spec.num_layers):
        pre = f"model.layers.{i}"
        attn = {}
        for n in ("q", "k", "v"):
            w = get(f"{pre}.self_attn.{n}_proj.weight", (H * K, D)).T.reshape(D, H, K)
            b = bias(f"{pre}.self_attn.{n}_proj.bias", (H * K,), spec.qkv_bias,
                     "model.qkv_bias=False")
            b = None if b is None else b.reshape(H, K)
            if n == "q":
                w = w / fold["q"]
                b = None if b is None else b / fold["q"]
            if n in ("q", "k"):
                w = w[:, :, inv]
                b = None if b is None else b[:, inv]
            attn[f"w_{n}"] = w
            if b is not None:
                attn[f"b_{n}"] = b
        attn["w_o"] = get(f"{pre}.self_attn.o_proj.weight", (D, H * K)).T.reshape(H, K, D)
        b = bias(f"{pre}.self_attn.o_proj.bias", (D,), spec.out_bias and spec.norm == "rmsnorm",
                 "no attention-output bias")
        if spec.out_bias:
            attn["b_o"] = b if b is not None else np.zeros(D, np.float32)
        mlp = {}
        for n, hf_n, (fi, fo) in (("gate", "gate_proj", (D, spec.ffn_dim)),
                                  ("up", "up_proj", (D, spec.ffn_dim)),
                                  ("down", "down_proj", (spec.ffn_dim, D))):
            mlp[f"w_{n}"] = get(f"{pre}.mlp.{hf_n}.weight", (fo, fi)).T
            b = bias(f"{pre}.mlp.{hf_n}.bias", (fo,), spec.ffn_bias and spec.norm == "rmsnorm",
                     "no FFN bias")
            if spec.ffn_bias:
                mlp[f"b_{n}"] = b if b is not None else np.zeros(fo, np.float32)
        layers.append({"attn": attn, "attn_norm": norm(f"{pre}.input_layernorm"),
                       "mlp": mlp, "mlp_norm": norm(f"{pre}.post_attention_layernorm")})

    params = {"final_norm": norm("model.norm")}
    V = spec.vocab_size
    embed = get("model.embed_tokens.weight", (V, D))
    head = get("lm_head.weight", (V, D)) if "lm_head.weight" in sd else embed
    emb_VxD = embed / fold["embedding"]
    head_VxD = head / fold["logits"]
    if spec.tie_embeddings:
        err = float(np.abs(emb_VxD - head_VxD).max())
        scale = float(np.abs(emb_VxD).max()) or 1.0
        if err > TIE_RTOL * scale:
            raise ConversionError(
                "HF embed_tokens / embedding_multiplier and lm_head / logit_multiplier differ "
                f"(max |diff| {err:.3g} vs max |E| {scale:.3g}); this config ties them "
                "(model.tie_embeddings=True)")
        params["embedding"] = emb_VxD
    else:
        params["embedding"] = emb_VxD
        params["lm_head"] = np.ascontiguousarray(head_VxD.T)
    leftover = sorted(set(sd) - used)
    if leftover:
        raise ConversionError(f"HF state dict: {len(leftover)} tensors this config has no "
                              f"place for, e.g. {leftover[0]}")
    params.update(join_layers(layers, spec.scan_layers))
    return _tree_map(_f32, params)


def _numpy(x):
    if hasattr(x, "detach"):  # torch tensor
        return x.detach().cpu().float().numpy()
    return x


# ----------------------------------------------------------------------------- files


def save_pretrained(params, cfg, out_dir, overwrite: bool = False) -> Path:
    """Writes config.json + model.safetensors (+ the crystal config) loadable by
    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)`; atomic by rename."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"{out}: exists and is not empty (pass overwrite=True)")
    hcfg, sd = to_hf(params, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        hcfg.save_pretrained(tmp)
        save_file(sd, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CRYSTAL_CONFIG_FILE).write_text(json.dumps(config_lib.to_json_dict(cfg),
                                                          indent=2, sort_keys=True))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# HF config field -> what it must equal for cfg (checked on load).
def _expected_fields(cfg) -> dict:
    h = hf_config(cfg)
    keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads"]
    keys += ["rms_norm_eps"] if cfg.model.norm == "rmsnorm" else ["layer_norm_eps",
                                                                   "use_qkv_bias"]
    out = {k: getattr(h, k) for k in keys}
    out["rope_parameters.rope_theta"] = h.rope_parameters["rope_theta"]
    if cfg.model.norm == "layernorm":
        out["rope_parameters.partial_rotary_factor"] = h.rope_parameters["partial_rotary_factor"]
    return out


def load_pretrained(path, cfg) -> dict:
    """Crystal params from a HF folder (config.json + model.safetensors) for `cfg`; the HF
    config must describe the same architecture, field by field."""
    from safetensors.numpy import load_file

    path = Path(path)
    cfile, wfile = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfile, wfile):
        if not f.is_file():
            raise ConversionError(f"{f}: not found")
    try:
        hc = json.loads(cfile.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfile}: line {e.lineno}: not JSON ({e.msg})") from e
    arch = (hc.get("architectures") or ["?"])[0]
    if arch != _arch(cfg):
        raise ConversionError(f"{cfile}: architectures {arch!r}, but model.norm="
                              f"{cfg.model.norm!r} converts to {_arch(cfg)!r}")
    for key, want in _expected_fields(cfg).items():
        got = hc
        for part in key.split("."):
            got = got.get(part) if isinstance(got, dict) else None
        if key == "rope_parameters.rope_theta" and got is None:
            got = hc.get("rope_theta")
        ok = (math.isclose(got, want, rel_tol=1e-9) if isinstance(want, float)
              and isinstance(got, (int, float)) else got == want)
        if not ok:
            raise ConversionError(f"{cfile}: field {key} is {got!r}, config expects {want!r}")
    return from_hf(load_file(str(wfile)), cfg)
