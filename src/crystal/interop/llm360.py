"""The `llm360` layout: LLM360's published CrystalCoder checkpoints, tensor for tensor.

LLM360 released CrystalCoder for their own `CrystalCoderLMHeadModel` (trust_remote_code;
shared/reference/llm360.md): GPT-2 tensor names, Conv1D weights stored (in, out) and computing
x @ W + b, q|k|v concatenated along the output axis of `attn.c_attn`, SwiGLU as
c_fc(x) * silu(c_fc2(x)), GPT-J (rotate-every-two) RoPE on the first `rotary_dim` dims at
base 10000, and muP as config fields (embeddings x mup_embeddings_scale, logits x
mup_output_alpha x mup_width_scale, scores / head_dim when mup_scale_qk_dot_by_d).

Conv1D's orientation is crystal's (x @ W), so every tensor is crystal's numbers reshaped or
concatenated: the round trip is bitwise. A crystal model without some bias writes zeros
where Conv1D / LayerNorm have one (and reading back requires them to be zero); a rotate-half
model is permuted to GPT-J pairs (exact). RMSNorm models are refused (use `llama`).
"""

from __future__ import annotations

import numpy as np

from crystal import model as model_lib
from crystal import mup as mup_lib
from crystal.errors import ConversionError
from crystal.interop.layouts import (Layout, Tensors, assemble, f32, layer_params, pair_perm,
                                     positive_int, require)

# The trust_remote_code entry points of LLM360's release (their config.json, literally).
AUTO_MAP = {
    "AutoConfig": "configuration_crystalcoder.CrystalCoderConfig",
    "AutoModel": "modeling_crystalcoder.CrystalCoderModel",
    "AutoModelForCausalLM": "modeling_crystalcoder.CrystalCoderLMHeadModel",
}
ROPE_BASE = 10000.0   # LLM360's RotaryPositionEmbeddingHelper has no base field


def perm(spec: model_lib.ModelSpec) -> np.ndarray:
    """LLM360 head-dim index j holds crystal index perm[j] (LLM360 is GPT-J interleaved)."""
    return pair_perm(spec.head_dim, spec.rotary_dims, spec.rotary_pairing, "interleaved")


class LLM360Layout(Layout):
    name, architecture, model_type = "llm360", "CrystalCoderLMHeadModel", "crystalcoder"
    checked_fields = ("vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions",
                      "layer_norm_epsilon", "activation_function", "position_embedding_type",
                      "rotary_dim", "mup_embeddings_scale", "mup_output_alpha",
                      "mup_width_scale", "mup_scale_qk_dot_by_d", "scale_attn_weights",
                      "tie_word_embeddings")

    def holds(self, spec) -> None:
        if spec.norm != "layernorm":
            raise ConversionError(f"the llm360 layout ({self.architecture}) has LayerNorm; "
                                  f"this model has {spec.norm} (model.norm): use "
                                  "--layout=llama")
        if spec.rotary_base != ROPE_BASE:
            raise ConversionError(f"LLM360's CrystalCoder code fixes the RoPE base at "
                                  f"{ROPE_BASE:g}; model.rotary_base is {spec.rotary_base:g}")

    def exact(self, spec) -> bool:
        return True

    def config_json(self, cfg) -> dict:
        spec = model_lib.ModelSpec.from_config(cfg)
        self.holds(spec)
        r = mup_lib.rules(cfg)
        hc = dict(
            activation_function="swiglu", architectures=[self.architecture], attn_pdrop=0.0,
            auto_map=dict(AUTO_MAP), bos_token_id=1, embd_pdrop=0.0, eos_token_id=2,
            initializer_range=float(cfg.model.init_std), layer_norm_epsilon=spec.norm_eps,
            model_type=self.model_type, mup_embeddings_scale=spec.embedding_multiplier,
            mup_output_alpha=float(cfg.mup.output_alpha) if r.enabled else 1.0,
            mup_scale_qk_dot_by_d=r.attn_scale_power == 1.0, mup_width_scale=r.width_scale,
            n_embd=spec.d_model, n_head=spec.num_heads, n_inner=spec.ffn_dim,
            n_layer=spec.num_layers, n_positions=int(cfg.model.max_seq_len),
            position_embedding_type="rotary", reorder_and_upcast_attn=False, resid_pdrop=0.0,
            rotary_dim=spec.rotary_dims, scale_attn_by_inverse_layer_idx=False,
            scale_attn_weights=True, tie_word_embeddings=spec.tie_embeddings,
            torch_dtype="float32", use_cache=True, vocab_size=spec.vocab_size)
        return hc

    def model_fields(self, hc: dict, where: str) -> dict:
        D, H = (positive_int(hc, k, where) for k in ("n_embd", "n_head"))
        require(hc, "activation_function", ("swiglu",), where)
        require(hc, "position_embedding_type", ("rotary",), where)
        require(hc, "scale_attn_weights", (True,), where)
        if hc.get("scale_attn_by_inverse_layer_idx"):
            raise ConversionError(f"{where}: field scale_attn_by_inverse_layer_idx is true; "
                                  "crystal scales every layer's scores alike")
        rot = hc.get("rotary_dim") or D // H
        scale, by_d = float(hc.get("mup_width_scale", 1.0)), hc.get("mup_scale_qk_dot_by_d")
        emb, alpha = (float(hc.get(k, 1.0)) for k in ("mup_embeddings_scale",
                                                       "mup_output_alpha"))
        m = {"model.vocab_size": positive_int(hc, "vocab_size", where), "model.d_model": D,
             "model.num_layers": positive_int(hc, "n_layer", where), "model.num_heads": H,
             "model.ffn_dim": int(hc.get("n_inner") or 4 * D),
             "model.max_seq_len": positive_int(hc, "n_positions", where),
             "model.norm": "layernorm",
             "model.norm_eps": float(hc.get("layer_norm_epsilon", 1e-5)),
             "model.norm_bias": True, "model.qkv_bias": True, "model.out_bias": True,
             "model.ffn_bias": True, "model.rotary_fraction": rot / (D // H),
             "model.rotary_base": ROPE_BASE, "model.rotary_pairing": "interleaved",
             "model.tie_embeddings": bool(hc.get("tie_word_embeddings", True)),
             "model.init_std": float(hc.get("initializer_range", 0.02)),
             "mup.enabled": bool(by_d)}
        if not by_d:
            if (scale, emb, alpha) != (1.0, 1.0, 1.0):
                raise ConversionError(
                    f"{where}: mup_scale_qk_dot_by_d is false but mup_width_scale "
                    f"{scale:g} / mup_embeddings_scale {emb:g} / mup_output_alpha {alpha:g} "
                    "are not 1: crystal's muP scales scores by 1/head_dim")
            return m
        base = round(D * scale)
        if base <= 0 or abs(base / D - scale) > 1e-9 * scale:
            raise ConversionError(f"{where}: field mup_width_scale {scale!r} x n_embd {D} is "
                                  "not an integer base width")
        m.update({"mup.base_width": base, "mup.embedding_multiplier": emb,
                  "mup.output_alpha": alpha})
        return m

    # ----------------------------------------------------------------- tensors

    def to_tensors(self, params, cfg) -> dict[str, np.ndarray]:
        spec = model_lib.ModelSpec.from_config(cfg)
        self.holds(spec)
        D, F, p = spec.d_model, spec.ffn_dim, perm(spec)
        zeros = np.zeros
        emb_VxD = f32(params["embedding"])
        sd = {"transformer.wte.weight": emb_VxD}
        for i, lp in enumerate(layer_params(params)):
            pre, a, mlp = f"transformer.h.{i}", lp["attn"], lp["mlp"]
            self._norm_to(sd, f"{pre}.ln_1", lp["attn_norm"], spec)
            w, b = [], []
            for n in ("q", "k", "v"):
                w_DxHxK = np.asarray(a[f"w_{n}"], np.float32)
                b_HxK = (np.asarray(a[f"b_{n}"], np.float32) if spec.qkv_bias
                         else zeros(w_DxHxK.shape[1:], np.float32))
                if n != "v":
                    w_DxHxK, b_HxK = w_DxHxK[:, :, p], b_HxK[:, p]
                w.append(w_DxHxK.reshape(D, -1))
                b.append(b_HxK.reshape(-1))
            sd[f"{pre}.attn.c_attn.weight"] = f32(np.concatenate(w, axis=1))
            sd[f"{pre}.attn.c_attn.bias"] = f32(np.concatenate(b))
            sd[f"{pre}.attn.c_proj.weight"] = f32(np.asarray(a["w_o"]).reshape(-1, D))
            sd[f"{pre}.attn.c_proj.bias"] = f32(a["b_o"]) if spec.out_bias else zeros(
                D, np.float32)
            self._norm_to(sd, f"{pre}.ln_2", lp["mlp_norm"], spec)
            for n, name, size in (("up", "c_fc", F), ("gate", "c_fc2", F),
                                  ("down", "c_proj", D)):
                sd[f"{pre}.mlp.{name}.weight"] = f32(mlp[f"w_{n}"])
                sd[f"{pre}.mlp.{name}.bias"] = f32(mlp[f"b_{n}"]) if spec.ffn_bias else zeros(
                    size, np.float32)
        self._norm_to(sd, "transformer.ln_f", params["final_norm"], spec)
        # LLM360's files carry lm_head.weight, a copy of wte when tied.
        sd["lm_head.weight"] = emb_VxD.copy() if spec.tie_embeddings else f32(
            np.asarray(params["lm_head"]).T)
        return sd

    @staticmethod
    def _norm_to(sd, prefix, p, spec):
        sd[f"{prefix}.weight"] = f32(p["scale"])
        sd[f"{prefix}.bias"] = f32(p["bias"]) if spec.norm_bias else np.zeros(
            spec.d_model, np.float32)

    def from_tensors(self, t: Tensors, cfg) -> dict:
        spec = model_lib.ModelSpec.from_config(cfg)
        V, D = spec.vocab_size, spec.d_model
        layers = [self._layer_from(t, f"transformer.h.{i}", spec)
                  for i in range(spec.num_layers)]
        emb_VxD = t.take("transformer.wte.weight", (V, D))
        top = {"embedding": emb_VxD, "final_norm": self._norm_from(t, "transformer.ln_f", spec)}
        if spec.tie_embeddings:
            if "lm_head.weight" in t and np.any(t.take("lm_head.weight", (V, D)) != emb_VxD):
                raise ConversionError(f"{t.where}: lm_head.weight differs from "
                                      "transformer.wte.weight, but tie_word_embeddings is true")
        else:
            top["lm_head"] = np.ascontiguousarray(t.take("lm_head.weight", (V, D)).T)
        return assemble(cfg, layers, top)

    @staticmethod
    def _norm_from(t: Tensors, prefix, spec):
        p = {"scale": t.take(f"{prefix}.weight", (spec.d_model,))}
        b = t.bias(f"{prefix}.bias", (spec.d_model,), spec.norm_bias, "model.norm_bias=False")
        if b is not None:
            p["bias"] = b
        return p

    def _layer_from(self, t: Tensors, pre, spec):
        D, H, K, F = spec.d_model, spec.num_heads, spec.head_dim, spec.ffn_dim
        inv = np.argsort(perm(spec))
        w = t.take(f"{pre}.attn.c_attn.weight", (D, 3 * H * K))
        b = t.bias(f"{pre}.attn.c_attn.bias", (3 * H * K,), spec.qkv_bias,
                   "model.qkv_bias=False")
        attn = {}
        for j, n in enumerate(("q", "k", "v")):
            w_DxHxK = w[:, j * H * K:(j + 1) * H * K].reshape(D, H, K)
            b_HxK = None if b is None else b[j * H * K:(j + 1) * H * K].reshape(H, K)
            if n != "v":
                w_DxHxK = w_DxHxK[:, :, inv]
                b_HxK = None if b_HxK is None else b_HxK[:, inv]
            attn[f"w_{n}"] = w_DxHxK
            if b_HxK is not None:
                attn[f"b_{n}"] = b_HxK
        attn["w_o"] = t.take(f"{pre}.attn.c_proj.weight", (H * K, D)).reshape(H, K, D)
        b_o = t.bias(f"{pre}.attn.c_proj.bias", (D,), spec.out_bias, "model.out_bias=False")
        if b_o is not None:
            attn["b_o"] = b_o
        mlp = {}
        for n, name, shape in (("up", "c_fc", (D, F)), ("gate", "c_fc2", (D, F)),
                               ("down", "c_proj", (F, D))):
            mlp[f"w_{n}"] = t.take(f"{pre}.mlp.{name}.weight", shape)
            bias = t.bias(f"{pre}.mlp.{name}.bias", shape[1:], spec.ffn_bias,
                          "model.ffn_bias=False")
            if bias is not None:
                mlp[f"b_{n}"] = bias
        return {"attn": attn, "attn_norm": self._norm_from(t, f"{pre}.ln_1", spec), "mlp": mlp,
                "mlp_norm": self._norm_from(t, f"{pre}.ln_2", spec)}


LLM360 = LLM360Layout()
