"""The default run's recorded identity: its corpus, tokenizer, manifest and short-run loss.

    python -m crystal.data.corpus.check --workdir=DIR [--record]

Prepares the default config (configs/crystalcoder_tiny.py) in DIR from the bundled corpus,
trains its first `STEPS` steps, and compares against `expected.json`: the sha256 of the
written-out documents, of the trained tokenizer and of the manifest (bitwise, on any
machine), and the loss after `STEPS` steps (bitwise on the CPU kind it was recorded on;
within `loss_tolerance`, relative, on another, since XLA compiles for the CPU's vector
instructions). The run keeps XLA's matrix products on one thread: split over threads, their
sums are ordered by the machine's core count, and the last bits of the loss with them.
`--record` writes the figures instead (after a deliberate change of the corpus, the
preparation or the model; review the diff). tests/test_corpus.py runs the check.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from crystal import cli, fileio
from crystal import config as config_lib
from crystal.data import manifest as man_lib
from crystal.data import prepare, sample
from crystal.errors import DataError

CONFIG = "crystalcoder_tiny"
STEPS = 20
# Relative loss difference allowed on another CPU kind: 250x the largest seen (4.1e-7) when
# XLA was held to older vector instructions (--xla_cpu_max_isa=AVX2 / SSE4_2, docs/data.md).
LOSS_TOLERANCE = 1e-4
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false"
_SIMD = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
         "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile", "asimd", "sve")


def cpu_kind() -> str:
    """The machine and the vector instruction sets XLA:CPU compiles for."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return " ".join([platform.machine()] + [f for f in _SIMD if f in flags])


def default_config(**over):
    """The README's main job, with its outputs that do not change the numbers turned off."""
    return config_lib.load(CONFIG, {"metrics.tensorboard": False, "metrics.plot": False,
                                    "train.progress": False, **over})


def identity(workdir) -> dict:
    """Prepares the default config's data in `workdir`; the hashes that name it."""
    cfg = default_config()
    prepare.ensure_prepared(cfg, workdir)
    man, man_sha = man_lib.read(workdir)
    return dict(corpus_sha256=fileio.file_sha256(sample.CORPUS),
                documents_sha256=man["input"]["documents_sha256"],
                tokenizer_sha256=man["tokenizer"]["sha256"], manifest_sha256=man_sha)


def short_run_loss(workdir, steps: int = STEPS) -> float:
    """The loss of step `steps` of the default config, trained from scratch in `workdir`."""
    from crystal import metrics, train   # lazily: training pulls in jax, the hashes do not
    train.run(default_config(), workdir, stop_after_steps=steps)
    recs = [r for r in metrics.read_jsonl(Path(workdir) / "metrics.jsonl") if "loss" in r]
    return float(recs[-1]["loss"])


def check(workdir, got: dict) -> list[str]:
    """Differences between `got` (identity + loss) and expected.json, one line each."""
    want = sample.expected()
    out = [f"{k}: {got[k]} (expected {want.get(k)})" for k in
           ("corpus_sha256", "documents_sha256", "tokenizer_sha256", "manifest_sha256")
           if got[k] != want.get(k)]
    if "loss" in got:
        same_cpu = want.get("loss_cpu") == cpu_kind()
        rel = abs(got["loss"] - want["loss"]) / abs(want["loss"])
        if (got["loss"] != want["loss"]) if same_cpu else rel > want["loss_tolerance"]:
            out.append(f"loss after {want['loss_steps']} steps: {got['loss']!r} (expected "
                       f"{want['loss']!r}{'' if same_cpu else ' +- ' + str(rel)} on "
                       f"{want.get('loss_cpu')}; this CPU: {cpu_kind()})")
    return out


def main(argv=None):
    # Before anything starts JAX's backend (crystal adds its own flags to these on import).
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {ONE_THREAD}".strip()

    def body(a):
        got = identity(a.workdir)
        got["loss"] = short_run_loss(a.workdir)
        if a.record:
            rec = dict(sample.expected(), **got, loss_steps=STEPS, loss_cpu=cpu_kind(),
                       loss_tolerance=LOSS_TOLERANCE)
            fileio.write_json(sample.EXPECTED, rec)
            print(f"recorded {sample.EXPECTED}")
            return
        problems = check(a.workdir, got)
        for p in problems:
            print(f"differs: {p}")
        if problems:
            raise DataError(f"{len(problems)} of the default run's recorded figures differ "
                            f"({sample.EXPECTED})")
        print(f"ok: the default run matches {sample.EXPECTED}")
    return cli.run(body, doc=__doc__.split("\n\n")[0], argv=argv, flags=[
        cli.Flag("workdir", "a new folder to prepare and train in", required=True),
        cli.Flag("record", "write the figures to expected.json instead", bool, False)])


if __name__ == "__main__":
    raise SystemExit(main())
