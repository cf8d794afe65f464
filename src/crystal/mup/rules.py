"""Width rules: the one place that derives every width-dependent number.

muP (Tensor Programs V) with Adam classes parameters by how many of their dims grow with
width. The model reads init stds and multipliers from here, the optimizer reads LR and
weight-decay multipliers from here; standard parametrization (SP) is the same code with
muP off (every multiplier 1, attention 1/sqrt(d_head), one init std).

Weight-decay rule (`optim.rule`): optax's decoupled decay is `lr * wd * p`, so scaling a
class's LR by m scales its decay by m too. 'mup' (microsoft/mup's MuAdamW) keeps `lr * wd`
fixed across widths instead: a class whose LR is multiplied by m gets weight decay divided
by m. 'cerebras' (Model Zoo 1.9.1, what LLM360 ran for CrystalCoder) leaves wd as it is, so
the hidden matrices decay m times weaker than the embedding.
"""

from __future__ import annotations

import dataclasses
import math

# Parameter classes. 'hidden': both dims grow with width (QKV, attention out, FFN in/out).
# 'residual_out': hidden matrices that write into the residual stream (attention out, FFN
# down), initialised smaller by 1/sqrt(2 x layers). 'embedding', 'output' (an untied
# readout) and 'vector' (norm gains, biases) have at most one width-sized dim.
CLASSES = ("embedding", "hidden", "residual_out", "output", "vector")


@dataclasses.dataclass(frozen=True)
class Rules:
    enabled: bool
    width: int
    base_width: int
    width_mult: float          # width / base_width (1 under SP)
    width_scale: float         # 1 / width_mult
    embedding_multiplier: float
    logit_multiplier: float    # output_alpha x width_scale under muP
    init_std: dict             # class -> std (truncated normal at 2 sigma)
    lr_mult: dict              # class -> Adam LR multiplier
    wd_mult: dict              # class -> weight-decay multiplier ('mup': 1 / lr_mult)
    attn_scale_power: float    # scores x head_dim ** -power: 1 (muP) or 0.5 (SP)

    def attn_scale(self, head_dim: int) -> float:
        return float(head_dim) ** -self.attn_scale_power


def rules(cfg, width: int | None = None) -> Rules:
    """The width rules for `cfg`, at its own d_model or at `width`."""
    m, mu = cfg.model, cfg.mup
    width = int(width or m.d_model)
    std = float(m.init_std)
    if not mu.enabled:
        ones = {k: 1.0 for k in CLASSES}
        return Rules(False, width, width, 1.0, 1.0, 1.0, 1.0, {k: std for k in CLASSES},
                     ones, dict(ones), 0.5)
    width_mult = width / mu.base_width
    scale = 1.0 / width_mult
    hidden_std = std * math.sqrt(scale)
    init = dict(embedding=std, output=std, vector=std,
                hidden=hidden_std, residual_out=hidden_std / math.sqrt(2 * m.num_layers))
    lr = dict(embedding=1.0, output=1.0, vector=1.0, hidden=scale, residual_out=scale)
    coupled = cfg.optim.rule == "cerebras"
    wd = {k: 1.0 if coupled else 1.0 / v for k, v in lr.items()}
    return Rules(True, width, int(mu.base_width), width_mult, scale,
                 float(mu.embedding_multiplier), float(mu.output_alpha) * scale,
                 init, lr, wd, 1.0)


def param_class(path: tuple[str, ...]) -> str:
    """The muP class of a parameter from its path in the param tree (see model.py)."""
    name = path[-1]
    if name in ("scale", "bias") or name.startswith("b_"):
        return "vector"
    if name == "embedding":
        return "embedding"
    if name == "lm_head":
        return "output"
    if name in ("w_o", "w_down"):
        return "residual_out"
    return "hidden"
