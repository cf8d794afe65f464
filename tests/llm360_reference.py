"""An independent torch forward of LLM360's CrystalCoder layout, written from the published
facts (shared/reference/llm360.md), not from crystal and not from LLM360's code.

It reads what an exported folder holds, by name: config.json's fields and the GPT-2 style
tensors (Conv1D weights stored (in, out), computing x @ W + b; q|k|v concatenated along the
output axis of attn.c_attn; SwiGLU c_fc(x) * silu(c_fc2(x)); GPT-J rotate-every-two RoPE on
the first rotary_dim dims at base 10000; embeddings x mup_embeddings_scale; scores / head_dim
(mup_scale_qk_dot_by_d) or / sqrt(head_dim); logits x mup_output_alpha x mup_width_scale).
"""
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file


def read_folder(folder) -> tuple[dict, dict]:
    """(config.json, {name: tensor}) of an HF folder, sharded or not."""
    folder = Path(folder)
    hc = json.loads((folder / "config.json").read_text())
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
             if index.exists() else ["model.safetensors"])
    sd = {}
    for f in files:
        sd.update(load_file(str(folder / f)))
    return hc, sd


def _gptj_rope(x, rotary_dim):
    """x: B x T x H x K; rotates pairs (0,1), (2,3), ... of the first rotary_dim dims."""
    T = x.shape[1]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    ang = torch.arange(T).float()[:, None] * inv_freq[None, :]          # T x r/2
    sin = ang.sin().repeat_interleave(2, dim=-1)[None, :, None, :]      # (s0 s0 s1 s1 ..)
    cos = ang.cos().repeat_interleave(2, dim=-1)[None, :, None, :]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = rot[..., 0::2], rot[..., 1::2]
    every_two = torch.stack((-x2, x1), dim=-1).flatten(-2)             # (-x1, x0, -x3, x2..)
    return torch.cat([rot * cos + every_two * sin, rest], dim=-1)


def logits(hc: dict, sd: dict, tokens: np.ndarray) -> np.ndarray:
    """float32 logits B x T x V of an LLM360-layout checkpoint."""
    t = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in sd.items()}
    D, H, L = hc["n_embd"], hc["n_head"], hc["n_layer"]
    K = D // H
    r = hc.get("rotary_dim") or K
    eps = hc["layer_norm_epsilon"]
    ids = torch.from_numpy(np.asarray(tokens)).long()
    B, T = ids.shape

    def ln(x, p):
        return F.layer_norm(x, (D,), t[f"{p}.weight"], t[f"{p}.bias"], eps)

    def conv1d(x, p):
        return x @ t[f"{p}.weight"] + t[f"{p}.bias"]

    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    div = float(K) ** (1.0 if hc["mup_scale_qk_dot_by_d"] else 0.5)
    with torch.no_grad():
        x = t["transformer.wte.weight"][ids] * hc["mup_embeddings_scale"]
        for i in range(L):
            p = f"transformer.h.{i}"
            q, k, v = conv1d(ln(x, f"{p}.ln_1"), f"{p}.attn.c_attn").split(D, dim=-1)
            q, k, v = (z.reshape(B, T, H, K) for z in (q, k, v))
            q, k = _gptj_rope(q, r), _gptj_rope(k, r)
            s = torch.einsum("bqhk,bshk->bhqs", q, k) / div
            a = s.masked_fill(~causal, float("-inf")).softmax(-1)
            o = torch.einsum("bhqs,bshk->bqhk", a, v).reshape(B, T, D)
            x = x + conv1d(o, f"{p}.attn.c_proj")
            h = ln(x, f"{p}.ln_2")
            ff = conv1d(h, f"{p}.mlp.c_fc") * F.silu(conv1d(h, f"{p}.mlp.c_fc2"))
            x = x + conv1d(ff, f"{p}.mlp.c_proj")
        x = ln(x, "transformer.ln_f")
        head = t["transformer.wte.weight"] if hc["tie_word_embeddings"] else t["lm_head.weight"]
        out = x @ head.T * (hc["mup_output_alpha"] * hc["mup_width_scale"])
    return out.numpy()
