"""The muP transfer tool: what a config's base hyperparameters become at its width.

    python -m crystal.mup.transfer --config=configs/crystalcoder_7b.py [--width=W] [--json]

Prints, from crystal.mup.rules (the numbers the model and optimizer use): the width
multiplier and scale, embedding and output-logit multipliers, attention scale, the init std
of each parameter class, and each class's LR and weight decay in every stage, plus which
parameters fall in which class. Tuning happens at the base width; this shows what runs at W.
"""

from __future__ import annotations

import json

import jax

from crystal import cli, optim
from crystal import config as config_lib
from crystal import model as model_lib
from crystal import mup as mup_lib
from crystal.errors import UsageError
from crystal.mup import coord_check


def _g(x: float) -> str:
    return f"{x:.8g}"


def derive(cfg, width: int | None = None) -> dict:
    """Every width-dependent number for `cfg` at its d_model (or `width`), as plain data."""
    width = int(width or cfg.model.d_model)
    r = mup_lib.rules(cfg, width)
    hd = config_lib.head_dim(cfg)
    sized = cfg if width == cfg.model.d_model else coord_check.at_width(
        cfg, width, mup=bool(cfg.mup.enabled))
    classes = optim.param_classes(model_lib.abstract_params(sized))
    shapes = model_lib.abstract_params(sized)
    groups: dict = {}
    for (path, c), leaf in zip(jax.tree_util.tree_flatten_with_path(classes)[0],
                               jax.tree.leaves(shapes)):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        g = groups.setdefault(c, {"params": [], "count": 0})
        g["params"].append(name)
        g["count"] += int(leaf.size)
    o = cfg.optim
    stages = {}
    for name in config_lib.stage_names(cfg):
        sc = config_lib.stage(cfg, int(name.split("_")[-1])).schedule
        per = {}
        for c in mup_lib.CLASSES:
            wd = 0.0 if (o.wd_mask == "matrices" and c == "vector") else \
                float(o.weight_decay) * r.wd_mult[c]
            per[c] = dict(peak_lr=float(sc.peak_lr) * r.lr_mult[c],
                          end_lr=float(sc.end_lr) * r.lr_mult[c], weight_decay=wd)
        stages[name] = dict(base_peak_lr=float(sc.peak_lr), base_end_lr=float(sc.end_lr),
                            classes=per)
    return dict(
        config=cfg.name, mup=r.enabled, width=width, base_width=r.base_width,
        num_layers=int(cfg.model.num_layers), head_dim=hd,
        width_mult=r.width_mult, width_scale=r.width_scale,
        embedding_multiplier=r.embedding_multiplier,
        output_alpha=float(cfg.mup.output_alpha) if r.enabled else 1.0,
        logit_multiplier=r.logit_multiplier,
        attn_scale=r.attn_scale(hd), attn_scale_power=r.attn_scale_power,
        tie_embeddings=bool(cfg.model.tie_embeddings),
        init_std=dict(r.init_std), lr_mult=dict(r.lr_mult), wd_mult=dict(r.wd_mult),
        stages=stages, groups=groups)


def report(d: dict) -> str:
    """The human-readable table of `derive`'s dict."""
    mode = "muP" if d["mup"] else "SP (muP off: every multiplier 1)"
    lines = [
        f"config {d['config']}: {mode}",
        f"  width {d['width']}, base width {d['base_width']}, {d['num_layers']} layers, "
        f"head_dim {d['head_dim']}",
        f"width multiplier       {_g(d['width_mult'])}   (width / base width)",
        f"width scale            {_g(d['width_scale'])}   (base width / width)",
        f"embedding multiplier   {_g(d['embedding_multiplier'])}",
        f"logit multiplier       {_g(d['logit_multiplier'])}   (output alpha "
        f"{_g(d['output_alpha'])} x width scale {_g(d['width_scale'])})",
        f"attention scale        {_g(d['attn_scale'])}   (head_dim ** -{d['attn_scale_power']:g})",
        "init std (truncated normal at 2 sigma; norm gains start at 1, biases at 0):",
    ]
    notes = dict(embedding="input embedding" + (" = tied output head" if d["tie_embeddings"]
                                                 else ""),
                 hidden="QKV, FFN gate/up: std x sqrt(width scale)",
                 residual_out="attention out, FFN down: hidden / sqrt(2 x layers)",
                 output="untied lm_head" + (" (unused: tied)" if d["tie_embeddings"] else ""),
                 vector="norm gains, biases (not drawn)")
    for c, s in d["init_std"].items():
        lines.append(f"  {c:13s} {_g(s):>12s}   {notes[c]}")
    lines.append("LR / weight-decay multipliers (lr x wd kept constant across widths):")
    for c in d["lr_mult"]:
        lines.append(f"  {c:13s} lr x {_g(d['lr_mult'][c]):<10s} wd x {_g(d['wd_mult'][c])}")
    for name, st in d["stages"].items():
        lines.append(f"{name}: base peak LR {_g(st['base_peak_lr'])} -> end "
                     f"{_g(st['base_end_lr'])}")
        for c, v in st["classes"].items():
            lines.append(f"  {c:13s} peak {_g(v['peak_lr']):>12s}  end {_g(v['end_lr']):>12s}"
                         f"  weight decay {_g(v['weight_decay'])}")
    lines.append("parameter groups:")
    for c, g in sorted(d["groups"].items()):
        lines.append(f"  {c:13s} {g['count']:>14,d} params: " + ", ".join(g["params"]))
    return "\n".join(lines)


FLAGS = (
    cli.Flag("width", "derive at this width (0: the config's d_model)", int, 0),
    cli.Flag("json", "print JSON instead of a table", bool, False),
)


def main(argv=None):
    def body(args):
        if args.width < 0:
            raise UsageError(f"--width={args.width}: must be >= 0")
        d = derive(args.cfg, args.width or None)
        print(json.dumps(d, indent=1) if args.json else report(d))
    return cli.run(body, doc=__doc__.split("\n\n")[0], flags=FLAGS, config=cli.CONFIG_REQUIRED,
            argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
