"""The muP coordinate check: is every layer's activation size flat in width after training?

Trains each width for a few Adam steps (crystal.optim, so the real muP LR groups are what is
checked) on one fixed batch, under muP and under standard parametrization (SP: the same code
with muP off), and records the mean |activation| of each layer type at every step. Under
muP the curves are flat in width; under SP they blow up after the first Adam step
(Tensor Programs V, microsoft/mup's `get_coord_data`).

    python -m crystal.mup.coord_check --widths=64,128,256,512,1024 --steps=4 --out=DIR

writes DIR/coord_check.json, `{"mup"|"sp": {layer_type: {width: [value at t=0..steps]}}}`
(t=0 is the init, t=i after i updates), DIR/coord_check_meta.json (what was run) and
DIR/coord_check.png.
"""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import sentencepiece as spm

from crystal import cli, fileio
from crystal import config as config_lib
from crystal import model as model_lib
from crystal import optim
from crystal.data import manifest as man_lib
from crystal.data import prepare
from crystal.metrics import plots
from crystal.errors import UsageError
from crystal.train import step as step_lib

LAYER_TYPES = ("embedding", "attn_logits", "attn_out", "mlp_out", "residual", "output_logits")
PARAMETRIZATIONS = ("mup", "sp")


# ----------------------------------------------------------------------------- configs


def at_width(cfg, width: int, mup: bool, head_dim: int | None = None,
             ffn_ratio: float | None = None, num_layers: int | None = None,
             seq_len: int | None = None, vocab_size: int | None = None):
    """`cfg` resized to d_model=width: fixed head_dim, ffn_dim ~ width (multiple of 8).

    Under muP the base width and base hyperparameters stay those of `cfg`; SP keeps the one
    init std at every width. Only shape fields change, so the width rules come from
    crystal.mup.rules exactly as in a real run.
    """
    c = copy.deepcopy(cfg)
    m = c.model
    head_dim = int(head_dim or config_lib.head_dim(cfg))
    ffn_ratio = float(ffn_ratio or cfg.model.ffn_dim / cfg.model.d_model)
    if width % head_dim:
        raise config_lib.ConfigError(f"width {width}: not a multiple of head_dim {head_dim}")
    m.d_model = int(width)
    m.num_heads = width // head_dim
    m.ffn_dim = max(8, int(round(width * ffn_ratio / 8.0)) * 8)
    if num_layers:
        m.num_layers = int(num_layers)
    if seq_len:
        c.data.seq_len = int(seq_len)
        m.max_seq_len = max(int(seq_len), 8)
    if vocab_size:
        m.vocab_size = int(vocab_size)
        c.tokenizer.vocab_size = int(vocab_size) - len(c.tokenizer.special_tokens)
    m.scan_layers = True
    m.remat = "none"
    m.compute_dtype = "float32"
    c.mup.enabled = bool(mup)
    return config_lib.validate(c)


def constant_lr(cfg, lr: float, steps: int, stage: int = 1):
    """`cfg` whose stage `stage` runs `steps` steps at a constant `lr` (no warmup)."""
    c = copy.deepcopy(cfg)
    s = config_lib.stage(c, stage)
    s.steps = int(steps)
    s.schedule.update(dict(warmup_steps=0, peak_lr=float(lr), end_lr=float(lr),
                           decay_steps=0))
    return c


# ----------------------------------------------------------------------------- data


def stdlib_text_tokens(vocab_size: int, num_tokens: int, num_files: int = 40):
    """Real text as real sentencepiece ids: a BPE model trained in memory on Python's stdlib.

    Needs no prepared workdir, so the CI check stands alone; deterministic (sorted files,
    one trainer thread).
    """
    lib = Path(os.__file__).parent
    lines = []
    for f in sorted(lib.glob("*.py"))[:num_files]:
        lines += [ln for ln in f.read_text(encoding="utf-8", errors="replace").splitlines()
                  if ln.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=int(vocab_size),
        model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=1,
        minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    ids, i = [], 0
    while len(ids) < num_tokens and i < len(lines):
        ids += sp.encode(lines[i]) + [sp.eos_id()]
        i += 1
    if len(ids) < num_tokens:
        raise ValueError(f"stdlib text gives {len(ids)} tokens, {num_tokens} needed")
    return np.asarray(ids[:num_tokens], np.int32)


def stdlib_batch(batch_size: int, seq_len: int, vocab_size: int):
    """A (batch, seq_len + 1) batch of stdlib text tokens (the data_format.md row shape)."""
    toks = stdlib_text_tokens(vocab_size, batch_size * (seq_len + 1))
    return toks.reshape(batch_size, seq_len + 1)


def prepared_batch(cfg, workdir: str, batch_size: int, seq_len: int):
    """The first rows of the first train shard of a prepared workdir (prepared if needed)."""
    prepare.ensure_prepared(cfg, workdir)
    manifest, _ = man_lib.read(workdir)
    group = man_lib.group_names(manifest)[0]
    path = man_lib.data_dir(workdir) / manifest["groups"][group]["shards"][0]["path"]
    rows = np.load(path, mmap_mode="r", allow_pickle=False)
    if rows.shape[0] < batch_size or rows.shape[1] < seq_len + 1:
        raise ValueError(f"{path}: shape {rows.shape} has too few rows/tokens for "
                         f"batch {batch_size} x {seq_len + 1}")
    return np.asarray(rows[:batch_size, : seq_len + 1], np.int32)


# ----------------------------------------------------------------------------- the check


def summarize(intermediates) -> dict:
    """{layer_type: scalar}: sown mean |activation|s, averaged over layers."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
        names = [k.key for k in path if hasattr(k, "key")]
        out.setdefault(names[-1], []).append(jnp.mean(leaf))
    return {k: jnp.mean(jnp.stack(v)) for k, v in out.items()}


def loss_fn(params, batch_BxL1, spec):
    """The training loss (crystal.train.step.token_losses) on rows of seq_len + 1 tokens,
    averaged over every token, with the sown activation sizes."""
    rows = jnp.asarray(batch_BxL1)
    batch = dict(inputs=rows[:, :-1], targets=rows[:, 1:],
                 loss_mask=jnp.ones(rows[:, 1:].shape, jnp.float32))
    loss_BxL, mask_BxL, inter = step_lib.token_losses(params, batch, spec, capture=True)
    return loss_BxL.sum() / mask_BxL.sum(), summarize(inter)


# XLA CPU options that cut compile time ~2x; a coordinate check is compile-bound (one
# compile per width and parametrization, a handful of steps each).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def coord_data(cfg, batch_BxL1, steps: int, seed: int = 0, fast_compile: bool = True) -> dict:
    """{layer_type: [mean |act| at t=0..steps]} and 'loss' for one width and parametrization.

    One jitted step returns the activations of the params it starts from, so steps + 1
    calls record t = 0..steps (the last call's update is discarded).
    """

    opt = optim.make_optimizer(cfg, 1)
    spec = model_lib.ModelSpec.from_config(cfg)
    fast = FAST_COMPILE if fast_compile else None
    params = jax.jit(lambda k: model_lib.init(cfg, k), compiler_options=fast)(
        jax.random.key(seed))
    state = opt.init(params)

    @jax.jit(compiler_options=fast)
    def step(params, state, batch):
        (loss, acts), g = jax.value_and_grad(
            lambda p: loss_fn(p, batch, spec), has_aux=True)(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss, acts

    batch = jnp.asarray(batch_BxL1)
    rec: dict = {}
    for _ in range(steps + 1):
        params, state, loss, acts = step(params, state, batch)
        for k, v in list(acts.items()) + [("loss", loss)]:
            rec.setdefault(k, []).append(float(v))
    return rec


def run(cfg, widths, steps: int, lr: float, batch_BxL1, head_dim=None, ffn_ratio=None,
        num_layers=None, vocab_size=None, seed: int = 0, fast_compile: bool = True,
        log=None) -> dict:
    """The coord_check.json dict for every width under muP and SP (plus 'loss')."""
    seq_len = batch_BxL1.shape[1] - 1
    data = {p: {} for p in PARAMETRIZATIONS}
    for p in PARAMETRIZATIONS:
        for w in widths:
            c = at_width(cfg, w, mup=(p == "mup"), head_dim=head_dim, ffn_ratio=ffn_ratio,
                         num_layers=num_layers, seq_len=seq_len, vocab_size=vocab_size)
            rec = coord_data(constant_lr(c, lr, steps), batch_BxL1, steps, seed, fast_compile)
            for k, v in rec.items():
                data[p].setdefault(k, {})[str(w)] = v
            if log:
                log(f"{p:3s} width {w:5d}: " + " ".join(
                    f"{k}={rec[k][-1]:.3g}" for k in LAYER_TYPES if k in rec)
                    + f" loss={rec['loss'][-1]:.3f}")
    return data


def spread(data: dict, parametrization: str, layer_type: str, t: int = -1) -> float:
    """max / min over widths of a layer type's value at step t (1 means flat in width)."""
    vals = [v[t] for v in data[parametrization][layer_type].values()]
    return max(vals) / min(vals)


# ----------------------------------------------------------------------------- outputs


def plot(data: dict, path, title: str = ""):
    """microsoft/mup style: one panel per (parametrization, layer type), x = width (log2),
    y = mean |activation| (log), one line per training step."""
    plt = plots.plt
    types = [k for k in LAYER_TYPES if k in data["mup"]]
    fig, axes = plt.subplots(len(PARAMETRIZATIONS), len(types),
                             figsize=(3.0 * len(types), 2.8 * len(PARAMETRIZATIONS)),
                             squeeze=False)
    for i, p in enumerate(PARAMETRIZATIONS):
        for j, k in enumerate(types):
            ax = axes[i][j]
            widths = sorted(data[p][k], key=int)
            n = len(data[p][k][widths[0]])
            cmap = plt.get_cmap("viridis")
            for t in range(n):
                ax.plot([int(w) for w in widths], [data[p][k][w][t] for w in widths],
                        marker="o", ms=3, color=cmap(t / max(n - 1, 1)), label=f"t={t}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{p.upper()}: {k}", fontsize=9)
            if i == len(PARAMETRIZATIONS) - 1:
                ax.set_xlabel("width")
            if j == 0:
                ax.set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plots.save_png(fig, path, dpi=110)


# ----------------------------------------------------------------------------- CLI


FLAGS = (
    cli.Flag("widths", "widths to train (two or more)", list, ["64", "128", "256", "512",
                                                             "1024"]),
    cli.Flag("steps", "Adam steps (records t=0..steps)", int, 4),
    cli.Flag("lr", "constant base LR (0: the config's stage 1 peak LR)", float, 0.0),
    cli.Flag("batch_size", "rows of the fixed batch", int, 4),
    cli.Flag("seq_len", "tokens per row", int, 32),
    cli.Flag("num_layers", "layers at every width", int, 2),
    cli.Flag("head_dim", "fixed head dim (0: the config's)", int, 0),
    cli.Flag("vocab_size", "model vocab for stdlib text (a prepared workdir uses the "
             "config's)", int, 512),
    cli.Flag("workdir", "take the batch from this prepared workdir ('': train a "
             "sentencepiece model on Python's stdlib text)", str, ""),
    cli.Flag("seed", "init seed", int, 0),
    cli.Flag("full_compile", "full XLA optimisation (default: faster-compiling options)",
             bool, False),
    cli.Flag("out", "output folder", required=True),
)


def _check_flags(a) -> list[int]:
    try:
        widths = [int(w) for w in a.widths]
    except ValueError:
        raise UsageError(f"--widths={','.join(a.widths)}: expected integers") from None
    if len(widths) < 2 or min(widths) <= 0:
        raise UsageError(f"--widths={','.join(a.widths)}: need two or more positive widths")
    if a.steps < 1:
        raise UsageError(f"--steps={a.steps}: must be >= 1")
    return widths


def main(argv=None):
    return cli.run(_main, doc=__doc__.split("\n\n")[0], flags=FLAGS, config=cli.CONFIG_REQUIRED,
            argv=argv)


def _main(a):
    cfg = a.cfg
    widths = _check_flags(a)
    lr = a.lr or float(config_lib.stage(cfg, 1).schedule.peak_lr)
    if a.workdir:
        batch, vocab = prepared_batch(cfg, a.workdir, a.batch_size, a.seq_len), None
    else:
        batch = stdlib_batch(a.batch_size, a.seq_len, a.vocab_size)
        vocab = a.vocab_size + len(cfg.tokenizer.special_tokens)
    data = run(cfg, widths, a.steps, lr, batch, head_dim=a.head_dim or None,
               num_layers=a.num_layers, vocab_size=vocab, seed=a.seed,
               fast_compile=not a.full_compile, log=lambda s: print(s, flush=True))
    out = Path(a.out)
    fileio.write_json(out / "coord_check.json", data)
    meta = dict(config=a.config_file or cli.default_config(), widths=widths, steps=a.steps,
                lr=lr, batch_size=a.batch_size, seq_len=a.seq_len, num_layers=a.num_layers,
                head_dim=a.head_dim or config_lib.head_dim(cfg), seed=a.seed,
                base_width=int(cfg.mup.base_width), data=a.workdir or "stdlib-sentencepiece",
                spread_last_step={p: {k: spread(data, p, k) for k in LAYER_TYPES}
                                  for p in PARAMETRIZATIONS})
    fileio.write_json(out / "coord_check_meta.json", meta)
    plot(data, out / "coord_check.png",
         title=f"coordinate check: {a.steps} Adam steps at lr {lr:g}, base width "
               f"{cfg.mup.base_width}")
    for p in PARAMETRIZATIONS:
        print(f"{p}: max/min over widths at t={a.steps}: " + " ".join(
            f"{k}={meta['spread_last_step'][p][k]:.2f}" for k in LAYER_TYPES))
    print(f"wrote {out / 'coord_check.json'} and {out / 'coord_check.png'}")


if __name__ == "__main__":
    raise SystemExit(main())
