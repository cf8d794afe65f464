"""The config schema, its validation, and how configs are found and loaded.

Configs are `ml_collections.ConfigDict`s written as data in `configs/*.py`; every config
file starts from `base_config()` here, so every knob has exactly one name and one default,
and every knob can be overridden from the command line (`--config.model.num_layers=4`).
Configs are locked: a field that does not exist, in a config file or an override, is a
ConfigError naming it and the nearest valid name, never a silently added field nobody
reads. Only the `stages` and `stages.stage_N.mixture` maps take new names (that is what
a config file fills in). Nothing else in crystal imports `configs/` directly.
"""

from __future__ import annotations

import ast
import difflib
import fnmatch
import importlib.util
import json
import math
import re
import traceback
from pathlib import Path

import ml_collections

from crystal import fileio
from crystal.errors import ConfigError

# The 18 StarCoder special tokens, in id order after the base vocabulary (llm360.md).
STARCODER_SPECIAL_TOKENS = (
    "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<gh_stars>",
    "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
    "<jupyter_code>", "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>",
    "<commit_after>", "<reponame>",
)

NORM_TYPES = ("rmsnorm", "layernorm")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "blocked")
ROTARY_PAIRINGS = ("half", "interleaved")
SCHEDULE_KINDS = ("linear", "cosine")
WD_MASKS = ("matrices", "all")
OPTIM_RULES = ("mup", "cerebras")
EPS_PLACEMENTS = ("after_correction", "before_correction")
SCHEDULE_INDEXES = ("update", "step")
LOSS_DENOMINATORS = ("tokens", "batch")


def _locked(d: dict, *open_children: str) -> ml_collections.ConfigDict:
    """A locked ConfigDict whose listed children stay open to new names."""
    c = ml_collections.ConfigDict(d)
    c.lock()
    for name in open_children:
        c[name].unlock()
    return c


def _stage(steps=100, warmup=10, peak_lr=1e-3, end_lr=1e-4, decay_steps=0, kind="linear"):
    return _locked(dict(
        steps=steps,                 # optimizer steps trained in this stage
        init="previous",             # 'previous' stage's final checkpoint, or 'scratch'
        reset_optimizer=False,       # keep Adam moments across the stage boundary
        schedule=dict(
            kind=kind,               # 'linear' (CrystalCoder) or 'cosine' (Amber)
            warmup_steps=warmup,     # linear warmup from 0 to peak_lr
            peak_lr=peak_lr,         # base LR; muP hidden matrices get x width scale
            end_lr=end_lr,           # the LR the decay line aims at ...
            decay_steps=decay_steps, # ... after this many post-warmup steps (0: the stage's)
        ),
        # name -> {groups: comma-separated fnmatch patterns of data groups, weight,
        #          epochs, fim_rate}; filled in by each config file.
        mixture=ml_collections.ConfigDict(),
    ), "mixture")


def mixture_component(groups: str, weight: float, epochs: int = 1, fim_rate: float = 0.0):
    return _locked(dict(groups=groups, weight=weight, epochs=epochs, fim_rate=fim_rate))


def base_config() -> ml_collections.ConfigDict:
    """Every field crystal reads, with its default. Config files override values only."""
    c = ml_collections.ConfigDict()
    c.name = "base"
    c.seed = 0

    c.model = ml_collections.ConfigDict(dict(
        vocab_size=2048,          # embedding rows (tokenizer vocab + specials, padded)
        d_model=128,
        num_layers=2,
        num_heads=4,
        ffn_dim=344,              # SwiGLU hidden size
        max_seq_len=128,
        norm="rmsnorm",           # 'rmsnorm' | 'layernorm'
        norm_eps=1e-6,
        norm_bias=False,          # LayerNorm bias
        qkv_bias=False,
        out_bias=False,           # attention output projection bias
        ffn_bias=False,           # biases of the three FFN projections
        rotary_fraction=1.0,      # share of head dims that get RoPE, in (0, 1]
        rotary_base=10000.0,
        rotary_pairing="half",    # 'half' (rotate-half, HF) | 'interleaved' (GPT-J)
        tie_embeddings=False,
        init_std=0.02,            # SP init std; under muP the base-width std
        compute_dtype="float32",  # activations; params stay param_dtype
        param_dtype="float32",
        remat="none",
        scan_layers=True,
        segment_mask=False,       # document-aware attention for packed sequences
        attention="auto",         # 'auto' | 'xla' | 'cudnn' | 'blocked' (crystal/attention.py;
                                  # auto: cuDNN fused on NVIDIA GPUs, causal blocks on CPU)
        loss_chunk=512,           # sequence positions per chunk of the output projection +
                                  # cross-entropy, forward and backward (the float32 logits
                                  # of one chunk live at a time); 0: the whole sequence
    ))

    c.mup = ml_collections.ConfigDict(dict(
        enabled=False,
        base_width=256,
        embedding_multiplier=1.0,  # embedding output x this
        output_alpha=1.0,          # logits x output_alpha x (base_width / d_model)
    ))

    c.tokenizer = ml_collections.ConfigDict(dict(
        vocab_size=2000,          # sentencepiece base vocabulary (LLaMA: 32000)
        model_path="",            # existing LLaMA-style tokenizer.model; '' trains one
        special_tokens=(),        # appended right after the base vocabulary
        train_max_sentences=200_000,
        character_coverage=0.9995,
    ))

    c.data = ml_collections.ConfigDict(dict(
        input="",                 # folder of source files; '' = the bundled sample corpus
        seq_len=128,              # tokens per training example (samples hold seq_len + 1)
        num_shards=8,             # storage files (shards) per data group
        num_chunks=8,             # LLM360 data chunks per stage: runs of steps between two
                                  # release checkpoints (Amber: 360; at most the stage's steps)
        val_fraction=0.02,        # held-out share of sequences per group
        min_val_sequences=1,
        workers=2,                # tokenizer processes
        on_bad_record="fail",     # 'fail' | 'skip'
        sample_max_mb=8.0,        # size of the bundled sample corpus (used when input is '')
        cache_dir="",             # sample corpus + tokenizer cache; '' = $CRYSTAL_CACHE,
                                  # else ~/.cache/crystal
        loader_workers=0,         # grain worker processes (0: in-process)
        loader_prefetch=2,
        loader_threads=2,         # grain reader threads per process (ReadOptions.num_threads)
        fim_spm_rate=0.5,         # share of FIM documents in SPM (vs PSM) order
    ))

    c.stages = ml_collections.ConfigDict()

    c.optim = ml_collections.ConfigDict(dict(
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        wd_mask="matrices",       # 'matrices' (no decay on norms/biases) | 'all' (Amber)
        clip_norm=1.0,
        rule="mup",               # weight decay per muP class: 'mup' (microsoft/mup's
                                  # MuAdamW: wd / the class's LR multiplier, so lr x wd is
                                  # the same at every width) | 'cerebras' (Model Zoo 1.9.1
                                  # as LLM360 ran it: wd as is, coupled to the class's LR)
        eps_placement="after_correction",  # 'after_correction' (optax: m^ / (sqrt(v^) +
                                  # eps)) | 'before_correction' (Cerebras: m / (sqrt(v) +
                                  # eps) x sqrt(1 - b2^k) / (1 - b1^k))
        schedule_index="update",  # the warmup point of a stage's k-th update (k = 1, 2,
                                  # ..): 'update' (peak x k / warmup) | 'step' (Cerebras:
                                  # peak x (k - 1) / warmup, the first update has LR 0)
    ))

    c.train = ml_collections.ConfigDict(dict(
        global_batch_size=16,     # sequences per optimizer step
        grad_accum=1,             # micro-batches per step
        loss_denominator="tokens",  # what the summed token losses are divided by: 'tokens'
                                  # (the batch's unmasked tokens) | 'batch' (rows x seq_len,
                                  # fixed: Cerebras loss_scaling=batch_size, loss_weight=1/msl)
        stage=0,                  # 0: every stage in order; N: from stage N
        log_every=1,
        eval_every=0,             # 0: at stage ends only
        eval_batches=4,
        max_bad_steps=3,          # NaN/Inf steps in the window before a rollback
        bad_step_window=20,
        spike_zscore=6.0,
        spike_window=50,
        compilation_cache="auto",  # JAX persistent compilation cache: 'auto' (the crystal
                                  # cache dir, see data.cache_dir), '' (off) or a path
        fault_nan_shards="",      # fault injection: 'group:index,...' shards whose rows
                                  # make the loss NaN (tests the quarantine path)
        progress=True,
    ))

    c.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=50,           # rolling checkpoints
        keep_recent=3,
        release_per_chunk=True,   # permanent checkpoint at every data-chunk boundary
        async_save=True,
    ))

    c.mesh = ml_collections.ConfigDict(dict(
        preset="",                # '' | 'gpu' | 'tpu' | 'wafer'
        data=1,
        fsdp=1,
        tensor=1,
        # logical axis -> mesh axes (comma-separated; '' replicates)
        rules=ml_collections.ConfigDict(dict(
            batch="data,fsdp", vocab="tensor", embed="fsdp", heads="tensor",
            head_dim="", mlp="tensor", layers="", length="", norm="",
        )),
    ))

    c.metrics = ml_collections.ConfigDict(dict(
        tensorboard=True,
        wandb=False,
        wandb_mode="offline",
        wandb_project="crystal",
        plot=True,
        peak_flops_per_device=0.0,  # MFU denominator; 0: crystal.metrics table / CPU timing
    ))
    c.lock()
    c.stages.unlock()
    return c


# ----------------------------------------------------------------------------- validation


def _fail(field: str, msg: str):
    raise ConfigError(f"config field {field}: {msg}")


def _ints(section, prefix: str, names, minimum: int = 1):
    """Every named field of `section` is an integer >= minimum."""
    for f in names:
        v = section[f]
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            _fail(f"{prefix}.{f}", f"must be {kind}, got {v!r}")


def _one_of(value, allowed, field: str, what: str = "value"):
    if value not in allowed:
        _fail(field, f"unknown {what} {value!r}; expected one of {tuple(allowed)}")


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks the values a run depends on; raises ConfigError naming the field."""
    for check in (_check_model, _check_mup_and_tokenizer, _check_data, _check_optim,
                  _check_train, _check_stages, _check_mesh):
        check(c)
    return c


def _check_model(c):
    m = c.model
    _ints(m, "model", ("vocab_size", "d_model", "num_layers", "num_heads", "ffn_dim",
                       "max_seq_len"))
    if m.d_model % m.num_heads:
        _fail("model.num_heads", f"{m.num_heads} heads do not divide d_model={m.d_model}")
    _one_of(m.norm, NORM_TYPES, "model.norm", "norm type")
    if not m.norm_eps > 0:
        _fail("model.norm_eps", f"must be > 0, got {m.norm_eps!r}")
    if m.norm_bias and m.norm != "layernorm":
        _fail("model.norm_bias", "only LayerNorm has a bias")
    if not (0.0 < m.rotary_fraction <= 1.0):
        _fail("model.rotary_fraction", f"must be in (0, 1], got {m.rotary_fraction!r}")
    hd, rot = m.d_model // m.num_heads, rotary_dims(c)
    if abs(rot - m.rotary_fraction * hd) > 1e-6 or rot % 2:
        _fail("model.rotary_fraction", f"{m.rotary_fraction} x head_dim {hd} = "
              f"{m.rotary_fraction * hd:g} rotary dims; must be an even integer")
    _one_of(m.rotary_pairing, ROTARY_PAIRINGS, "model.rotary_pairing", "pairing")
    if not m.rotary_base > 0:
        _fail("model.rotary_base", f"must be > 0, got {m.rotary_base!r}")
    for f in ("compute_dtype", "param_dtype"):
        _one_of(m[f], DTYPES, f"model.{f}", "dtype")
    if m.param_dtype != "float32":
        _fail("model.param_dtype", "master params are float32 (optimizer precision)")
    _one_of(m.remat, REMAT_POLICIES, "model.remat", "policy")
    _one_of(m.attention, ATTENTION_IMPLEMENTATIONS, "model.attention", "implementation")
    if m.attention == "cudnn" and m.compute_dtype not in ("bfloat16", "float16"):
        _fail("model.attention", f"cuDNN attention needs a 16-bit compute_dtype, not "
              f"{m.compute_dtype!r} (use 'auto' or 'xla')")
    _ints(m, "model", ("loss_chunk",), minimum=0)
    if not m.init_std > 0:
        _fail("model.init_std", f"must be > 0, got {m.init_std!r}")


def _check_mup_and_tokenizer(c):
    if c.mup.enabled:
        _ints(c.mup, "mup", ("base_width",))
        for f in ("embedding_multiplier", "output_alpha"):
            if not c.mup[f] > 0:
                _fail(f"mup.{f}", f"must be > 0, got {c.mup[f]!r}")
    t = c.tokenizer
    _ints(t, "tokenizer", ("vocab_size",), minimum=4)
    if len(set(t.special_tokens)) != len(t.special_tokens):
        _fail("tokenizer.special_tokens", "duplicate special tokens")
    if t.vocab_size + len(t.special_tokens) > c.model.vocab_size:
        _fail("model.vocab_size", f"{c.model.vocab_size} rows cannot hold {t.vocab_size} "
              f"tokens + {len(t.special_tokens)} specials")


def _check_data(c):
    d = c.data
    _ints(d, "data", ("seq_len", "num_shards", "num_chunks", "workers"))
    _ints(d, "data", ("loader_workers", "loader_threads", "loader_prefetch"), minimum=0)
    if d.seq_len > c.model.max_seq_len:
        _fail("data.seq_len", f"{d.seq_len} exceeds model.max_seq_len={c.model.max_seq_len}")
    chunk = c.model.loss_chunk
    if 0 < chunk < d.seq_len and d.seq_len % chunk:
        _fail("model.loss_chunk", f"{chunk} does not divide data.seq_len={d.seq_len}")
    if not (0.0 <= d.val_fraction < 1.0):
        _fail("data.val_fraction", f"must be in [0, 1), got {d.val_fraction!r}")
    _one_of(d.on_bad_record, ("fail", "skip"), "data.on_bad_record", "policy")
    if not (0.0 <= d.fim_spm_rate <= 1.0):
        _fail("data.fim_spm_rate", f"must be in [0, 1], got {d.fim_spm_rate!r}")


def _check_optim(c):
    o = c.optim
    for k in ("b1", "b2"):
        if not (0.0 <= o[k] < 1.0):
            _fail(f"optim.{k}", f"must be in [0, 1), got {o[k]!r}")
    if not o.eps > 0:
        _fail("optim.eps", f"must be > 0, got {o.eps!r}")
    if o.weight_decay < 0:
        _fail("optim.weight_decay", f"must be >= 0, got {o.weight_decay!r}")
    _one_of(o.wd_mask, WD_MASKS, "optim.wd_mask", "mask")
    _one_of(o.rule, OPTIM_RULES, "optim.rule", "rule")
    _one_of(o.eps_placement, EPS_PLACEMENTS, "optim.eps_placement", "placement")
    _one_of(o.schedule_index, SCHEDULE_INDEXES, "optim.schedule_index", "index")


def _check_train(c):
    tr = c.train
    _ints(tr, "train", ("global_batch_size", "grad_accum"))
    _one_of(tr.loss_denominator, LOSS_DENOMINATORS, "train.loss_denominator", "denominator")
    if tr.global_batch_size % tr.grad_accum:
        _fail("train.grad_accum", f"{tr.grad_accum} micro-batches do not divide "
              f"global_batch_size={tr.global_batch_size}")
    if not (0 <= tr.stage <= len(c.stages)):
        _fail("train.stage", f"must be 0 (all) or 1..{len(c.stages)}, got {tr.stage!r}")


def _check_stages(c):
    if not len(c.stages):
        _fail("stages", "at least one stage is required")
    for i, name in enumerate(stage_names(c), start=1):
        if name != f"stage_{i}":
            _fail(f"stages.{name}", "stages must be named stage_1 .. stage_N in order")
        s, p = c.stages[name], f"stages.{name}"
        _ints(s, p, ("steps",))
        _one_of(s.init, ("previous", "scratch"), f"{p}.init", "init")
        sc = s.schedule
        _one_of(sc.kind, SCHEDULE_KINDS, f"{p}.schedule.kind", "schedule")
        if sc.warmup_steps < 0 or sc.decay_steps < 0:
            _fail(f"{p}.schedule", "warmup_steps and decay_steps must be >= 0")
        if not sc.peak_lr > 0 or sc.end_lr < 0:
            _fail(f"{p}.schedule.peak_lr", "peak_lr must be > 0 and end_lr >= 0")
        if not len(s.mixture):
            _fail(f"{p}.mixture", "a stage needs at least one mixture component")
        for cname, comp in s.mixture.items():
            _check_component(c, comp, f"{p}.mixture.{cname}")


def _check_component(c, comp, q: str):
    if not comp.groups:
        _fail(f"{q}.groups", "no data groups named")
    if not comp.weight > 0:
        _fail(f"{q}.weight", f"must be > 0, got {comp.weight!r}")
    _ints(comp, q, ("epochs",))
    if not (0.0 <= comp.fim_rate <= 1.0):
        _fail(f"{q}.fim_rate", f"must be in [0, 1], got {comp.fim_rate!r}")
    if comp.fim_rate > 0 and "<fim_prefix>" not in c.tokenizer.special_tokens:
        _fail(f"{q}.fim_rate", "FIM needs the StarCoder special tokens in "
              "tokenizer.special_tokens")


def _check_mesh(c):
    _ints(c.mesh, "mesh", ("data", "fsdp", "tensor"))
    _one_of(c.mesh.preset, ("", "gpu", "tpu", "wafer"), "mesh.preset", "preset")


# ----------------------------------------------------------------------------- derived


def head_dim(c) -> int:
    return c.model.d_model // c.model.num_heads


def rotary_dims(c) -> int:
    return int(round(c.model.rotary_fraction * head_dim(c)))


def stage_names(c) -> list[str]:
    return sorted(c.stages.keys(), key=lambda s: int(s.split("_")[-1]) if s.split("_")[-1]
                  .isdigit() else math.inf)


def stage(c, n: int) -> ml_collections.ConfigDict:
    return c.stages[f"stage_{n}"]


def match_groups(patterns: str, groups) -> list[str]:
    """Data groups matched by comma-separated fnmatch patterns, sorted.

    A pattern starting with '-' removes what it matches: 'slimpajama.*,-*.RedPajamaGithub'.
    """
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    inc = [p for p in pats if not p.startswith("-")]
    exc = [p[1:] for p in pats if p.startswith("-")]
    return sorted(g for g in groups if any(fnmatch.fnmatchcase(g, p) for p in inc)
                  and not any(fnmatch.fnmatchcase(g, p) for p in exc))


# ----------------------------------------------------------------------------- loading

REPO_ROOT = Path(__file__).resolve().parents[2]


def config_path(name_or_path: str) -> Path:
    """Resolves `configs/X.py`, `X.py` or `X` against the cwd, then against the repo."""
    p = Path(name_or_path)
    cands = [p, Path("configs") / p, REPO_ROOT / p, REPO_ROOT / "configs" / p]
    cands += [q.with_suffix(".py") for q in cands if q.suffix != ".py"]
    for q in cands:
        if q.is_file():
            return q
    raise ConfigError(f"config file {name_or_path}: not found (looked in ., configs/, "
                      f"{REPO_ROOT / 'configs'})")


def _line_in(path: Path, tb) -> str:
    """':LINE' of the deepest traceback frame in the config file `path`, else ''."""
    lines = [f.lineno for f in traceback.extract_tb(tb) if Path(f.filename) == path]
    return f":{lines[-1]}" if lines else ""


def _locked_key_error(e: Exception) -> str | None:
    """'no such field NAME (did you mean X?)' from ml_collections' locked-config error."""
    msg = str(e)
    if "cannot be added since the config is locked" not in msg:
        return None
    name = msg.split('Key "', 1)[-1].split('"', 1)[0]
    present = re.findall(r"'(\w+)': ", msg.split("Other fields present", 1)[-1].replace("\\", ""))
    return f"config field {name}: no such field{_did_you_mean(name, present)}"


def read(name_or_path) -> ml_collections.ConfigDict:
    """A config file's `get_config()`, unvalidated: how one config file builds on another
    (the tiny configs start from their 7B twins). A field the schema lacks is an error
    naming the file and line. A `.json` file is a recorded config (`crystal_config.json`
    written by crystal.interop, or a run's run.json): its `config` entry or the whole file."""
    path = config_path(str(name_or_path))
    if path.suffix == ".json":
        d = fileio.read_json(path, ConfigError)
        if not isinstance(d, dict):
            raise ConfigError(f"config file {path}: not a JSON object")
        return from_json_dict(d.get("config", d) if "fingerprint" in d else d, where=str(path))
    spec = importlib.util.spec_from_file_location(f"crystal_config_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        if not hasattr(mod, "get_config"):
            raise ConfigError(f"config file {path}: defines no get_config()")
        cfg = mod.get_config()
    except ConfigError:
        raise
    except Exception as e:  # a broken config file is still a one-line error
        where = f"config file {path}{_line_in(path, e.__traceback__)}"
        raise ConfigError(f"{where}: {_locked_key_error(e) or f'{type(e).__name__}: {e}'}"
                          ) from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"config file {path}: get_config() returned "
                          f"{type(cfg).__name__}, not an ml_collections.ConfigDict")
    check_schema(cfg, where=f"config file {path}: ")
    return cfg


def load(name_or_path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """Loads a config file, applies dotted overrides {'model.num_layers': 4} (a string value
    is parsed as the field's type, as on the command line), validates, locks."""
    return with_overrides(read(name_or_path), overrides)


def with_overrides(cfg, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """`cfg`, in place, with the dotted overrides applied, validated and locked."""
    for key, value in (overrides or {}).items():
        set_field(cfg, key, value)
    validate(cfg)
    cfg.lock()
    return cfg


# ----------------------------------------------------------------------------- schema


def _did_you_mean(name: str, candidates, prefix: str = "") -> str:
    near = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    if near:
        return f" (did you mean {prefix}{near[0]}?)"
    names = sorted(candidates)
    return f" (fields here: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''})"


def _template(path: tuple[str, ...]):
    """The schema node at `path` (a ConfigDict of defaults), or None for an open map
    (`stages`, a stage's `mixture`) whose entries are sections with their own template."""
    if path == ("stages",) or (len(path) == 3 and path[0] == "stages" and path[2] == "mixture"):
        return None
    if path[:1] == ("stages",):
        if len(path) >= 4 and path[2] == "mixture":
            node, rest = mixture_component("*", 1.0), path[4:]
        else:
            node, rest = _stage(), path[2:]
    else:
        node, rest = base_config(), path
    for k in rest:
        node = node[k]
    return node


def check_schema(cfg, where: str = "", path: tuple[str, ...] = ()):
    """Raises ConfigError for the first field of `cfg` the schema does not have (or a
    value where a section belongs, or the reverse), naming its dotted path and the
    nearest valid name."""
    tmpl = _template(path)
    for key in cfg.keys():
        full = ".".join(path + (key,))
        if tmpl is None:
            want_section = True
        elif key not in tmpl:
            prefix = ".".join(path) + "." if path else ""
            raise ConfigError(f"{where}config field {full}: no such field"
                              f"{_did_you_mean(key, tmpl.keys(), prefix)}")
        else:
            want_section = isinstance(tmpl[key], ml_collections.ConfigDict)
        is_section = isinstance(cfg[key], ml_collections.ConfigDict)
        if want_section and not is_section:
            raise ConfigError(f"{where}config field {full}: is a section; set its fields")
        if is_section and not want_section:
            raise ConfigError(f"{where}config field {full}: is a value, not a section")
        if is_section:
            check_schema(cfg[key], where, path + (key,))


def _parse_text(text: str, current, dotted: str):
    """A command-line override's text as the type of the field's current value."""
    def bad(kind):
        raise ConfigError(f"config field {dotted}: expected {kind}, got {text!r}")
    if isinstance(current, bool):
        t = text.strip().lower()
        if t in ("1", "true", "yes", "on"):
            return True
        if t in ("0", "false", "no", "off"):
            return False
        bad("true or false")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            bad("an integer")
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            bad("a number")
    if isinstance(current, (tuple, list)):
        t = text.strip()
        if t[:1] in "([":
            try:
                return tuple(ast.literal_eval(t))
            except (ValueError, SyntaxError):
                bad("a tuple literal")
        return tuple(x.strip() for x in t.split(",") if x.strip())
    if current is None:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    return text


def set_field(cfg, dotted: str, value):
    """Sets one existing field; a missing one is a ConfigError with the nearest name. A str
    value for a non-str field is parsed as that field's type (command-line overrides)."""
    node = cfg
    parts = dotted.split(".")
    for i, p in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"config field {dotted}: {'.'.join(parts[:i])} is a value, "
                              "not a section")
        if p not in node:
            prefix = ".".join(parts[:i]) + "." if i else ""
            raise ConfigError(f"config field {dotted}: no such field"
                              f"{_did_you_mean(p, node.keys(), prefix)}")
        if i < len(parts) - 1:
            node = node[p]
    leaf, current = parts[-1], node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config field {dotted}: is a section; set its fields")
    if isinstance(value, str) and not isinstance(current, str):
        value = _parse_text(value, current, dotted)
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config field {dotted}: {e}") from None


def to_json_dict(cfg) -> dict:
    """A plain JSON-able dict of a config (for manifests and checkpoints)."""
    return json.loads(cfg.to_json())


def _with_defaults(d: dict, defaults: dict) -> dict:
    """`d` with the fields it lacks taken from `defaults` (recursively): a config recorded
    before a field existed ran with that field's default."""
    out = dict(defaults, **d)
    for k, v in defaults.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            out[k] = _with_defaults(d[k], v)
    return out


def _recorded(d: dict) -> dict:
    base = to_json_dict(base_config())
    stage = {k: v for k, v in to_json_dict(_stage()).items() if k != "mixture"}
    d = _with_defaults({k: v for k, v in d.items() if k != "stages"}, base) | {
        "stages": {name: _with_defaults(s, stage) if isinstance(s, dict) else s
                   for name, s in d.get("stages", {}).items()}}
    return d


def from_json_dict(d: dict, where: str = "") -> ml_collections.ConfigDict:
    """A recorded config (run.json, a checkpoint's meta, an imported model's
    crystal_config.json) back as a validated, locked config; fields the schema lacks are an
    error naming `where`, fields it gained since the record was written take their
    defaults."""
    def conv(x):
        if isinstance(x, dict):
            return ml_collections.ConfigDict({k: conv(v) for k, v in x.items()})
        if isinstance(x, list):
            return tuple(conv(v) for v in x)
        return x
    cfg = conv(_recorded(d))
    check_schema(cfg, where=f"{where}: " if where else "")
    return with_overrides(cfg)


def fingerprint(cfg, sections=("model", "tokenizer", "data", "stages", "seed")) -> str:
    """A hash of the parts of a config that define a run's data and model."""
    d = to_json_dict(cfg)
    return fileio.json_sha256({k: d.get(k) for k in sections})[:16]
