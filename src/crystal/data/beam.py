"""The same preparation as crystal.data.prepare, as an Apache Beam pipeline (for scale).

    Create(shard jobs) -> Map(tokenize_shard) -> per-group parts -> GroupByKey
      -> Map(plan_group) -> FlatMap(shard jobs) -> Reshuffle -> Map(write_shard)

Every transform is the local path's function, fed plain-dict elements (paths, counts,
offsets); token arrays only ever travel through .npy files, never through Beam's coders.
Results come back to the driver as small JSON side files, and the driver writes the
manifest with the same `finish` as the local path, so both produce byte-identical shards
and manifests.

    python -m crystal.data.beam --config=configs/crystalcoder_tiny.py --workdir=DIR \
        [--input=SOURCE_DIR] [--on_bad_record=skip] -- --runner=DirectRunner [beam options]

At scale (Dataflow, Flink, Spark runners) the input and the workdir must be a filesystem
every worker mounts (GCS FUSE, Filestore/NFS, Lustre): see docs/data.md. Apache Beam is the
optional extra `pip install -e .[beam]`; nothing else in crystal imports it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from crystal import cli, fileio
from crystal import config as config_lib
from crystal.data import prepare as prep
from crystal.data.sources import DataError

log = logging.getLogger(__name__)


def _import_beam():
    try:
        import apache_beam as beam   # optional: the beam extra
    except ImportError:
        raise DataError("apache-beam is not installed (pip install -e '.[beam]'); the local "
                        "path crystal.data.prepare does not need it") from None
    return beam


def _dump(path: Path, obj):
    fileio.atomic_write_bytes(path, json.dumps(obj, sort_keys=True).encode())


def _tokenize(job, results_dir):
    r = prep.tokenize_shard(job)
    _dump(Path(results_dir) / f"shard_{r['shard']:06d}.json", r)
    return r


def _parts(r):
    return [(g, dict(e, shard=r["shard"])) for g, e in sorted(r["groups"].items())]


def _plan(kv, params, results_dir):
    group, parts = kv
    p = prep.plan_group(group, list(parts), params)
    _dump(Path(results_dir) / f"plan_{group}.json", {k: v for k, v in p.items() if k != "jobs"})
    return p


def _write(job, results_dir):
    w = prep.write_shard(job)
    _dump(Path(results_dir) / f"written_{w['group']}_{w['index']:+06d}.json", w)
    return w


def build_pipeline(pipeline, st: dict):
    """Adds the preparation transforms for setup state `st` to a Beam pipeline."""
    beam = _import_beam()
    results = str(Path(st["tmp"]) / "results")
    Path(results).mkdir(parents=True, exist_ok=True)
    return (pipeline
            | "Shards" >> beam.Create(st["jobs"], reshuffle=True)
            | "Tokenize" >> beam.Map(_tokenize, results)
            | "Parts" >> beam.FlatMap(_parts)
            | "ByGroup" >> beam.GroupByKey()
            | "Plan" >> beam.Map(_plan, st["params"], results)
            | "ShardJobs" >> beam.FlatMap(lambda p: p["jobs"])
            | "Spread" >> beam.Reshuffle()
            | "Write" >> beam.Map(_write, results))


def _read_results(results: Path):
    load = lambda pat: [json.loads(p.read_text()) for p in sorted(results.glob(pat))]  # noqa
    return load("shard_*.json"), load("plan_*.json"), load("written_*.json")


def run(cfg, workdir, input_dir=None, on_bad_record=None, pipeline_args=(),
        overwrite=False) -> dict:
    """Prepares `workdir/data` with Beam; returns the manifest (same as prepare.prepare)."""
    beam = _import_beam()
    from apache_beam.options.pipeline_options import PipelineOptions   # optional: the beam extra
    config_lib.validate(cfg)
    out = prep.data_dir(workdir)
    out.mkdir(parents=True, exist_ok=True)
    with fileio.file_lock(out / ".lock"):
        if not overwrite:
            prep._check_existing(cfg, workdir, input_dir)
        t0 = time.perf_counter()
        st = prep.setup(cfg, workdir, input_dir, on_bad_record)
        opts = PipelineOptions(list(pipeline_args) or ["--runner=DirectRunner"])
        saved_tmp = tempfile.tempdir  # Beam's own scratch dirs go under ours, and go with it
        tempfile.tempdir = str(st["tmp"])
        try:
            try:
                with beam.Pipeline(options=opts) as p:
                    build_pipeline(p, st)
            except DataError:
                raise
            except Exception as e:  # runners wrap DoFn errors; surface ours as one line
                raise _unwrap(e) from None
            shards, plans, written = _read_results(Path(st["tmp"]) / "results")
            if len(shards) != len(st["jobs"]):
                raise DataError(f"beam: {len(shards)} of {len(st['jobs'])} shards reported "
                                "back")
            for p in plans:
                p["jobs"] = []
            manifest = prep.finish(st["manifest"], plans, written, shards, cfg, st["out"])
        finally:
            tempfile.tempdir = saved_tmp
            shutil.rmtree(st["tmp"], ignore_errors=True)
        prep.write_log(cfg, out, manifest, runner="beam", pipeline_args=list(pipeline_args),
                       shards=len(shards), input_bytes=sum(r["bytes"] for r in shards),
                       total_s=time.perf_counter() - t0)
        return manifest


def _unwrap(e: Exception) -> Exception:
    """The DataError inside a runner's wrapped exception, else a one-line DataError."""
    seen = set()
    x = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, DataError):
            return x
        x = x.__cause__ or x.__context__
    msg = str(e).strip().splitlines()
    # DirectRunner re-raises with the original message embedded in its text.
    for line in msg:
        if "BadRecordError" in line or "DataError" in line:
            return DataError(line.split(": ", 1)[-1].strip())
    return DataError(f"beam pipeline failed: {msg[-1] if msg else type(e).__name__}")


def main(argv=None):
    """Flags crystal does not know (and everything after `--`) go to Beam's pipeline."""
    def body(a):
        man = run(a.cfg, a.workdir, a.input, a.on_bad_record, a.extra,
                  overwrite=a.overwrite)
        prep.summarize(man, a.workdir)
    flags = [f for f in prep.FLAGS if f.name != "workers"]
    return cli.run(body, doc=__doc__.split("\n\n")[0], flags=flags, config=cli.CONFIG_REQUIRED,
            argv=argv, extra_args=True)


if __name__ == "__main__":
    raise SystemExit(main())
