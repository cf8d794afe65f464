"""The research notebooks run top to bottom as notebooks (nbclient, a real ipykernel) on the
session's short training run; each on its own copy, since notebooks write (evals, exports,
a remix run)."""
from pathlib import Path

import nbclient
import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]


def execute(name: str) -> str:
    """Runs notebooks/NAME in a fresh kernel (cwd: the repo); returns its printed text."""
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}}).execute()
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs if o.output_type == "stream")


# notebook, its environment (small samples), what it must print, files it must leave
# (relative to the run's workdir)
CASES = [
    ("explore_run.ipynb", {}, [
        "on cpu",                                                # the setup cell
        "restored step 8", "param dtypes on disk: {'float32'}", "rows from shards",
        " record ", "data chunks in the run;", "'def fibonacci(n):", "-extractable"],
     ["released/chunks.json"]),
    ("memorization.ipynb", {"CRYSTAL_SEQUENCES_PER_CHUNK": "8"}, [
        "8 checkpoints scored now, 0 already done",
        "step      8 stage 3: latest chunk s3c1",
        "correlation of the last two checkpoints (7, 8)"],
     [f"evals/memorization_{f}.png" for f in ("distribution", "chunks", "correlation")]),
    ("remix.ipynb", {"CRYSTAL_HELDOUT_ROWS": "4"}, [
        "branch at step 5 (stage step 1), original stage end at step 6",
        "remix stage end at step 7", "held-out loss, all sources: original"],
     ["../run_remix/checkpoints/7", "../run_remix/evals/perplexity"]),
]


@pytest.mark.parametrize("name, env, printed, files", CASES, ids=[c[0] for c in CASES])
def test_notebook_runs_on_a_short_run(copy_run, monkeypatch, name, env, printed, files):
    for k, v in dict(env, CRYSTAL_RUN=str(copy_run), MPLBACKEND="Agg").items():
        monkeypatch.setenv(k, v)
    out = execute(name)
    for text in printed:
        assert text in out, out[-3000:]
    for f in files:
        assert (copy_run / f).exists(), f
    if name == "explore_run.ipynb":
        # the trained CrystalCoder (non-zero attention-output and FFN biases) leaves in
        # LLM360's own layout and comes back bit for bit
        assert "wrote llm360 layout" in out and "round trip bitwise: True" in out
