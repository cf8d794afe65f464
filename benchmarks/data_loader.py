"""Loader throughput per process against what training consumes, and the cost of a resume.

    python benchmarks/data_loader.py [--workdir=DIR] [--seq_lens=128,2048] [--batches=30]
        [--workers=0,2] [--threads=2] [--mfu=0.4] [--peak_flops=989e12]
        [--devices_per_process=8] [--tiny_step_s=0.02] [--json_out=FILE]

For each sequence length the sample corpus is prepared with the tiny CrystalCoder config at
that length (2048 is the 7B length: longer rows, more FIM work per row), then every stage
is read for --batches steps of the 7B-shaped global batch (2112 rows over 16 processes),
in process 0's share, timing tokens/s after one warm-up batch. A 7B training process
consumes devices_per_process x peak_flops x mfu / flops_per_token tokens/s (crystal.metrics'
one FLOPs formula), the tiny config
one batch (16 x 128) per --tiny_step_s; the table prints the measured rate against both.
Resume cost: building a loader and restoring it at step 1 vs at step 999,999 of a
million-step stage, up to its first batch.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

from crystal import cli, fileio
from crystal import config as cfg_lib
from crystal import metrics
from crystal.data import prepare
from crystal.data.loader import StageLoader

FLAGS = (
    cli.Flag("workdir", "where to prepare the data ('' = a temp dir)", str, ""),
    cli.Flag("seq_lens", "sequence lengths to measure", list, ["128", "2048"]),
    cli.Flag("batches", "timed batches per stage and setting", int, 30),
    cli.Flag("batch_size", "rows per process per step (7B: 2112 / 16)", int, 132),
    cli.Flag("workers", "grain worker process counts to try", list, ["0", "2"]),
    cli.Flag("threads", "grain reader threads per process", int, 2),
    cli.Flag("sample_max_mb", "sample corpus size", float, 8.0),
    cli.Flag("peak_flops", "accelerator peak FLOP/s (H100 bf16 dense)", float, 989e12),
    cli.Flag("mfu", "assumed model FLOP utilisation", float, 0.4),
    cli.Flag("devices_per_process", "accelerators fed by one loader process", int, 8),
    cli.Flag("tiny_step_s", "assumed train step time of the tiny config on one device (a "
             "0.7M-parameter model is launch-bound, never FLOP-bound)", float, 0.02),
    cli.Flag("json_out", "also write the results here", str, ""),
)


def needed_tokens_per_s(cfg, a) -> float:
    """Tokens/s one loader process must deliver to keep its devices busy."""
    if cfg.name.endswith("_tiny"):
        return cfg.train.global_batch_size * cfg.data.seq_len / a.tiny_step_s
    return a.devices_per_process * a.peak_flops * a.mfu / metrics.flops_per_token(cfg)


def measure(a, overrides, wd, stage, workers) -> dict:
    cfg = cfg_lib.load("crystalcoder_tiny", {**overrides, "data.loader_workers": workers})
    ld = StageLoader(cfg, wd, stage, process_index=0, process_count=PROCESSES)
    ld.set_state(dict(ld.get_state(), step=5))
    next(ld)                                        # warm-up: workers, mmaps, sentencepiece
    t = time.perf_counter()
    n = 0
    for _ in range(a.batches):
        b = next(ld)
        n += b["inputs"].size
    dt = time.perf_counter() - t
    ld.close()
    return dict(stage=stage, workers=workers, tokens_per_s=n / dt,
                s_per_batch=dt / a.batches)


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


def _main(a):
    logging.getLogger("crystal.data.mixture").setLevel(logging.ERROR)  # epochs warnings
    base = tempfile.mkdtemp(prefix="crystal_loader_bench_") if not a.workdir else \
        a.workdir
    tiny, big = cfg_lib.load("crystalcoder_tiny"), cfg_lib.load("crystalcoder_7b")
    print(f"consumption per process: 7B = {a.devices_per_process} devices x "
          f"{a.peak_flops:.3g} FLOP/s x MFU {a.mfu} / FLOPs per token; tiny = its "
          f"batch every {a.tiny_step_s * 1e3:.0f} ms on one device")
    for c in (tiny, big):
        print(f"  {c.name:18s} {metrics.param_count(c) / 1e6:10.1f}M params  needs "
              f"{needed_tokens_per_s(c, a):14,.0f} tokens/s")
    results = []
    for L in map(int, a.seq_lens):
        overrides = {"data.seq_len": L, "model.max_seq_len": max(L, 128),
                     "data.sample_max_mb": a.sample_max_mb,
                     "train.global_batch_size": a.batch_size * PROCESSES,
                     "data.loader_threads": a.threads,
                     **{f"stages.stage_{s}.steps": STAGE_STEPS for s in (1, 2, 3)}}
        cfg = cfg_lib.load("crystalcoder_tiny", overrides)
        wd = os.path.join(base, f"L{L}")
        t = time.perf_counter()
        prepare.ensure_prepared(cfg, wd)
        print(f"\nseq_len {L}: data ready in {time.perf_counter() - t:.1f}s ({wd}); "
              f"{a.batch_size} rows/process/step, {a.threads} threads")
        for stage in (1, 2, 3):
            for w in map(int, a.workers):
                r = measure(a, overrides, wd, stage, w)
                r.update(seq_len=L, needed_tiny=needed_tokens_per_s(tiny, a),
                         needed_7b=needed_tokens_per_s(big, a))
                results.append(r)
                print(f"  stage {stage} workers {w}: {r['tokens_per_s']:12,.0f} tokens/s "
                      f"({r['s_per_batch'] * 1e3:7.1f} ms/batch)  = "
                      f"{r['tokens_per_s'] / r['needed_7b']:6.2f}x the 7B need, "
                      f"{r['tokens_per_s'] / r['needed_tiny']:6.2f}x the tiny need")
            rc = resume_cost(cfg, wd, stage)
            print(f"  stage {stage} resume (construct + set_state + first batch): step 1 "
                  f"{rc['step_1'] * 1e3:.0f} ms, last step {rc['last_step'] * 1e3:.0f} ms")
            results.append(dict(stage=stage, seq_len=L, resume=rc))
    if a.json_out:
        fileio.write_json(a.json_out, results)
    return 0


def main(argv=None):
    return cli.run(_main, doc=__doc__.split("\n\n")[0], flags=FLAGS, argv=argv,
                   prog="python benchmarks/data_loader.py")


if __name__ == "__main__":
    raise SystemExit(main())
