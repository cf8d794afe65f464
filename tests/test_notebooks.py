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


@pytest.fixture
def run_env(copy_run, monkeypatch):
    monkeypatch.setenv("CRYSTAL_RUN", str(copy_run))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return copy_run


def test_explore_run_notebook(run_env):
    out = execute("explore_run.ipynb")
    assert "jax " in out and "on cpu" in out                      # the setup cell
    assert "restored step 8" in out
    assert "param dtypes on disk: {'float32'}" in out
    assert "'def fibonacci(n):" in out and "-extractable" in out
    assert "wrote" in out or "not expressible in transformers" in out


def test_memorization_notebook(run_env, monkeypatch):
    monkeypatch.setenv("CRYSTAL_SEQUENCES_PER_CHUNK", "8")
    out = execute("memorization.ipynb")
    assert "8 checkpoints scored now, 0 already done" in out
    assert "step      8 stage 3: latest chunk s3c2" in out
    assert "correlation of the last two checkpoints (7, 8)" in out
    for png in ("memorization_distribution", "memorization_chunks", "memorization_correlation"):
        assert (run_env / "evals" / f"{png}.png").is_file()


def test_remix_notebook(run_env, monkeypatch):
    monkeypatch.setenv("CRYSTAL_HELDOUT_ROWS", "4")
    out = execute("remix.ipynb")
    assert "branch at step 5 (stage step 1), original stage end at step 6" in out
    assert "remix stage end at step 7" in out
    assert "held-out loss, all sources: original" in out
    remix = run_env.parent / "run_remix"
    assert (remix / "evals" / "perplexity").is_dir() and (remix / "checkpoints" / "7").is_dir()
