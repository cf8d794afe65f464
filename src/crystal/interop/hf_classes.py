"""The `llama` and `stablelm` layouts: transformers' own classes, muP folded into weights.

Why: transformers is the independent reference for the forward pass and what most tools
load. The RMSNorm variant (Amber) maps to `LlamaForCausalLM`, the LayerNorm variant to
`StableLmForCausalLM`. Neither class has muP knobs, so the multipliers are folded in:

- embed_tokens = embedding x embedding_multiplier;
- lm_head = head x logit_multiplier (a tied crystal embedding becomes two untied tensors,
  `tie_word_embeddings=False`);
- transformers scales attention scores by head_dim**-0.5; crystal's scale (head_dim**-1
  under muP) is reached by multiplying w_q and b_q by attn_scale x sqrt(head_dim);
- interleaved (GPT-J) rotary pairs are permuted to rotate-half on q and k (exact).

Under SP every fold is exactly 1 and the round trip is bitwise; under muP a multiply then
divide in float32 can move a weight by 1 ulp (use the `llm360` layout for those). Refused
with a ConversionError: partial RoPE in Llama; non-zero attention-output or FFN biases in
StableLm (naming the `llm360` layout, which holds them).
"""

from __future__ import annotations

import math

import numpy as np

from crystal import model as model_lib
from crystal.errors import ConversionError
from crystal.interop.layouts import (Layout, Tensors, assemble, f32, layer_params, pair_perm,
                                     positive_int, require)

# Relative tolerance when checking that embed_tokens and lm_head are one tied tensor (they
# are folded by different multipliers).
TIE_RTOL = 1e-5


def folds(spec: model_lib.ModelSpec) -> dict:
    """The factors folded into HF weights: embedding, lm_head, and q (w_q and b_q); all
    exactly 1.0 under SP."""
    sp_scale = spec.head_dim ** -0.5
    q = 1.0 if spec.attn_scale == sp_scale else spec.attn_scale * math.sqrt(spec.head_dim)
    return dict(embedding=spec.embedding_multiplier, logits=spec.logit_multiplier, q=q)


def rotary_perm(spec: model_lib.ModelSpec) -> np.ndarray:
    """HF head-dim index j holds crystal head-dim index perm[j] (HF is rotate-half)."""
    return pair_perm(spec.head_dim, spec.rotary_dims, spec.rotary_pairing, "half")


def normalised(hc: dict) -> dict:
    """config.json with the RoPE fields at top level whichever transformers wrote it (v4:
    rope_theta / partial_rotary_factor; v5: rope_parameters)."""
    rp = hc.get("rope_parameters") or {}
    out = dict(hc)
    for k in ("rope_theta", "partial_rotary_factor"):
        if out.get(k) is None and k in rp:
            out[k] = rp[k]
    out.setdefault("rope_type", rp.get("rope_type", "default"))
    return out


class _HFClass(Layout):
    """What Llama and StableLm share; `stable` picks StableLm's naming and limits."""
    stable = False
    norm = "rmsnorm"
    checked_fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "rope_theta")

    # ----------------------------------------------------------------- what it holds

    def holds(self, spec) -> None:
        if spec.norm != self.norm:
            other = "llama" if spec.norm == "rmsnorm" else "llm360"
            raise ConversionError(f"the {self.name} layout ({self.architecture}) has "
                                  f"{self.norm}; this model has {spec.norm} (model.norm): "
                                  f"use --layout={other}")
        if not self.stable and spec.rotary_dims != spec.head_dim:
            raise ConversionError(
                f"{self.architecture} rotates every head dim; model.rotary_fraction "
                f"{spec.rotary_dims}/{spec.head_dim} cannot be expressed")
        if self.stable:
            f = spec.rotary_dims / spec.head_dim
            if int(spec.head_dim * f) != spec.rotary_dims:
                raise ConversionError(f"partial_rotary_factor {f!r} x head_dim "
                                      f"{spec.head_dim} does not give {spec.rotary_dims} "
                                      "rotary dims in transformers")

    def exact(self, spec) -> bool:
        return all(v == 1.0 for v in folds(spec).values())

    # ----------------------------------------------------------------- config.json

    def config_json(self, cfg) -> dict:
        spec = model_lib.ModelSpec.from_config(cfg)
        self.holds(spec)
        rope = dict(rope_type="default", rope_theta=spec.rotary_base)
        hc = dict(
            architectures=[self.architecture], model_type=self.model_type,
            vocab_size=spec.vocab_size, hidden_size=spec.d_model,
            intermediate_size=spec.ffn_dim, num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
            hidden_act="silu", max_position_embeddings=int(cfg.model.max_seq_len),
            initializer_range=float(cfg.model.init_std), tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, rope_theta=spec.rotary_base, dtype="float32")
        if self.stable:
            rope["partial_rotary_factor"] = spec.rotary_dims / spec.head_dim
            hc.update(layer_norm_eps=spec.norm_eps, use_qkv_bias=spec.qkv_bias,
                      qk_layernorm=False, use_parallel_residual=False,
                      partial_rotary_factor=rope["partial_rotary_factor"])
        else:
            hc.update(head_dim=spec.head_dim, rms_norm_eps=spec.norm_eps,
                      attention_bias=spec.qkv_bias or spec.out_bias, mlp_bias=spec.ffn_bias)
        hc["rope_parameters"] = rope
        return dict(sorted(hc.items()))

    def check_config(self, hc: dict, cfg, where: str) -> None:
        super().check_config(normalised(hc), cfg, where)

    def model_fields(self, hc: dict, where: str) -> dict:
        hc = normalised(hc)
        D, H = (positive_int(hc, k, where) for k in ("hidden_size", "num_attention_heads"))
        if hc.get("num_key_value_heads", H) != H:
            raise ConversionError(f"{where}: field num_key_value_heads is "
                                  f"{hc['num_key_value_heads']}; crystal has no grouped-query "
                                  f"attention (num_attention_heads {H})")
        if hc.get("head_dim", D // H) != D // H:
            raise ConversionError(f"{where}: field head_dim is {hc['head_dim']}, not "
                                  f"hidden_size / num_attention_heads = {D // H}")
        require(hc, "hidden_act", ("silu",), where)
        require(hc, "rope_type", ("default",), where)
        if hc.get("rope_scaling"):
            raise ConversionError(f"{where}: field rope_scaling is {hc['rope_scaling']!r}; "
                                  "crystal has plain RoPE")
        m = {"model.vocab_size": positive_int(hc, "vocab_size", where), "model.d_model": D,
             "model.num_layers": positive_int(hc, "num_hidden_layers", where),
             "model.num_heads": H,
             "model.ffn_dim": positive_int(hc, "intermediate_size", where),
             "model.max_seq_len": positive_int(hc, "max_position_embeddings", where),
             "model.norm": self.norm, "model.rotary_base": float(hc.get("rope_theta", 1e4)),
             "model.rotary_pairing": "half",
             "model.tie_embeddings": bool(hc.get("tie_word_embeddings", False)),
             "model.init_std": float(hc.get("initializer_range", 0.02)),
             "mup.enabled": False}
        if self.stable:
            m.update({"model.norm_eps": float(hc.get("layer_norm_eps", 1e-5)),
                      "model.norm_bias": True, "model.qkv_bias": bool(hc.get("use_qkv_bias")),
                      "model.out_bias": False, "model.ffn_bias": False,
                      "model.rotary_fraction": float(hc.get("partial_rotary_factor", 0.25))})
            if hc.get("qk_layernorm") or hc.get("use_parallel_residual"):
                raise ConversionError(f"{where}: qk_layernorm / use_parallel_residual are "
                                      "not crystal's block")
        else:
            bias = bool(hc.get("attention_bias", False))
            m.update({"model.norm_eps": float(hc.get("rms_norm_eps", 1e-6)),
                      "model.norm_bias": False, "model.qkv_bias": bias,
                      "model.out_bias": bias, "model.ffn_bias": bool(hc.get("mlp_bias")),
                      "model.rotary_fraction": 1.0})
        return m

    # ----------------------------------------------------------------- tensors

    def to_tensors(self, params, cfg) -> dict[str, np.ndarray]:
        spec = model_lib.ModelSpec.from_config(cfg)
        self.holds(spec)
        fold, perm = folds(spec), rotary_perm(spec)
        sd = {}
        emb_VxD = np.asarray(params["embedding"], np.float32)
        sd["model.embed_tokens.weight"] = f32(emb_VxD * fold["embedding"])
        for i, lp in enumerate(layer_params(params)):
            self._layer_to(sd, f"model.layers.{i}", i, lp, spec, fold, perm)
        self._norm_to(sd, "model.norm", params["final_norm"], spec)
        head_DxV = emb_VxD.T if spec.tie_embeddings else np.asarray(params["lm_head"],
                                                                     np.float32)
        sd["lm_head.weight"] = f32(head_DxV.T * fold["logits"])
        return sd

    def _norm_to(self, sd, prefix, p, spec):
        sd[f"{prefix}.weight"] = f32(p["scale"])
        if self.stable:  # nn.LayerNorm always has a bias: zero when crystal has none
            sd[f"{prefix}.bias"] = f32(p["bias"]) if spec.norm_bias else np.zeros(
                spec.d_model, np.float32)

    def _refuse_nonzero(self, what: str, i: int, b):
        if np.any(np.asarray(b) != 0):
            raise ConversionError(
                f"{self.architecture} has no {what} bias; layer {i}'s is non-zero (max |b| "
                f"{float(np.abs(b).max()):.3g}): use --layout=llm360, which holds it")

    def _layer_to(self, sd, pre, i, lp, spec, fold, perm):
        a, mlp = lp["attn"], lp["mlp"]
        D, H, K = spec.d_model, spec.num_heads, spec.head_dim
        attn_bias = (spec.qkv_bias or spec.out_bias) and not self.stable
        for n in ("q", "k", "v"):
            w_DxHxK = np.asarray(a[f"w_{n}"], np.float32)
            b_HxK = np.asarray(a[f"b_{n}"], np.float32) if spec.qkv_bias else None
            if n in ("q", "k"):
                w_DxHxK = w_DxHxK[:, :, perm]
                b_HxK = None if b_HxK is None else b_HxK[:, perm]
            if n == "q":
                w_DxHxK = w_DxHxK * fold["q"]
                b_HxK = None if b_HxK is None else b_HxK * fold["q"]
            sd[f"{pre}.self_attn.{n}_proj.weight"] = f32(w_DxHxK.reshape(D, H * K).T)
            if spec.qkv_bias:
                sd[f"{pre}.self_attn.{n}_proj.bias"] = f32(b_HxK.reshape(H * K))
            elif attn_bias:
                sd[f"{pre}.self_attn.{n}_proj.bias"] = np.zeros(H * K, np.float32)
        sd[f"{pre}.self_attn.o_proj.weight"] = f32(np.asarray(a["w_o"]).reshape(H * K, D).T)
        if spec.out_bias and self.stable:
            self._refuse_nonzero("attention-output (o_proj)", i, a["b_o"])
        elif spec.out_bias or attn_bias:
            sd[f"{pre}.self_attn.o_proj.bias"] = (f32(a["b_o"]) if spec.out_bias
                                                  else np.zeros(D, np.float32))
        for n, hf_n in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            sd[f"{pre}.mlp.{hf_n}.weight"] = f32(np.asarray(mlp[f"w_{n}"]).T)
            if spec.ffn_bias and self.stable:
                self._refuse_nonzero(f"FFN ({hf_n})", i, mlp[f"b_{n}"])
            elif spec.ffn_bias:
                sd[f"{pre}.mlp.{hf_n}.bias"] = f32(mlp[f"b_{n}"])
        self._norm_to(sd, f"{pre}.input_layernorm", lp["attn_norm"], spec)
        self._norm_to(sd, f"{pre}.post_attention_layernorm", lp["mlp_norm"], spec)

    def from_tensors(self, t: Tensors, cfg) -> dict:
        spec = model_lib.ModelSpec.from_config(cfg)
        fold, inv = folds(spec), np.argsort(rotary_perm(spec))
        layers = [self._layer_from(t, f"model.layers.{i}", spec, fold, inv)
                  for i in range(spec.num_layers)]
        V, D = spec.vocab_size, spec.d_model
        embed = t.take("model.embed_tokens.weight", (V, D))
        head = t.take("lm_head.weight", (V, D)) if "lm_head.weight" in t else embed
        emb_VxD, head_VxD = embed / fold["embedding"], head / fold["logits"]
        top = {"final_norm": self._norm_from(t, "model.norm", spec), "embedding": emb_VxD}
        if spec.tie_embeddings:
            err = float(np.abs(emb_VxD - head_VxD).max())
            scale = float(np.abs(emb_VxD).max()) or 1.0
            if err > TIE_RTOL * scale:
                raise ConversionError(
                    f"{t.where}: embed_tokens / embedding_multiplier and lm_head / "
                    f"logit_multiplier differ (max |diff| {err:.3g} vs max |E| "
                    f"{scale:.3g}); this config ties them (model.tie_embeddings=True)")
        else:
            top["lm_head"] = np.ascontiguousarray(head_VxD.T)
        return assemble(cfg, layers, top)

    def _norm_from(self, t: Tensors, prefix, spec):
        p = {"scale": t.take(f"{prefix}.weight", (spec.d_model,))}
        b = t.bias(f"{prefix}.bias", (spec.d_model,), spec.norm_bias, "model.norm_bias=False")
        if b is not None:
            p["bias"] = b
        return p

    def _layer_from(self, t: Tensors, pre, spec, fold, inv):
        D, H, K, F = spec.d_model, spec.num_heads, spec.head_dim, spec.ffn_dim
        attn = {}
        for n in ("q", "k", "v"):
            w = t.take(f"{pre}.self_attn.{n}_proj.weight", (H * K, D)).T.reshape(D, H, K)
            b = t.bias(f"{pre}.self_attn.{n}_proj.bias", (H * K,), spec.qkv_bias,
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
        attn["w_o"] = t.take(f"{pre}.self_attn.o_proj.weight", (D, H * K)).T.reshape(H, K, D)
        b = t.bias(f"{pre}.self_attn.o_proj.bias", (D,), spec.out_bias and not self.stable,
                   "no attention-output bias")
        if spec.out_bias:
            attn["b_o"] = b if b is not None else np.zeros(D, np.float32)
        mlp = {}
        for n, hf_n, (fi, fo) in (("gate", "gate_proj", (D, F)), ("up", "up_proj", (D, F)),
                                  ("down", "down_proj", (F, D))):
            mlp[f"w_{n}"] = t.take(f"{pre}.mlp.{hf_n}.weight", (fo, fi)).T
            b = t.bias(f"{pre}.mlp.{hf_n}.bias", (fo,), spec.ffn_bias and not self.stable,
                       "no FFN bias")
            if spec.ffn_bias:
                mlp[f"b_{n}"] = b if b is not None else np.zeros(fo, np.float32)
        return {"attn": attn, "attn_norm": self._norm_from(t, f"{pre}.input_layernorm", spec),
                "mlp": mlp,
                "mlp_norm": self._norm_from(t, f"{pre}.post_attention_layernorm", spec)}


class Llama(_HFClass):
    name, architecture, model_type = "llama", "LlamaForCausalLM", "llama"
    checked_fields = _HFClass.checked_fields + ("rms_norm_eps",)


class StableLm(_HFClass):
    name, architecture, model_type = "stablelm", "StableLmForCausalLM", "stablelm"
    stable, norm = True, "layernorm"
    checked_fields = _HFClass.checked_fields + ("layer_norm_eps", "use_qkv_bias",
                                                "partial_rotary_factor")


LLAMA, STABLELM = Llama(), StableLm()
