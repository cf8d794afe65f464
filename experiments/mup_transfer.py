"""Learning-rate transfer across widths, muP versus SP (Tensor Programs V, Figure 1).

    python -m experiments.mup_transfer --out=experiments/results/mup_transfer [--quick]

Trains every width x learning rate (a 2x grid) x {muP, SP} on the bundled sample corpus
(prepared by crystal.data.prepare) with crystal's model and optimizer, and writes

    results.json     every run's final train/val loss and loss curve, the command, machine
    loss_table.md    the loss table and the optimum LR per width
    mup_transfer.png training loss versus log2(LR), one curve per width, muP | SP

All runs of one width share the init, the batches and their order. The LRs of one width
train together, vmapped, in one compiled step: crystal.optim's update is linear in the base
LR (u = -lr(t) x mult x (adam + wd x p)), so each run is the optimizer built at base LR 1
times its own LR; the script checks that identity before it trusts it.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from crystal import cli, fileio, optim
from crystal import config as config_lib
from crystal import model as model_lib
from crystal.data import manifest as man_lib
from crystal.data import prepare
from crystal.metrics import plots
from crystal.errors import UsageError
from crystal.mup import coord_check

# The CPU-sized sweep (< 10 min on 2 cores): the full sweep's widths and grid, fewer and
# smaller steps.
QUICK = dict(widths="64,128,256,512", log2_lrs="-12:-4", steps=80, batch_size=4, seq_len=32)


def parse_log2_lrs(spec: str) -> list[int]:
    """'-13:-5' -> [-13, ..., -5] (a 2x grid); or an explicit list '-12,-10,-8'."""
    try:
        if ":" in spec:
            lo, hi = (int(x) for x in spec.split(":"))
            return list(range(lo, hi + 1))
        return sorted(int(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"--log2_lrs={spec}: expected 'LO:HI' or a comma list of ints")


# ----------------------------------------------------------------------------- data


def load_rows(workdir) -> tuple[np.ndarray, np.ndarray]:
    """All train rows and all val rows of a prepared workdir (every group, sorted order)."""
    root = man_lib.data_dir(workdir)
    man, _ = man_lib.read(workdir)
    train, val = [], []
    for g in man_lib.group_names(man):
        for ch in man["groups"][g]["shards"]:
            train.append(np.load(root / ch["path"], mmap_mode="r", allow_pickle=False))
        if man["groups"][g].get("val"):
            val.append(np.load(root / man["groups"][g]["val"]["path"], mmap_mode="r",
                               allow_pickle=False))
    return (np.concatenate(train).astype(np.int32),
            np.concatenate(val).astype(np.int32) if val else np.zeros((0, 0), np.int32))


# ----------------------------------------------------------------------------- training


def sweep_config(cfg, width, mup, steps, warmup, end_ratio, num_layers, seq_len, head_dim):
    """The width's config; stage 1 is the sweep's schedule at base LR 1 (see module doc)."""
    c = coord_check.at_width(cfg, width, mup=mup, head_dim=head_dim, num_layers=num_layers,
                             seq_len=seq_len)
    s = config_lib.stage(c, 1)
    s.steps = int(steps)
    s.schedule.update(dict(kind="linear", warmup_steps=int(warmup), peak_lr=1.0,
                           end_lr=float(end_ratio), decay_steps=0))
    return c


def check_lr_linearity(cfg, params):
    """crystal.optim's update at base LR x equals x times the update at base LR 1."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    g = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    c2 = copy.deepcopy(cfg)
    sc = config_lib.stage(c2, 1).schedule
    sc.peak_lr, sc.end_lr = 0.01 * sc.peak_lr, 0.01 * sc.end_lr
    outs = []
    for c in (cfg, c2):
        opt = optim.make_optimizer(c, 1)
        s = opt.init(params)
        for _ in range(3):  # past step 0 (warmup LR 0)
            u, s = opt.update(g, s, params)
        outs.append(u)
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        np.testing.assert_allclose(np.asarray(b), 0.01 * np.asarray(a), rtol=1e-5, atol=1e-12)


def train_width(cfg, lrs, train_BxL1, val_BxL1, batch_size, seed, check=False):
    """Trains one width at every LR (vmapped): (losses steps x R, val loss R, s/step)."""

    steps = int(config_lib.stage(cfg, 1).steps)
    opt = optim.make_optimizer(cfg, 1)
    fast = coord_check.FAST_COMPILE  # init and eval run once: compile time dominates
    params = jax.jit(lambda k: model_lib.init(cfg, k), compiler_options=fast)(
        jax.random.key(seed))
    if check:
        check_lr_linearity(cfg, params)
    R = len(lrs)
    params_R = jax.tree.map(lambda x: jnp.broadcast_to(x, (R,) + x.shape), params)
    state_R = jax.vmap(opt.init)(params_R)
    lrs_R = jnp.asarray(lrs, jnp.float32)

    def one(p, s, lr, batch):
        loss, g = jax.value_and_grad(lambda q: coord_check.loss_fn(q, batch, cfg))(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, jax.tree.map(lambda x: lr * x, u)), s, loss

    step = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None)), donate_argnums=(0, 1))
    evaluate = jax.jit(jax.vmap(lambda p, b: coord_check.loss_fn(p, b, cfg),
                                in_axes=(0, None)), compiler_options=fast)
    losses = []
    t_first = None
    for t in range(steps):
        if t == 1:
            jax.block_until_ready(params_R)
            t_first = time.time()
        batch = jnp.asarray(train_BxL1[t * batch_size:(t + 1) * batch_size])
        params_R, state_R, loss_R = step(params_R, state_R, lrs_R, batch)
        losses.append(loss_R)
    losses = np.asarray(jnp.stack(losses), np.float64)  # steps x R
    step_s = (time.time() - t_first) / (steps - 1) if steps > 1 else float("nan")
    val = []
    for i in range(0, len(val_BxL1) - batch_size + 1, batch_size):
        val.append(np.asarray(evaluate(params_R, jnp.asarray(val_BxL1[i:i + batch_size]))))
    val_R = np.mean(val, axis=0) if val else np.full(R, np.nan)
    return losses, val_R, step_s


def final_train_loss(losses_TxR, frac=0.1):
    """Mean training loss over the last `frac` of steps (NaN/inf runs stay non-finite)."""
    k = max(1, int(round(frac * losses_TxR.shape[0])))
    return losses_TxR[-k:].mean(axis=0)


def optimum(log2_lrs, loss_R) -> int | None:
    """log2 of the best LR (None if every run diverged)."""
    ok = [(l, x) for l, x in zip(log2_lrs, loss_R) if math.isfinite(x)]
    return min(ok, key=lambda t: t[1])[0] if ok else None


# ----------------------------------------------------------------------------- outputs


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), platform=platform.platform(),
                python=platform.python_version(), jax=jax.__version__,
                backend=jax.default_backend(), devices=[str(d) for d in jax.devices()][:1])


def loss_table(res: dict) -> str:
    lines = [f"# muP LR transfer: {res['mode']} mode", "",
             f"Command: `{res['command']}`  ",
             f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores "
             f"({res['machine']['backend']}), wall {res['wall_s']:.0f} s"
             + (f", CPU {res['cpu_s']:.0f} s, load average {res['load_avg_1m']:.1f}"
                if "cpu_s" in res else "") + "  ",
             f"Setup: {res['setup']}", ""]
    lrs = res["log2_lrs"]
    for p in ("mup", "sp"):
        lines += [f"## {p.upper()}: final training loss (mean of last 10% of steps)", "",
                  "| width | " + " | ".join(f"2^{l}" for l in lrs)
                  + " | best LR | val loss at best |",
                  "|---" * (len(lrs) + 3) + "|"]
        for w, r in res["runs"][p].items():
            cells = [f"{x:.3f}" if x is not None else "div" for x in r["train_loss"]]
            b = r["best_log2_lr"]
            bi = lrs.index(b) if b is not None else None
            cells = [f"**{c}**" if i == bi else c for i, c in enumerate(cells)]
            vb = r["val_loss"][bi] if bi is not None else None
            lines.append(f"| {w} | " + " | ".join(cells) + f" | "
                         f"{'2^%d = %.3g' % (b, 2.0 ** b) if b is not None else '-'} | "
                         f"{'%.3f' % vb if vb is not None else '-'} |")
        lines.append("")
    lines += ["## Optimum LR per width", "",
              "| width | muP best | SP best |", "|---|---|---|"]
    for w in res["runs"]["mup"]:
        cells = []
        for p in ("mup", "sp"):
            b = res["runs"][p][w]["best_log2_lr"]
            cells.append(f"2^{b} = {2.0 ** b:.3g}" if b is not None else "-")
        lines.append(f"| {w} | {cells[0]} | {cells[1]} |")
    s = res["summary"]
    lines += ["", f"muP optimum spread: {s['mup_optimum_spread_octaves']} octaves; "
              f"SP: {s['sp_optimum_spread_octaves']} octaves. muP wider-is-better at the "
              f"muP optimum: {s['mup_wider_is_better']}.", ""]
    return "\n".join(lines)


def plot(res: dict, path):
    plt = plots.plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    lrs = res["log2_lrs"]
    finite = [x for p in ("mup", "sp") for r in res["runs"][p].values()
              for x in r["train_loss"] if x is not None]
    lo, hi = min(finite), min(max(finite), min(finite) + 4.0)
    cmap = plt.get_cmap("viridis")
    for ax, p in zip(axes, ("mup", "sp")):
        runs = res["runs"][p]
        for i, (w, r) in enumerate(runs.items()):
            y = [x if x is not None else np.nan for x in r["train_loss"]]
            col = cmap(i / max(len(runs) - 1, 1))
            ax.plot(lrs, y, marker="o", ms=3, color=col, label=f"width {w}")
            if r["best_log2_lr"] is not None:
                ax.plot([r["best_log2_lr"]], [min(x for x in y if np.isfinite(x))],
                        marker="*", ms=12, color=col)
        ax.set_title("muP" if p == "mup" else "SP (standard parametrization)")
        ax.set_xlabel("log2(learning rate)")
        ax.set_ylim(lo - 0.05, hi)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"training loss (last 10% of {res['setup']['steps']} steps)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"LR transfer on the sample corpus ({res['mode']} mode, base width "
                 f"{res['setup']['base_width']})", fontsize=10)
    fig.tight_layout()
    plots.save_png(fig, path, dpi=120)


# ----------------------------------------------------------------------------- CLI


FLAGS = (
    cli.Flag("out", "output folder", required=True),
    cli.Flag("workdir", "where the sample corpus is prepared (reused if present); '' = "
             "runs/mup_transfer_data/seqN", str, ""),
    cli.Flag("quick", "the CPU-sized sweep: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
             bool, False),
    cli.Flag("widths", "widths to sweep", str, "64,128,256,512"),
    cli.Flag("log2_lrs", "log2 LR grid, 'LO:HI' or a list", str, "-12:-4"),
    cli.Flag("steps", "steps per run", int, 300),
    cli.Flag("warmup_frac", "warmup share of the steps", float, 0.1),
    cli.Flag("end_ratio", "final LR / peak LR", float, 0.1),
    cli.Flag("batch_size", "rows per step", int, 8),
    cli.Flag("seq_len", "tokens per row", int, 64),
    cli.Flag("num_layers", "layers at every width", int, 2),
    cli.Flag("head_dim", "fixed head dim (0: the config's)", int, 0),
    cli.Flag("val_rows", "validation rows", int, 128),
    cli.Flag("seed", "seed of the data order and inits", int, 0),
)
SWEEP_KNOBS = {"widths", "log2_lrs", "steps", "batch_size", "seq_len", "num_layers",
               "head_dim", "warmup_frac", "end_ratio"}


def _setup(a):
    """(widths, log2_lrs, train rows, val rows) for the sweep; data prepared if needed."""
    widths = [int(w) for w in str(a.widths).split(",") if w.strip()]
    log2_lrs = parse_log2_lrs(str(a.log2_lrs))
    if len(log2_lrs) < 2 or a.steps < 1:
        raise UsageError("--log2_lrs/--steps: need two or more LRs and steps >= 1")
    prep_len = max(int(a.seq_len), 64)  # rows are cut to seq_len + 1 below
    data_cfg = config_lib.with_overrides(config_lib.read(a.config_file or cli.default_config()),
                                         {**a.overrides, "data.seq_len": prep_len,
                                          "model.max_seq_len": max(prep_len, 128)})
    a.workdir = a.workdir or f"runs/mup_transfer_data/seq{prep_len}"
    prepare.ensure_prepared(data_cfg, a.workdir)
    train, val = load_rows(a.workdir)
    need = a.steps * a.batch_size
    if len(train) < need:
        raise UsageError(f"{a.workdir}: {len(train)} train rows, {need} needed")
    order = np.random.default_rng(a.seed).permutation(len(train))[:need]
    return widths, log2_lrs, train[order][:, : a.seq_len + 1], val[: a.val_rows, : a.seq_len + 1]


def _clean(xs):
    return [float(x) if np.isfinite(x) else None for x in xs]


def _sweep(a, cfg, widths, log2_lrs, train, val):
    """({mup|sp: {width: run record}}, {mup|sp: {width: loss curves}})."""
    lrs = [2.0 ** l for l in log2_lrs]
    warmup = int(round(a.warmup_frac * a.steps))
    runs, curves = {"mup": {}, "sp": {}}, {"mup": {}, "sp": {}}
    for w in widths:
        for pz in ("mup", "sp"):
            c = sweep_config(cfg, w, pz == "mup", a.steps, warmup, a.end_ratio, a.num_layers,
                             a.seq_len, a.head_dim or None)
            t = time.time()
            losses, val_R, step_s = train_width(c, lrs, train, val, a.batch_size, a.seed,
                                                check=(w == widths[0]))
            fl = final_train_loss(losses)
            best = optimum(log2_lrs, fl)
            runs[pz][str(w)] = dict(train_loss=_clean(fl), val_loss=_clean(val_R),
                                    best_log2_lr=best, seconds=round(time.time() - t, 1),
                                    step_seconds=round(step_s, 3))
            every = max(1, a.steps // 50)
            curves[pz][str(w)] = [_clean(losses[i]) for i in range(0, a.steps, every)]
            print(f"{pz:3s} width {w:4d} ({time.time() - t:5.0f} s): best 2^{best} " + " ".join(
                f"{l}:{x:.3f}" for l, x in zip(log2_lrs, fl)), flush=True)
    return runs, curves


def _summary(runs) -> dict:
    def spread(pz):
        b = [r["best_log2_lr"] for r in runs[pz].values()]
        return (max(b) - min(b)) if None not in b else None

    bests = []
    for r in runs["mup"].values():
        f = [x for x in r["train_loss"] if x is not None]
        bests.append(min(f) if f else math.inf)
    return dict(mup_optimum_spread_octaves=spread("mup"), sp_optimum_spread_octaves=spread("sp"),
                mup_wider_is_better=all(b2 < b1 for b1, b2 in zip(bests, bests[1:])))


def _setup_record(a, cfg, need, n_val, warmup) -> dict:
    return dict(config=a.config_file or cli.default_config(), base_width=int(cfg.mup.base_width),
                steps=a.steps, warmup_steps=warmup, schedule="linear warmup, linear decay to "
                f"{a.end_ratio} x peak", batch_size=a.batch_size, seq_len=a.seq_len,
                num_layers=a.num_layers, head_dim=a.head_dim or config_lib.head_dim(cfg),
                ffn_ratio=cfg.model.ffn_dim / cfg.model.d_model, seed=a.seed,
                data=f"sample corpus, all groups, {need} rows in a seeded shuffle",
                val_rows=n_val, optimizer="crystal.optim.make_optimizer (AdamW b1 "
                f"{cfg.optim.b1} b2 {cfg.optim.b2}, wd {cfg.optim.weight_decay}, "
                f"clip {cfg.optim.clip_norm})",
                sp=f"muP off: one init std {cfg.model.init_std}, multipliers 1, attention "
                   "1/sqrt(head_dim)")


def _main(a, argv):
    mode = "quick" if a.quick else ("custom" if a.given & SWEEP_KNOBS else "full")
    if a.quick:
        for k, v in QUICK.items():
            if k not in a.given:
                setattr(a, k, v)
    t0, c0 = time.time(), time.process_time()
    cfg = a.cfg
    widths, log2_lrs, train, val = _setup(a)
    runs, curves = _sweep(a, cfg, widths, log2_lrs, train, val)
    warmup = int(round(a.warmup_frac * a.steps))
    res = dict(
        mode=mode, command="python -m experiments.mup_transfer " + " ".join(argv),
        machine=machine(), wall_s=time.time() - t0, cpu_s=time.process_time() - c0,
        load_avg_1m=os.getloadavg()[0], log2_lrs=log2_lrs, lrs=[2.0 ** l for l in log2_lrs],
        widths=widths, setup=_setup_record(a, cfg, len(train), len(val), warmup), runs=runs,
        summary=_summary(runs), curves=dict(every=max(1, a.steps // 50), loss=curves))
    out = Path(a.out)
    fileio.write_json(out / "results.json", res)
    with fileio.atomic_open(out / "loss_table.md", "w") as f:
        f.write(loss_table(res))
    plot(res, out / "mup_transfer.png")
    print(loss_table(res))
    print(f"wrote {out}/results.json, loss_table.md, mup_transfer.png "
          f"({time.time() - t0:.0f} s)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    return cli.run(lambda a: _main(a, argv), doc=__doc__.split("\n\n")[0], flags=FLAGS,
                   config=cli.CONFIG_REQUIRED, argv=argv, prog="python -m experiments.mup_transfer")


if __name__ == "__main__":
    raise SystemExit(main())
