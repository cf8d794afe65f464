"""A Cerebras Model Zoo params.yaml (one per phase) as a crystal config.

What each key becomes (docs/interop.md has the table): the model section gives model.*;
muP gives mup.* (rel-1.9: width scale from `optimizer.adjust_learning_rate.decoder_kernel`,
output alpha = output_logits_scale / width scale; 2.x: mup_base_hidden_size and
output_logits_alpha); the optimizer gives optim.* with Cerebras' own semantics (decay
coupled to the group LR, eps before bias correction, the LR list read at the step before
the update); `loss_scaling: batch_size` x `loss_weight` 1/msl gives the fixed denominator
and data.seq_len; the LR list gives the stage schedule; max_steps the stage's steps;
`is_pretrained_checkpoint` a fresh Adam state; the train_input mixture the stage mixture.

Crystal derives what Cerebras spells out (hidden and output-layer init stds from the
embedding's; truncation at 2 sigma); a file whose numbers disagree with that derivation, or
with itself, is a ConfigError naming the key. Keys nothing reads are listed, never dropped
silently: runtime settings (hardware, paths, logging) apart from unknown ones.
"""

from __future__ import annotations

import math
import re

from crystal import config as config_lib
from crystal.errors import ConfigError
from crystal.interop import cerebras_format as fmt
from crystal.interop.cerebras_format import Params

# Keys with no crystal meaning: where the run happened, not what it computed.
RUNTIME = (
    r"cerebras\..*", r"eval_input\..*", r"runconfig\..*",
    r"train_input\.(data_processor|num_workers|prefetch_factor|persistent_workers|repeat"
    r"|shuffle|shuffle_seed|use_worker_cache|vocab_size)",
    r"model\.(attention_kernel|boundary_casting|weight_initialization_seed|mixed_precision"
    r"|use_bfloat16|fp16_type|precision_opt_level|name)",
    r"optimizer\.(log_summaries|loss_scaling_factor)",
    r"init\.(backend|logging|callbacks|loggers|seed)\b.*",
    r"init\.precision\..*", r"init\.loop\..*", r"init\.checkpoint\..*",
    r"fit\.val_dataloader\..*", r"fit\.train_dataloader\.(data_processor|num_workers"
    r"|prefetch_factor|persistent_workers|shuffle|shuffle_seed|use_worker_cache|vocab_size)",
    r"validate.*", r"validate_all.*",
)
# Cerebras model names whose decoder crystal's block is (GPT-2 style with the options here).
MODEL_NAMES = ("gpt2", "gpt3", "gptj", "btlm", "llama", "crystalcoder")
_REL = 1e-3   # published numbers are rounded (0.01825, 0.00228125, 0.13875)
# Settings a phase may change that crystal holds once per run: phase 1's is kept, noted.
PER_PHASE = ("checkpoint.every_steps",)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_REL, abs_tol=1e-12)


def _paths(p: Params) -> dict:
    v2 = fmt.is_trainer_format(p)
    return dict(model="init.model" if v2 else "model",
                optimizer="init.optimizer" if v2 else "optimizer",
                max_steps="init.loop.max_steps" if v2 else "runconfig.max_steps",
                checkpoint="init.checkpoint.steps" if v2 else "runconfig.checkpoint_steps",
                data="fit.train_dataloader" if v2 else "train_input",
                clip="init.precision.max_gradient_norm" if v2 else
                "optimizer.max_gradient_norm")


# ----------------------------------------------------------------------------- model


def _init_std(p: Params, m: str, L: int, width_scale: float, mup: bool, v2: bool) -> float:
    """model.init_std (the embedding's std), after checking the hidden and output-layer
    stds are what crystal derives from it."""
    stds = {}
    for k in ("embedding_initializer", "initializer", "output_layer_initializer"):
        if not p.has(f"{m}.{k}"):
            continue
        name = p.get(f"{m}.{k}.name", "truncated_normal")
        if name != "truncated_normal":
            p.fail(f"{m}.{k}.name", f"{name!r}; crystal initialises truncated_normal")
        std = stds[k] = p.num(f"{m}.{k}.std")
        p.get(f"{m}.{k}.mean", 0.0)
        for b, sign in (("a", -1), ("b", 1)):
            if p.has(f"{m}.{k}.{b}") and not _close(p.num(f"{m}.{k}.{b}"), sign * 2 * std):
                p.fail(f"{m}.{k}.{b}", f"{p.num(f'{m}.{k}.{b}')}; crystal truncates at 2 std "
                       f"({sign * 2 * std:g})")
    base = stds.get("embedding_initializer", stds.get("initializer", 0.02))
    hidden = base * math.sqrt(width_scale) if (mup and not v2) else base
    want = {"initializer": hidden,
            "output_layer_initializer": hidden / math.sqrt(2 * L) if mup and not v2 else hidden}
    for k, w in want.items():
        if k in stds and not _close(stds[k], w):
            p.fail(f"{m}.{k}.std", f"{stds[k]:g} contradicts the embedding std {base:g}: "
                   f"crystal derives {w:g} for it" + (" (x sqrt(width scale), / sqrt(2 x "
                                                    "layers) for the output layer)" if mup
                                                    else ""))
    return base


def _mup(p: Params, m: str, o: str, D: int, F: int) -> dict:
    """mup.* fields; also the width scale (key 'scale')."""
    v2 = fmt.is_trainer_format(p)
    by_d = bool(p.get(f"{m}.scale_qk_dot_by_d", False))
    emb = p.num(f"{m}.embeddings_scale", 1.0)
    if v2:
        base = p.get(f"{m}.mup_base_hidden_size", None)
        scale = base / D if base else 1.0
        alpha = p.num(f"{m}.output_logits_alpha", 1.0)
        if p.has(f"{m}.mup_base_filter_size") and base and not _close(
                p.num(f"{m}.mup_base_filter_size") / F, scale):
            p.fail(f"{m}.mup_base_filter_size", "scales the FFN by another width multiplier "
                   f"than mup_base_hidden_size ({base}/{D}); crystal scales both alike")
    else:
        adjust = p.get(f"{o}.adjust_learning_rate", {}) or {}
        extra = sorted(set(adjust) - {"decoder_kernel"})
        if extra:
            p.fail(f"{o}.adjust_learning_rate.{extra[0]}", "crystal scales the LR of the "
                   "decoder kernels (hidden matrices) only")
        scale = float(adjust.get("decoder_kernel", 1.0))
        logits = p.num(f"{m}.output_logits_scale", 1.0)
        alpha = logits / scale
    enabled = by_d or scale != 1.0 or emb != 1.0 or alpha != 1.0
    if not enabled:
        return dict(fields={"mup.enabled": False}, scale=1.0)
    if not by_d:
        p.fail(f"{m}.scale_qk_dot_by_d", "false, but the file has muP multipliers: crystal's "
               "muP divides attention scores by head_dim")
    base_width = round(D * scale)
    if abs(base_width - D * scale) > 1e-6 * D:
        p.fail(f"{o}.adjust_learning_rate.decoder_kernel" if not v2 else
               f"{m}.mup_base_hidden_size", f"width scale {scale!r} x hidden_size {D} is not "
               "an integer base width")
    return dict(scale=scale, fields={"mup.enabled": True, "mup.base_width": base_width,
                                     "mup.embedding_multiplier": emb,
                                     "mup.output_alpha": round(alpha, 12)})


def _model(p: Params, paths: dict, notes: list) -> dict:
    """model.*, mup.*, data.seq_len, train.loss_denominator fields of one phase."""
    m, o = paths["model"], paths["optimizer"]
    name = p.get(f"{m}.name", "gpt2")
    if name not in MODEL_NAMES:
        p.fail(f"{m}.name", f"model type {name!r} is not one crystal's decoder can be "
               f"(one of {', '.join(MODEL_NAMES)})")
    for key, allowed in (("nonlinearity", ("swiglu",)), ("position_embedding_type",
                                                          ("rotary",)),
                         ("attention_type", ("scaled_dot_product",)),
                         ("use_bias_in_output", (False,)), ("use_position_embedding", (True,)),
                         ("norm_type", ("layernorm", "rmsnorm"))):
        v = p.get(f"{m}.{key}", allowed[0])
        if v not in allowed:
            p.fail(f"{m}.{key}", f"{v!r}; crystal can hold {' or '.join(map(repr, allowed))}")
    for key in ("dropout_rate", "attention_dropout_rate", "embedding_dropout_rate"):
        if p.num(f"{m}.{key}", 0.0) != 0.0:
            p.fail(f"{m}.{key}", "crystal has no dropout")
    D, H, L = (p.count(f"{m}.{k}") for k in ("hidden_size", "num_heads", "num_hidden_layers"))
    F, P = p.count(f"{m}.filter_size"), p.count(f"{m}.max_position_embeddings")
    if D % H:
        p.fail(f"{m}.num_heads", f"{H} heads do not divide hidden_size {D}")
    mup = _mup(p, m, o, D, F)
    norm = p.get(f"{m}.norm_type", "layernorm")
    fields = {
        "model.vocab_size": p.count(f"{m}.vocab_size"), "model.d_model": D,
        "model.num_layers": L, "model.num_heads": H, "model.ffn_dim": F,
        "model.max_seq_len": P, "model.norm": norm,
        "model.norm_eps": p.num(f"{m}.layer_norm_epsilon", 1e-5),
        "model.norm_bias": norm == "layernorm",
        "model.qkv_bias": bool(p.get(f"{m}.use_projection_bias_in_attention", False)),
        "model.out_bias": bool(p.get(f"{m}.use_ffn_bias_in_attention", False)),
        "model.ffn_bias": bool(p.get(f"{m}.use_ffn_bias", False)),
        "model.rotary_fraction": p.count(f"{m}.rotary_dim", D // H) / (D // H),
        "model.rotary_base": p.num(f"{m}.rope_theta", 10000.0),
        "model.rotary_pairing": "interleaved",
        "model.tie_embeddings": bool(p.get(f"{m}.share_embedding_weights", True)),
        "model.init_std": _init_std(p, m, L, mup["scale"], bool(mup["fields"]["mup.enabled"]),
                                    fmt.is_trainer_format(p)),
    }
    fields.update(mup["fields"])
    if p.get(f"{m}.scale_glu_initialization", False):
        notes.append(f"{p.where(f'{m}.scale_glu_initialization')}: "
                     f"{m}.scale_glu_initialization: Model Zoo 1.9.1's init quirk (one FFN "
                     "gate-bias draw shared by every layer) is not reproduced; crystal's "
                     "biases start at 0")
    if p.get(f"{m}.attention_softmax_fp32", True) is not True:
        p.fail(f"{m}.attention_softmax_fp32", "crystal's softmax is always float32")
    fields.update(_loss(p, m, P))
    bf16 = (p.get(f"{m}.use_bfloat16", False) or p.get(f"{m}.fp16_type", "") in (
        "bfloat16", "cbfloat16")) and p.get(f"{m}.mixed_precision", True)
    fields["model.compute_dtype"] = "bfloat16" if bf16 else "float32"
    return fields


def _loss(p: Params, m: str, positions: int) -> dict:
    scaling = p.get(f"{m}.loss_scaling", "num_tokens")
    weight = p.num(f"{m}.loss_weight", 1.0)
    if scaling == "num_tokens":
        if weight != 1.0:
            p.fail(f"{m}.loss_weight", f"{weight:g} with loss_scaling num_tokens; crystal "
                   "divides by the unmasked tokens only")
        return {"train.loss_denominator": "tokens"}
    if scaling != "batch_size":
        p.fail(f"{m}.loss_scaling", f"{scaling!r}; expected batch_size or num_tokens")
    msl = 1.0 / weight if weight > 0 else 0.0
    if weight <= 0 or abs(msl - round(msl)) > 1e-6 or round(msl) > positions:
        p.fail(f"{m}.loss_weight", f"{weight:g} is not 1 / a sequence length <= "
               f"max_position_embeddings {positions}")
    return {"train.loss_denominator": "batch", "data.seq_len": int(round(msl))}


# ----------------------------------------------------------------------------- optimizer


def _optim(p: Params, paths: dict) -> dict:
    o = paths["optimizer"]
    if fmt.is_trainer_format(p):
        opt = p.get(o)
        if not isinstance(opt, dict) or len(opt) != 1 or "AdamW" not in opt:
            p.fail(o, f"{sorted(opt) if isinstance(opt, dict) else opt!r}; crystal runs AdamW")
        b1, b2 = p.get(f"{o}.AdamW.betas", [0.9, 0.999])
        f = {"optim.b1": float(b1), "optim.b2": float(b2),
             "optim.eps": p.num(f"{o}.AdamW.eps", 1e-8),
             "optim.weight_decay": p.num(f"{o}.AdamW.weight_decay", 0.0)}
        correct = p.get(f"{o}.AdamW.correct_bias", True)
    else:
        kind = p.get(f"{o}.optimizer_type")
        if str(kind).lower() != "adamw":
            p.fail(f"{o}.optimizer_type", f"{kind!r}; crystal runs AdamW")
        f = {"optim.b1": p.num(f"{o}.beta1", 0.9), "optim.b2": p.num(f"{o}.beta2", 0.999),
             "optim.eps": p.num(f"{o}.eps", 1e-6),
             "optim.weight_decay": p.num(f"{o}.weight_decay_rate", 0.0)}
        correct = p.get(f"{o}.correct_bias", True)
    if correct is not True:
        p.fail(f"{o}.correct_bias", "crystal's Adam corrects the bias")
    f["optim.clip_norm"] = p.num(paths["clip"], 0.0)
    f.update({"optim.rule": "cerebras", "optim.eps_placement": "before_correction",
              "optim.schedule_index": "step", "optim.wd_mask": "matrices"})
    return f


def _segments(p: Params, paths: dict) -> list[tuple[str, str, float, float, int]]:
    """(key, kind, initial, end, steps) per scheduler of the phase's LR list."""
    if fmt.is_trainer_format(p):
        key = "init.schedulers"
        scheds = p.get(key)
        if (isinstance(scheds, list) and len(scheds) == 1 and isinstance(scheds[0], dict)
                and "SequentialLR" in scheds[0]):
            key = "init.schedulers.0.SequentialLR.schedulers"
            scheds = p.get(key)
        names = {"LinearLR": "linear", "CosineDecayLR": "cosine", "ConstantLR": "constant"}
        steps_key = "total_iters"
    else:
        key = f"{paths['optimizer']}.learning_rate"
        scheds = p.get(key)
        if isinstance(scheds, (int, float)):
            return [(key, "constant", float(scheds), float(scheds), 0)]
        names = {"Linear": "linear", "CosineDecay": "cosine", "Cosine": "cosine",
                 "Constant": "constant"}
        steps_key = "steps"
    if not isinstance(scheds, list) or not scheds:
        p.fail(key, f"expected a list of schedulers, got {scheds!r}")
    out = []
    for i, s in enumerate(scheds):
        k = f"{key}.{i}"
        if fmt.is_trainer_format(p):
            (name, s), = s.items() if isinstance(s, dict) and len(s) == 1 else [(None, s)]
            k = f"{k}.{name}"
        else:
            name = p.get(f"{k}.scheduler")
        if name not in names:
            p.fail(k, f"scheduler {name!r}; crystal's schedules are {', '.join(names)}")
        out.append((k, names[name], *_segment(p, k, names[name], steps_key)))
    return out


def _segment(p: Params, k: str, kind: str, steps_key: str) -> tuple[float, float, int]:
    if kind == "constant":
        lr = p.num(f"{k}.learning_rate")
        return lr, lr, p.count(f"{k}.{steps_key}", 1)
    initial, end = p.num(f"{k}.initial_learning_rate"), p.num(f"{k}.end_learning_rate")
    for alias in ("learning_rate", "base_lr"):     # LLM360's files repeat the start
        if p.has(f"{k}.{alias}") and p.num(f"{k}.{alias}") != initial:
            p.fail(f"{k}.{alias}", f"{p.num(f'{k}.{alias}')} contradicts "
                   f"initial_learning_rate {initial}")
    steps = [p.count(f"{k}.{s}") for s in (steps_key, "decay_steps") if p.has(f"{k}.{s}")]
    if not steps:
        p.fail(f"{k}.{steps_key}", "missing (or decay_steps)")
    if len(set(steps)) > 1:
        p.fail(f"{k}.decay_steps", f"{steps[1]} contradicts steps {steps[0]}")
    return initial, end, steps[0]


def _schedule(p: Params, paths: dict) -> dict:
    """A stage's schedule from the LR list: warmup (linear from 0) + one decay."""
    segs = _segments(p, paths)
    key, kind, initial, end, steps = segs[0]
    if len(segs) == 1:
        return dict(kind="linear" if kind == "constant" else kind, warmup_steps=0,
                    peak_lr=initial, end_lr=end, decay_steps=steps)
    if len(segs) != 2 or kind != "linear" or initial != 0.0:
        p.fail(key, f"{len(segs)} schedulers from {initial:g}: crystal's stage schedule is a "
               "linear warmup from 0 and one linear or cosine decay")
    key2, kind2, initial2, end2, steps2 = segs[1]
    if not _close(initial2, end) and not (initial2 == end == 0):
        p.fail(f"{key2}.initial_learning_rate", f"{initial2:g} contradicts the warmup's end "
               f"{end:g}")
    return dict(kind="linear" if kind2 == "constant" else kind2, warmup_steps=steps,
                peak_lr=end, end_lr=end2, decay_steps=steps2)


# ----------------------------------------------------------------------------- data


def _like(base_cfg, n: int) -> dict:
    """groups -> the base config's mixture component for them: stage n's first, then the
    other stages' (what FIM rate and epochs the data had; a params.yaml does not say)."""
    names = config_lib.stage_names(base_cfg)
    order = [f"stage_{n}"] * (f"stage_{n}" in names) + [s for s in names if s != f"stage_{n}"]
    out = {}
    for s in reversed(order):
        out.update({c.groups: c for c in base_cfg.stages[s].mixture.values()})
    return out


def _mixture(p: Params, paths: dict, base: dict, notes: list) -> dict | None:
    """{name: component dict} of the phase's train mixture, or None without weights;
    `base` is _like's map."""
    key = f"{paths['data']}.mixture"
    entries = p.get(key, None)
    if entries is None:
        if p.has(f"{paths['data']}.data_dir"):
            p.get(f"{paths['data']}.data_dir")
            notes.append(f"{p.where(key)}: no mixture weights; the stage keeps the base "
                         "config's mixture")
        return None
    out = {}
    for i, e in enumerate(entries):
        d = p.get(f"{key}.{i}.data_dir")
        weight = p.num(f"{key}.{i}.weight")
        if p.has(f"{key}.{i}.data_subset"):
            notes.append(f"{p.where(f'{key}.{i}.data_subset')}: data_subset "
                         f"{p.get(f'{key}.{i}.data_subset')} of {d} not reproduced (crystal "
                         "mixes whole data groups)")
        g = fmt.groups_of_dir(str(d))
        if g is None:
            notes.append(f"{p.where(f'{key}.{i}.data_dir')}: unknown data_dir {d} (weight "
                         f"{weight:g}) has no crystal data group; left out of the mixture")
            continue
        groups, name, fim, epochs = g
        like = base.get(groups)
        if epochs is None:
            epochs = int(like.epochs) if like is not None else 1
        if fim is None:
            fim = like.fim_rate if like is not None else 0.0
            if "fim" in str(d).lower():
                notes.append(f"{p.where(f'{key}.{i}.data_dir')}: {d} is FIM data but names "
                             f"no rate; fim_rate {fim:g} from the base config (check it)")
        name = name or fmt.component_name(groups, set(out))
        out[name] = dict(groups=groups, weight=weight, fim_rate=float(fim), epochs=epochs)
    return out or None


# ----------------------------------------------------------------------------- phases


def phase(p: Params, n: int, base_cfg) -> tuple[dict, dict, list]:
    """(global fields, stage dict, notes) of phase n (1-based)."""
    paths, notes = _paths(p), []
    fields = _model(p, paths, notes)
    fields.update(_optim(p, paths))
    fields["train.global_batch_size"] = p.count(f"{paths['data']}.batch_size")
    if p.has(paths["checkpoint"]):
        fields["checkpoint.every_steps"] = p.count(paths["checkpoint"])
    pretrained = bool(p.get("runconfig.is_pretrained_checkpoint", False))
    base_stage = base_cfg.stages.get(f"stage_{n}")
    mixture = _mixture(p, paths, _like(base_cfg, n), notes)
    if mixture is None:
        if base_stage is None:
            p.fail(f"{paths['data']}.mixture", f"no mixture, and the base config has no "
                   f"stage_{n} to take one from")
        mixture = {k: dict(v) for k, v in config_lib.to_json_dict(base_stage)["mixture"].items()}
    stage = dict(steps=p.count(paths["max_steps"]), reset_optimizer=pretrained,
                 init="scratch" if n == 1 and not pretrained else "previous",
                 schedule=_schedule(p, paths), mixture=mixture)
    return fields, stage, notes


def to_config(files, base_cfg) -> tuple[object, dict]:
    """(crystal config, report) from params.yaml files, phase i -> stage i; `base_cfg`
    gives everything a params.yaml does not say (tokenizer, data input, metrics...).

    report: {'notes': [...], 'unknown': {file: [keys]}, 'runtime': {file: [keys]}}."""
    phases = [ph for f in files for ph in fmt.phases(f)]
    if not phases:
        raise ConfigError("no params.yaml given")
    d = config_lib.to_json_dict(base_cfg)
    report: dict = {"notes": [], "unknown": {}, "runtime": {}}
    first: dict | None = None
    d["stages"] = {}
    for n, p in enumerate(phases, start=1):
        fields, stage, notes = phase(p, n, base_cfg)
        if first is None:
            first = fields
        for k, v in fields.items():
            if k in PER_PHASE and first.get(k) != v:
                report["notes"].append(f"{p.path}: {k} = {v!r} in this phase; crystal has "
                                       f"one value per run and keeps phase 1's {first[k]!r}")
            elif k in first and first[k] != v:
                raise ConfigError(f"{p.path}: {k.split('.')[-1]} gives {k} = {v!r}, "
                                  f"contradicting phase 1's {first[k]!r} (one value per run)")
        d["stages"][f"stage_{n}"] = stage
        report["notes"] += notes
        label = p.path + (f" ({p.prefix.rstrip('.')})" if p.prefix.count(".") > 1 else "")
        unused = p.unused()
        runtime = [k for k in unused if any(re.fullmatch(r, k) for r in RUNTIME)]
        report["runtime"][label] = runtime
        report["unknown"][label] = [k for k in unused if k not in runtime]
    for k, v in first.items():
        section, _, name = k.rpartition(".")
        (d[section] if section else d)[name] = v
    try:
        cfg = config_lib.from_json_dict(d, where=str(files[0]))
    except ConfigError as e:
        raise ConfigError(f"{files[0]}: gives a crystal config that does not validate: "
                          f"{e}") from None
    return cfg, report
