"""How a train step's cost grows: step time and peak memory as sequence length and width
double, as a table and a PNG.

    python benchmarks/scaling.py [--seq_lens=128,256,512,1024] [--widths=128,256,512,1024]
        [--seq_len=256] [--width=256] [--layers=4] [--batch=4] [--rounds=3] [--png=F]

Amber-shaped models (RMSNorm, RoPE, SwiGLU with ffn = 43/16 x width, 64-wide heads, vocab
2048), float32, the real jitted crystal train step (forward, backward, clipping, AdamW).
Two sweeps: sequence length at --width, and width at --seq_len. For each point: the best
step time of --rounds, and the step's peak memory from XLA's memory analysis of the
compiled program (arguments + outputs - aliased + temporaries: what the device would need,
the same figure crystal.plan reports). The `x` columns are each figure over the previous
row's: a doubling costs 2x where work is linear in it, 4x where quadratic (attention in
sequence length, matmuls in width).
"""

from __future__ import annotations

import time

import host
import jax
import matplotlib.pyplot as plt
import numpy as np

from crystal import cli, config, optim, train
from crystal.metrics import plots

FLAGS = (
    cli.Flag("seq_lens", "sequence lengths of the first sweep", list, ["128", "256", "512",
                                                                       "1024"]),
    cli.Flag("widths", "widths (d_model) of the second sweep", list, ["128", "256", "512",
                                                                     "1024"]),
    cli.Flag("seq_len", "sequence length of the width sweep", int, 256),
    cli.Flag("width", "width of the sequence-length sweep", int, 256),
    cli.Flag("layers", "layers", int, 4),
    cli.Flag("batch", "sequences per step", int, 4),
    cli.Flag("rounds", "timed steps per point (best of)", int, 3),
    cli.Flag("png", "where to draw the PNG ('' = none)", str, "scaling.png"),
)


def measure(width: int, seq: int, layers: int, batch: int, rounds: int) -> tuple[float, int]:
    """(best step seconds, planned peak bytes) of one point."""
    cfg = config.load("amber_tiny", {
        "model.d_model": width, "model.num_heads": max(1, width // 64),
        "model.ffn_dim": width * 43 // 16, "model.num_layers": layers,
        "model.vocab_size": 2048, "model.max_seq_len": seq, "data.seq_len": seq,
        "model.compute_dtype": "float32", "train.global_batch_size": batch})
    opt = optim.make_optimizer(cfg, 1)
    state = train.init_state(cfg, jax.random.key(0), opt)
    toks = np.random.default_rng(0).integers(0, 2048, (batch, seq + 1)).astype(np.int32)
    b = jax.device_put(dict(inputs=toks[:, :-1], targets=toks[:, 1:],
                            loss_mask=np.ones((batch, seq), np.float32)))
    step = jax.jit(train.make_train_step(cfg, opt), donate_argnums=0).lower(state, b).compile()
    m = step.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)
    state, out = step(state, b)                     # warm-up
    jax.block_until_ready(out["loss"])
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        state, out = step(state, b)
        jax.block_until_ready(out["loss"])
        best = min(best, time.perf_counter() - t)
    return best, int(peak)


def sweep(name: str, points, a) -> list[tuple[int, float, int]]:
    rows = []
    print(f"{name:>8} {'step ms':>9} {'x':>5} {'peak MiB':>9} {'x':>5}")
    for p in points:
        width, seq = (a.width, p) if name == "seq_len" else (p, a.seq_len)
        t, mem = measure(width, seq, a.layers, a.batch, a.rounds)
        gt = f"{t / rows[-1][1]:5.2f}" if rows else f"{'':5}"
        gm = f"{mem / rows[-1][2]:5.2f}" if rows else f"{'':5}"
        print(f"{p:>8} {t * 1e3:9.1f} {gt} {mem / 2**20:9.1f} {gm}", flush=True)
        rows.append((p, t, mem))
    return rows


def draw(png, sweeps: dict, a):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for ax, (name, rows) in zip(axes, sweeps.items()):
        xs = [r[0] for r in rows]
        ax.loglog(xs, [r[1] * 1e3 for r in rows], "o-", base=2, label="step time (ms)")
        ax.loglog(xs, [r[2] / 2**20 for r in rows], "s--", base=2, label="peak memory (MiB)")
        ax.set_xlabel(name)
        fixed = f"width {a.width}" if name == "seq_len" else f"seq_len {a.seq_len}"
        ax.set_title(f"{name} doubling ({fixed}, {a.layers} layers, batch {a.batch})")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    plots.save_png(fig, png)


def _main(a):
    print(f"host: {host.cpu()}; float32, {a.layers} layers, batch {a.batch}, best of "
          f"{a.rounds}")
    sweeps = {"seq_len": sweep("seq_len", [int(x) for x in a.seq_lens], a),
              "width": sweep("width", [int(x) for x in a.widths], a)}
    if a.png:
        draw(a.png, sweeps, a)
        print(f"plot: {a.png}")


if __name__ == "__main__":
    raise SystemExit(cli.run(_main, doc=__doc__.split("\n\n")[0], flags=FLAGS,
                             config=cli.CONFIG_NONE))
