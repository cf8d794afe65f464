"""A crystal config's stage as a Cerebras Model Zoo rel-1.9 params.yaml (LLM360's format).

The numbers Cerebras spells out are crystal's derived ones (mup/rules.py): init stds per
class, the output logits scale, the decoder-kernel LR scale. A config whose run the format
cannot describe is a ConfigError naming the field: Cerebras' AdamW couples decay to the
group LR, adds eps before bias correction, reads its LR list at the step before each update
and never decays biases or norms, and its rotary embedding pairs dims GPT-J style. FIM
rates and epochs have no params.yaml key (LLM360 materialised them in the data); mixture
components become data dirs: LLM360's own names for one SlimPajama half-set read once
without FIM, else `crystal:<component>:<groups>:fim=<rate>:epochs=<n>`, which `import` reads
back exactly.
"""

from __future__ import annotations

from crystal import config as config_lib
from crystal import model as model_lib
from crystal import mup as mup_lib
from crystal.errors import ConfigError
from crystal.interop import cerebras_format as fmt

# (field, value a rel-1.9 run has, why)
_CEREBRAS_RUN = (
    ("optim.eps_placement", "before_correction", "Cerebras' AdamW adds eps before bias "
     "correction"),
    ("optim.schedule_index", "step", "Cerebras reads the LR list at the step before each "
     "update"),
    ("optim.wd_mask", "matrices", "Cerebras never decays biases and norms"),
    ("model.norm", "layernorm", "the rel-1.9 GPT-2 decoder has LayerNorm"),
    ("model.norm_bias", True, "Cerebras' LayerNorm has a bias"),
    ("model.rotary_pairing", "interleaved", "Cerebras' rotary embedding pairs dims GPT-J "
     "style"),
)


def _check(cfg) -> None:
    for field, want, why in _CEREBRAS_RUN:
        section, name = field.split(".")
        if cfg[section][name] != want:
            raise ConfigError(f"config field {field}: {cfg[section][name]!r} cannot be "
                              f"written to a params.yaml ({why}; needs {want!r})")
    r = mup_lib.rules(cfg)
    if any(v != 1.0 for v in r.wd_mult.values()):
        raise ConfigError("config field optim.rule: 'mup' rescales decay by 1 / the LR "
                          "multiplier, which Cerebras' AdamW cannot (needs 'cerebras')")


def _initializer(std: float) -> dict:
    return dict(name="truncated_normal", mean=0.0, std=std, a=-2 * std, b=2 * std)


def _model(cfg) -> dict:
    spec, r, m = model_lib.ModelSpec.from_config(cfg), mup_lib.rules(cfg), cfg.model
    out = dict(
        hidden_size=spec.d_model, num_hidden_layers=spec.num_layers, num_heads=spec.num_heads,
        filter_size=spec.ffn_dim, vocab_size=spec.vocab_size,
        max_position_embeddings=int(m.max_seq_len), nonlinearity="swiglu",
        position_embedding_type="rotary", use_position_embedding=True,
        rotary_dim=spec.rotary_dims, share_embedding_weights=spec.tie_embeddings,
        layer_norm_epsilon=spec.norm_eps, use_projection_bias_in_attention=spec.qkv_bias,
        use_ffn_bias_in_attention=spec.out_bias, use_ffn_bias=spec.ffn_bias,
        use_bias_in_output=False, attention_type="scaled_dot_product",
        scale_qk_dot_by_d=r.attn_scale_power == 1.0, attention_softmax_fp32=True,
        dropout_rate=0.0, attention_dropout_rate=0.0,
        embedding_initializer=_initializer(r.init_std["embedding"]),
        initializer=_initializer(r.init_std["hidden"]),
        output_layer_initializer=_initializer(r.init_std["residual_out"]),
        mixed_precision=True, use_bfloat16=m.compute_dtype == "bfloat16")
    if spec.rotary_base != 10000.0:
        out["rope_theta"] = spec.rotary_base
    if r.enabled:
        out.update(embeddings_scale=r.embedding_multiplier,
                   output_logits_scale=r.logit_multiplier)
    if cfg.train.loss_denominator == "batch":
        out.update(loss_scaling="batch_size", loss_weight=1.0 / int(cfg.data.seq_len))
    else:
        out.update(loss_scaling="num_tokens", loss_weight=1.0)
    return out


def _learning_rate(stage_cfg) -> list[dict]:
    sc = stage_cfg.schedule
    warm = int(sc.warmup_steps)
    decay = int(sc.decay_steps) or max(int(stage_cfg.steps) - warm, 1)
    out = []
    if warm:
        out.append(dict(scheduler="Linear", initial_learning_rate=0.0,
                        end_learning_rate=float(sc.peak_lr), steps=warm))
    out.append(dict(scheduler="Linear" if sc.kind == "linear" else "CosineDecay",
                    initial_learning_rate=float(sc.peak_lr), end_learning_rate=float(sc.end_lr),
                    steps=decay, decay_steps=decay))
    return out


def params(cfg, stage: int) -> dict:
    """The rel-1.9 params.yaml dict of `cfg`'s stage `stage` (1-based)."""
    _check(cfg)
    names = config_lib.stage_names(cfg)
    if not 1 <= stage <= len(names):
        raise ConfigError(f"--stage={stage}: config {cfg.name} has stages 1..{len(names)}")
    s, o, r = config_lib.stage(cfg, stage), cfg.optim, mup_lib.rules(cfg)
    optimizer = dict(optimizer_type="AdamW", beta1=float(o.b1), beta2=float(o.b2),
                     eps=float(o.eps), weight_decay_rate=float(o.weight_decay),
                     max_gradient_norm=float(o.clip_norm), correct_bias=True,
                     learning_rate=_learning_rate(s))
    if r.enabled:
        optimizer["adjust_learning_rate"] = dict(decoder_kernel=r.width_scale)
    mixture = [dict(data_dir=fmt.dir_of_component(name, c), weight=float(c.weight))
               for name, c in sorted(s.mixture.items())]
    return dict(
        model=_model(cfg), optimizer=optimizer,
        runconfig=dict(max_steps=int(s.steps), checkpoint_steps=int(cfg.checkpoint.every_steps),
                       seed=int(cfg.seed), is_pretrained_checkpoint=bool(s.reset_optimizer)),
        train_input=dict(batch_size=int(cfg.train.global_batch_size),
                         data_processor="GptHDF5MapDataProcessor", mixture=mixture,
                         shuffle=False, vocab_size=int(cfg.model.vocab_size)))
