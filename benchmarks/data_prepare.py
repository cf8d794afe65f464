"""Tokenization MB/s per process, end-to-end preparation throughput, and data-chunk export
throughput next to it, on the sample corpus.

    python benchmarks/data_prepare.py [--config=configs/crystalcoder_tiny.py] [--max_mb=8]
        [--workers=1,2] [--json_out=FILE]

1. Per process: every sample document is encoded in this one process by group, after one
   warm-up pass (MB of UTF-8 text per second, and bytes per token).
2. End to end: `crystal.data.prepare.prepare` into a fresh workdir for each --workers
   value, once cold (fresh cache: sample corpus build + tokenizer training + prepare, what
   the first tiny training run pays) and once warm (cached corpus and tokenizer); MB/s is
   input text MB over wall time. The shard hashes of every run must agree.
3. Export: every data chunk of the config's run (`crystal.data.chunks`, all stages, FIM
   included) from the last prepared workdir, for each --workers value; tokens/s of exported
   rows over wall time, and the ratio of the fastest export to the fastest preparation
   above (the goal: >= 1, export is never the slower half of a data release).
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
flags.DEFINE_list("workers", ["1", "2"], "Worker counts for the end-to-end runs.")
flags.DEFINE_string("json_out", "", "Also write the results here.")


def per_process(cfg, corpus: Path, tok_path: Path) -> list[dict]:
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


def end_to_end(cfg, workers: int, cache_dir: str, tmp: Path) -> dict:
    c = cfg_lib.load(FLAGS.config, {"data.cache_dir": cache_dir, "data.sample_max_mb":
                                    FLAGS.max_mb})
    wd = Path(tempfile.mkdtemp(dir=tmp))
    t0 = time.perf_counter()
    man = prepare.prepare(c, wd, workers=workers)
    wall = time.perf_counter() - t0
    log = json.loads((wd / "data" / prepare.LOG_FILE).read_text())
    hashes = [ch["sha256"] for e in man["groups"].values() for ch in e["shards"]]
    return dict(wd=wd, cfg=c, workers=workers, wall_s=wall, input_mb=log["input_bytes"] / 1e6,
                tokens=log["tokens"], mb_per_s=log["input_bytes"] / 1e6 / wall,
                tokens_per_s=log["tokens"] / wall, setup_s=log["setup_s"],
                tokenize_s=log["tokenize_s"], write_s=log["write_s"], hashes=hashes)


def export_all(cfg, wd: Path, tmp: Path, workers: int) -> dict:
    """Every data chunk of the run, exported from the prepared `wd`, timed."""
    chunks = numbering.chunks(cfg)
    t0 = time.perf_counter()
    index = export.export(cfg, wd, tmp / f"export-{workers}", chunks, workers)
    wall = time.perf_counter() - t0
    tokens = sum(c["num_tokens"] for c in index["chunks"])
    return dict(workers=workers, chunks=len(chunks), tokens=tokens, wall_s=wall,
                tokens_per_s=tokens / wall)


def main(_):
    logging.getLogger("crystal").setLevel(logging.ERROR)
    cfg = cfg_lib.load(FLAGS.config, {"data.sample_max_mb": FLAGS.max_mb})
    out: dict = dict(config=FLAGS.config, max_mb=FLAGS.max_mb, cpus=os.cpu_count())
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        runs = []
        for w in [int(x) for x in FLAGS.workers]:
            cold_cache = str(tmp / f"cache-cold-{w}")
            r = end_to_end(cfg, w, cold_cache, tmp)
            r["kind"] = "cold"
            runs.append(r)
            r = end_to_end(cfg, w, cold_cache, tmp)
            r["kind"] = "warm"
            runs.append(r)
        if len({tuple(r["hashes"]) for r in runs}) != 1:
            print("error: shard hashes differ between runs", file=sys.stderr)
            return 1
        out["export"] = [export_all(runs[-1]["cfg"], runs[-1]["wd"], tmp, int(w))
                         for w in FLAGS.workers]
        c = cfg_lib.load(FLAGS.config, {"data.cache_dir": str(tmp / "cache-cold-1"),
                                        "data.sample_max_mb": FLAGS.max_mb})
        corpus = sample.ensure_sample(c)
        tok_path = next((tmp / "cache-cold-1" / "tokenizers").glob("*.model"))
        pp = per_process(c, corpus, tok_path)
    out["per_process"] = pp
    out["end_to_end"] = [{k: v for k, v in r.items() if k not in ("hashes", "wd", "cfg")}
                         for r in runs]

    print(f"tokenization, one process ({FLAGS.config}, sample corpus {FLAGS.max_mb:g} MB cap)")
    print(f"  {'group':28s} {'MB':>7s} {'MB/s':>7s} {'bytes/token':>12s}")
    for r in pp:
        print(f"  {r['group']:28s} {r['mb']:7.3f} {r['mb_per_s']:7.2f} "
              f"{r['bytes_per_token']:12.2f}")
    tot_mb = sum(r["mb"] for r in pp)
    tot_s = sum(r["seconds"] for r in pp)
    print(f"  {'all':28s} {tot_mb:7.3f} {tot_mb / tot_s:7.2f}")
    out["per_process_mb_per_s"] = tot_mb / tot_s
    print("end to end: crystal.data.prepare.prepare (cold = sample build + tokenizer "
          "training + prepare)")
    print(f"  {'run':6s} {'workers':>7s} {'wall s':>7s} {'setup s':>8s} {'tok s':>6s} "
          f"{'write s':>8s} {'MB/s':>6s} {'Mtok/s':>7s}")
    for r in out["end_to_end"]:
        print(f"  {r['kind']:6s} {r['workers']:7d} {r['wall_s']:7.2f} {r['setup_s']:8.2f} "
              f"{r['tokenize_s']:6.2f} {r['write_s']:8.2f} {r['mb_per_s']:6.2f} "
              f"{r['tokens_per_s'] / 1e6:7.3f}")
    print("  shard hashes identical across all runs: yes")
    best = max(r["tokens_per_s"] for r in out["end_to_end"])
    print(f"data-chunk export (crystal.data.chunks: the {out['export'][0]['chunks']} data "
          "chunks of every stage, FIM included)")
    print(f"  {'workers':>7s} {'tokens':>8s} {'wall s':>7s} {'Mtok/s':>7s}")
    for ex in out["export"]:
        print(f"  {ex['workers']:7d} {ex['tokens']:8d} {ex['wall_s']:7.2f} "
              f"{ex['tokens_per_s'] / 1e6:7.3f}")
    fastest = max(ex["tokens_per_s"] for ex in out["export"])
    out["export_ratio_to_prepare"] = fastest / best
    print(f"ratio export/prepare={fastest / best:.2f} (fastest export {fastest / 1e6:.3f} "
          f"Mtok/s, fastest preparation {best / 1e6:.3f} Mtok/s)")
    if FLAGS.json_out:
        Path(FLAGS.json_out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
