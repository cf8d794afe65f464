"""Tokenization MB/s per process, and end-to-end preparation throughput, on the sample corpus.

    python benchmarks/data_prepare.py [--config=configs/crystalcoder_tiny.py] [--max_mb=8]
        [--workers=1,2] [--json_out=FILE]

1. Per process: every sample document is encoded in this one process by group, after one
   warm-up pass (MB of UTF-8 text per second, and bytes per token).
2. End to end: `crystal.data.prepare.prepare` into a fresh workdir for each --workers
   value, once cold (fresh cache: sample corpus build + tokenizer training + prepare, what
   the first tiny training run pays) and once warm (cached corpus and tokenizer); MB/s is
   input text MB over wall time. The chunk hashes of every run must agree.
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
    hashes = [ch["sha256"] for e in man["groups"].values() for ch in e["chunks"]]
    return dict(workers=workers, wall_s=wall, input_mb=log["input_bytes"] / 1e6,
                tokens=log["tokens"], mb_per_s=log["input_bytes"] / 1e6 / wall,
                tokens_per_s=log["tokens"] / wall, setup_s=log["setup_s"],
                tokenize_s=log["tokenize_s"], write_s=log["write_s"], hashes=hashes)


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
            print("error: chunk hashes differ between runs", file=sys.stderr)
            return 1
        c = cfg_lib.load(FLAGS.config, {"data.cache_dir": str(tmp / "cache-cold-1"),
                                        "data.sample_max_mb": FLAGS.max_mb})
        corpus = sample.ensure_sample(c)
        tok_path = next((tmp / "cache-cold-1" / "tokenizers").glob("*.model"))
        pp = per_process(c, corpus, tok_path)
    out["per_process"] = pp
    out["end_to_end"] = [{k: v for k, v in r.items() if k != "hashes"} for r in runs]

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
    print("  chunk hashes identical across all runs: yes")
    if FLAGS.json_out:
        Path(FLAGS.json_out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
