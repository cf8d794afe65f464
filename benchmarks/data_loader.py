"""Loader throughput per process against what training consumes, and the cost of a resume.

    python benchmarks/data_loader.py [--workdir=DIR] [--seq_lens=128,2048] [--batches=30]
        [--workers=0,2] [--threads=2] [--mfu=0.4] [--peak_flops=989e12]
        [--devices_per_process=8] [--tiny_step_s=0.02] [--json_out=FILE]

For each sequence length the sample corpus is prepared with the tiny CrystalCoder config at
that length (2048 is the 7B length: longer rows, more FIM work per row), then every stage
is read for --batches steps of the 7B-shaped global batch (2112 rows over 16 processes),
in process 0's share, timing tokens/s after one warm-up batch. A 7B training process
consumes devices_per_process x peak_flops x mfu / (6 x params) tokens/s, the tiny config
one batch (16 x 128) per --tiny_step_s; the table prints the measured rate against both.
Resume cost: building a loader and restoring it at step 1 vs at step 999,999 of a
million-step stage, up to its first batch.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time

from absl import app, flags

from crystal import config as cfg_lib
from crystal.data import prepare
from crystal.data.loader import StageLoader

flags.DEFINE_string("workdir", "", "Where to prepare the data ('' = a temp dir).")
flags.DEFINE_list("seq_lens", ["128", "2048"], "Sequence lengths to measure.")
flags.DEFINE_integer("batches", 30, "Timed batches per stage and setting.")
flags.DEFINE_integer("batch_size", 132, "Rows per process per step (7B: 2112 / 16).")
flags.DEFINE_list("workers", ["0", "2"], "grain worker process counts to try.")
flags.DEFINE_integer("threads", 2, "grain reader threads per process.")
flags.DEFINE_float("sample_max_mb", 8.0, "Sample corpus size.")
flags.DEFINE_float("peak_flops", 989e12, "Accelerator peak FLOP/s (H100 bf16 dense).")
flags.DEFINE_float("mfu", 0.4, "Assumed model FLOP utilisation.")
flags.DEFINE_integer("devices_per_process", 8, "Accelerators fed by one loader process.")
flags.DEFINE_float("tiny_step_s", 0.02, "Assumed train step time of the tiny config on one "
                   "device (a 0.7M-parameter model is launch-bound, never FLOP-bound).")
flags.DEFINE_string("json_out", "", "Also write the results here.")
FLAGS = flags.FLAGS


def num_params(cfg) -> int:
    """Dense parameter count (embeddings counted once if tied; norms/biases ignored)."""
    m = cfg.model
    emb = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    return emb + m.num_layers * (4 * m.d_model ** 2 + 3 * m.d_model * m.ffn_dim)


def needed_tokens_per_s(cfg) -> float:
    """Tokens/s one loader process must deliver to keep its devices busy."""
    if cfg.name.endswith("_tiny"):
        return cfg.train.global_batch_size * cfg.data.seq_len / FLAGS.tiny_step_s
    return FLAGS.devices_per_process * FLAGS.peak_flops * FLAGS.mfu / (6 * num_params(cfg))


def measure(overrides, wd, stage, workers) -> dict:
    cfg = cfg_lib.load("crystalcoder_tiny", {**overrides, "data.loader_workers": workers})
    ld = StageLoader(cfg, wd, stage, process_index=0, process_count=PROCESSES)
    ld.set_state(dict(ld.get_state(), step=5))
    next(ld)                                        # warm-up: workers, mmaps, sentencepiece
    t = time.perf_counter()
    n = 0
    for _ in range(FLAGS.batches):
        b = next(ld)
        n += b["inputs"].size
    dt = time.perf_counter() - t
    ld.close()
    return dict(stage=stage, workers=workers, tokens_per_s=n / dt, s_per_batch=dt / FLAGS.batches)


def resume_cost(cfg, wd, stage) -> dict:
    out = {}
    for label, step in (("step_1", 1), ("last_step", None)):
        t = time.perf_counter()
        ld = StageLoader(cfg, wd, stage, process_index=0, process_count=PROCESSES)
        ld.set_state(dict(ld.get_state(), step=step if step is not None else ld.steps - 1))
        next(ld)
        out[label] = time.perf_counter() - t
        ld.close()
    return out


PROCESSES = 16     # 2112 = 16 x 132: the 7B batch over 16 loader processes
STAGE_STEPS = 1_000_000   # long stages, so "last step" shows the resume is O(1)


def main(_):
    logging.getLogger("crystal.data.mixture").setLevel(logging.ERROR)  # epochs warnings
    base = tempfile.mkdtemp(prefix="crystal_loader_bench_") if not FLAGS.workdir else \
        FLAGS.workdir
    tiny, big = cfg_lib.load("crystalcoder_tiny"), cfg_lib.load("crystalcoder_7b")
    print(f"consumption per process: 7B = {FLAGS.devices_per_process} devices x "
          f"{FLAGS.peak_flops:.3g} FLOP/s x MFU {FLAGS.mfu} / (6 x params); tiny = its "
          f"batch every {FLAGS.tiny_step_s * 1e3:.0f} ms on one device")
    for c in (tiny, big):
        print(f"  {c.name:18s} {num_params(c) / 1e6:10.1f}M params  needs "
              f"{needed_tokens_per_s(c):14,.0f} tokens/s")
    results = []
    for L in map(int, FLAGS.seq_lens):
        overrides = {"data.seq_len": L, "model.max_seq_len": max(L, 128),
                     "data.sample_max_mb": FLAGS.sample_max_mb,
                     "train.global_batch_size": FLAGS.batch_size * PROCESSES,
                     "data.loader_threads": FLAGS.threads,
                     **{f"stages.stage_{s}.steps": STAGE_STEPS for s in (1, 2, 3)}}
        cfg = cfg_lib.load("crystalcoder_tiny", overrides)
        wd = os.path.join(base, f"L{L}")
        t = time.perf_counter()
        prepare.ensure_prepared(cfg, wd)
        print(f"\nseq_len {L}: data ready in {time.perf_counter() - t:.1f}s ({wd}); "
              f"{FLAGS.batch_size} rows/process/step, {FLAGS.threads} threads")
        for stage in (1, 2, 3):
            for w in map(int, FLAGS.workers):
                r = measure(overrides, wd, stage, w)
                r.update(seq_len=L, needed_tiny=needed_tokens_per_s(tiny),
                         needed_7b=needed_tokens_per_s(big))
                results.append(r)
                print(f"  stage {stage} workers {w}: {r['tokens_per_s']:12,.0f} tokens/s "
                      f"({r['s_per_batch'] * 1e3:7.1f} ms/batch)  = "
                      f"{r['tokens_per_s'] / r['needed_7b']:6.2f}x the 7B need, "
                      f"{r['tokens_per_s'] / r['needed_tiny']:6.2f}x the tiny need")
            rc = resume_cost(cfg, wd, stage)
            print(f"  stage {stage} resume (construct + set_state + first batch): step 1 "
                  f"{rc['step_1'] * 1e3:.0f} ms, last step {rc['last_step'] * 1e3:.0f} ms")
            results.append(dict(stage=stage, seq_len=L, resume=rc))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    app.run(lambda a: sys.exit(main(a)))
