"""Tokenization MB/s per process, end-to-end preparation throughput, and data-chunk export
throughput next to it, on the sample corpus.

    python benchmarks/data_prepare.py [--config=configs/crystalcoder_tiny.py] [--max_mb=8]
        [--workers=1,2] [--seq_lens=config,2048] [--repeats=3] [--json_out=FILE]

1. Per process: every sample document is encoded in this one process by group, after one
   warm-up pass (MB of UTF-8 text per second, and bytes per token).
2. End to end: `crystal.data.prepare.prepare` into a fresh workdir for each --workers
   value, once cold (fresh cache: sample corpus build + tokenizer training + prepare, what
   the first tiny training run pays) and once warm (cached corpus and tokenizer); MB/s is
   input text MB over wall time. The shard hashes of every run must agree.
3. Export: every data chunk of the config's run (`crystal.data.chunks`, all stages, FIM
   included), for each --workers value and row length (--seq_lens: the config's, and
   LLM360's 2048), interleaved --repeats times with a warm preparation at that length and
   worker count, so both see the same load; tokens/s of exported rows over wall time, and
   per row length the ratio of the fastest export to the fastest warm preparation (the
   goal: >= 1, export is never the slower half of a data release).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

from crystal import config as cfg_lib
from crystal.data import prepare, sample, sources, tokenizer
from crystal.data.chunks import export, numbering

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/crystalcoder_tiny.py", "Config file.")
flags.DEFINE_float("max_mb", 8.0, "Sample corpus size.")
flags.DEFINE_list("workers", ["1", "2"], "Worker counts for preparation and export.")
flags.DEFINE_list("seq_lens", ["config", "2048"], "Row lengths of the export against "
                  "preparation ('config': the config's; 2048 is LLM360's).")
flags.DEFINE_integer("repeats", 3, "Interleaved warm preparations and exports per setting "
                     "(the fastest of each counts).")
flags.DEFINE_string("json_out", "", "Also write the results here.")


def per_process(corpus: Path, tok_path: Path) -> list[dict]:
    tok = tokenizer.Tokenizer.load(tok_path)
    by: dict = {}
    for g, t in sources.iter_documents(corpus):
        by.setdefault(g.rsplit(".", 1)[-1] if g.startswith("slimpajama") else g, []).append(t)
    rows = []
    for g, texts in sorted(by.items()):
        tok.encode_batch(texts[:4])  # warm-up
        mb = sum(len(t.encode()) for t in texts) / 1e6
        t0 = time.perf_counter()
        ids = tok.encode_batch(texts)
        dt = time.perf_counter() - t0
        rows.append(dict(group=g, mb=mb, seconds=dt, mb_per_s=mb / dt,
                         bytes_per_token=mb * 1e6 / sum(map(len, ids))))
    return rows


def end_to_end(workers: int, cache_dir: str, tmp: Path, over=None) -> dict:
    c = cfg_lib.load(FLAGS.config, {"data.cache_dir": cache_dir, "data.sample_max_mb":
                                    FLAGS.max_mb, **(over or {})})
    wd = Path(tempfile.mkdtemp(dir=tmp))
    t0, c0 = time.perf_counter(), time.process_time()
    man = prepare.prepare(c, wd, workers=workers)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    log = json.loads((wd / "data" / prepare.LOG_FILE).read_text())
    hashes = [ch["sha256"] for e in man["groups"].values() for ch in e["shards"]]
    return dict(wd=wd, cfg=c, workers=workers, wall_s=wall, input_mb=log["input_bytes"] / 1e6,
                tokens=log["tokens"], mb_per_s=log["input_bytes"] / 1e6 / wall,
                tokens_per_s=log["tokens"] / wall, tokens_per_cpu_s=log["tokens"] / cpu,
                setup_s=log["setup_s"],
                tokenize_s=log["tokenize_s"], write_s=log["write_s"], hashes=hashes)


def export_all(cfg, wd: Path, tmp: Path, workers: int) -> dict:
    """Every data chunk of the run, exported from the prepared `wd`, timed."""
    chunks = numbering.chunks(cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    index = export.export(cfg, wd, Path(tempfile.mkdtemp(dir=tmp)) / "out", chunks, workers)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(c["num_tokens"] for c in index["chunks"])
    return dict(workers=workers, chunks=len(chunks), tokens=tokens, wall_s=wall,
                tokens_per_s=tokens / wall, tokens_per_cpu_s=tokens / cpu)


def export_vs_prepare(tmp: Path) -> list[dict]:
    """Per row length and worker count: warm preparation and the export of every chunk,
    interleaved --repeats times (both see the same machine load), the fastest of each."""
    out = []
    for spec in FLAGS.seq_lens:
        over = {} if spec == "config" else {"data.seq_len": int(spec),
                                             "model.max_seq_len": int(spec)}
        for w in map(int, FLAGS.workers):
            preps, exports = [], []
            for _ in range(FLAGS.repeats):
                preps.append(end_to_end(w, str(tmp / "cache-cold-1"), tmp, over))
                exports.append(export_all(preps[-1]["cfg"], preps[-1]["wd"], tmp, w))
            ex = max(exports, key=lambda e: e["tokens_per_s"])
            out.append(dict(ex, seq_len=int(preps[-1]["cfg"].data.seq_len),
                            tokens_per_cpu_s=max(e["tokens_per_cpu_s"] for e in exports),
                            prepare_tokens_per_s=max(p["tokens_per_s"] for p in preps),
                            prepare_tokens_per_cpu_s=max(p["tokens_per_cpu_s"]
                                                         for p in preps)))
    return out


def report(pp: list[dict], runs: list[dict], exports: list[dict]):
    print(f"tokenization, one process ({FLAGS.config}, sample corpus {FLAGS.max_mb:g} MB cap)")
    print(f"  {'group':28s} {'MB':>7s} {'MB/s':>7s} {'bytes/token':>12s}")
    for r in pp:
        print(f"  {r['group']:28s} {r['mb']:7.3f} {r['mb_per_s']:7.2f} "
              f"{r['bytes_per_token']:12.2f}")
    tot_mb = sum(r["mb"] for r in pp)
    print(f"  {'all':28s} {tot_mb:7.3f} {tot_mb / sum(r['seconds'] for r in pp):7.2f}")
    print("end to end: crystal.data.prepare.prepare (cold = sample build + tokenizer "
          "training + prepare)")
    print(f"  {'run':6s} {'workers':>7s} {'wall s':>7s} {'setup s':>8s} {'tok s':>6s} "
          f"{'write s':>8s} {'MB/s':>6s} {'Mtok/s':>7s}")
    for r in runs:
        print(f"  {r['kind']:6s} {r['workers']:7d} {r['wall_s']:7.2f} {r['setup_s']:8.2f} "
              f"{r['tokenize_s']:6.2f} {r['write_s']:8.2f} {r['mb_per_s']:6.2f} "
              f"{r['tokens_per_s'] / 1e6:7.3f}")
    print("  shard hashes identical across all runs: yes")
    print(f"data-chunk export against warm preparation (crystal.data.chunks: the "
          f"{exports[0]['chunks']} data chunks of every stage, FIM included; fastest of "
          f"{FLAGS.repeats} interleaved runs each)")
    print(f"  {'seq_len':>7s} {'workers':>7s} {'prepare Mtok/s':>14s} {'export tokens':>13s} "
          f"{'wall s':>7s} {'export Mtok/s':>13s}")
    ratios, cpu = {}, {}
    for e in exports:
        print(f"  {e['seq_len']:7d} {e['workers']:7d} {e['prepare_tokens_per_s'] / 1e6:14.3f} "
              f"{e['tokens']:13d} {e['wall_s']:7.2f} {e['tokens_per_s'] / 1e6:13.3f}")
        best = ratios.setdefault(e["seq_len"], [0.0, 0.0])
        best[0] = max(best[0], e["tokens_per_s"])
        best[1] = max(best[1], e["prepare_tokens_per_s"])
        if e["workers"] == 1:     # in one process, CPU seconds do not depend on the load
            cpu[e["seq_len"]] = e["tokens_per_cpu_s"] / e["prepare_tokens_per_cpu_s"]
    print("  per CPU second, one process: " + ", ".join(
        f"seq_len {L}: export/prepare {r:.2f}" for L, r in cpu.items()))
    print("ratio export/prepare (fastest of each, wall): " + ", ".join(
        f"seq_len {L}={a / b:.2f}" for L, (a, b) in ratios.items()))
    return dict(wall={L: a / b for L, (a, b) in ratios.items()}, cpu_one_process=cpu)


def main(_):
    logging.getLogger("crystal").setLevel(logging.ERROR)
    out: dict = dict(config=FLAGS.config, max_mb=FLAGS.max_mb, cpus=os.cpu_count())
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        runs = []
        for w in [int(x) for x in FLAGS.workers]:
            cold_cache = str(tmp / f"cache-cold-{w}")
            runs.append(dict(end_to_end(w, cold_cache, tmp), kind="cold"))
            runs.append(dict(end_to_end(w, cold_cache, tmp), kind="warm"))
        if len({tuple(r["hashes"]) for r in runs}) != 1:
            print("error: shard hashes differ between runs", file=sys.stderr)
            return 1
        exports = export_vs_prepare(tmp)
        c = cfg_lib.load(FLAGS.config, {"data.cache_dir": str(tmp / "cache-cold-1"),
                                        "data.sample_max_mb": FLAGS.max_mb})
        tok_path = next((tmp / "cache-cold-1" / "tokenizers").glob("*.model"))
        pp = per_process(sample.ensure_sample(c), tok_path)
    runs = [{k: v for k, v in r.items() if k not in ("hashes", "wd", "cfg")} for r in runs]
    out.update(per_process=pp, end_to_end=runs, export=exports,
               per_process_mb_per_s=sum(r["mb"] for r in pp) / sum(r["seconds"] for r in pp))
    out["export_ratio_to_prepare"] = report(pp, runs, exports)
    if FLAGS.json_out:
        Path(FLAGS.json_out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
