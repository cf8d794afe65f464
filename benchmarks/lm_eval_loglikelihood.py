"""lm-eval loglikelihood throughput: crystal's model (`--model crystal`) vs lm-eval's `hf`
model on the HF export of the same weights.

    python benchmarks/lm_eval_loglikelihood.py [--size=30M] [--docs=64] [--choices=4]
        [--batch=16] [--rounds=3]

Needs the `eval` (or `test`) extra: lm-eval, and accelerate for lm-eval's `hf` model.

One run on one machine, float32 on CPU, the LLaMA/Amber shape of benchmarks/train_step.py
with random weights, a tokenizer trained on the bundled sample corpus (amber_tiny's 2,000
pieces), and the weights exported by crystal.interop.hf.save in the llama layout (what
`python -m crystal.interop.hf export` writes): crystal.eval.harness.CrystalLM on the params,
lm_eval.models.huggingface.HFLM on the folder, both at --batch.

The requests are multiple-choice shaped like ARC or HellaSwag: --docs contexts of 3 lines
of the sample corpus, each with --choices continuations (the next line, and lines of
other documents), `loglikelihood` requests through lm-eval's own request path
(`LM.loglikelihood`: tokenization, sorting, batching, scoring). Before timing, both models
score the same texts after the same prefix token (EOS) and the largest difference of the
log-likelihoods is printed (the same weights give the same numbers). Rounds alternate the
two; the best of each counts. The last line is

    ratio crystal/hf=X.XX

requests per second of crystal over lm-eval's hf model (above 1: crystal faster). The line
before it times the forward projection matmuls alone at one batch's size under XLA and
under torch: the ratio the matrix libraries set on this host.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import jax
import numpy as np

from host import cpu  # noqa: I001
from train_step import SIZES, crystal_cfg, gemm_rates, interleaved_best

from crystal import model
from crystal.data import sample, tokenizer
from crystal.data.tokenizer import EOS_ID
from crystal.interop import hf

os.environ.setdefault("HF_HUB_OFFLINE", "1")     # the hf model reads the local export only


def corpus_requests(cfg, docs: int, choices: int, seed: int = 0):
    """(tokenizer, [(context, continuation)]): contexts of 3 sample-corpus lines, each with
    the line after them and choices - 1 lines of other documents."""
    src = sample.ensure_sample(cfg, 1.0)
    tok = tokenizer.obtain(cfg, src)
    lines = [ln.strip()[:160] for ln in tokenizer.training_sentences(src, 20000, seed)
             if len(ln.strip()) > 20]
    rng = np.random.default_rng(seed)
    pairs = []
    for i in rng.choice(len(lines) - 4, docs, replace=False):
        context = "\n".join(lines[i:i + 3])[-400:] + "\n"
        others = rng.choice(len(lines), choices - 1, replace=False)
        pairs += [(context, lines[j]) for j in [i + 3, *others]]
    return tok, pairs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="30M", choices=sorted(SIZES))
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    # optional: lm-eval (the eval extra; crystal.eval.harness imports it) and torch; after
    # HF_HUB_OFFLINE is set above
    import lm_eval
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from crystal.eval import harness
    torch.set_num_threads(os.cpu_count() or 1)

    cfg = crystal_cfg(a.size, 512, a.batch)
    params = jax.device_get(model.init(cfg, jax.random.key(0)))
    tok, pairs = corpus_requests(cfg, a.docs, a.choices)
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "hf"
        hf.save(params, cfg, out, layout="llama", tokenizer=tok.path)
        ours = harness.CrystalLM(jax.device_put(params), cfg, tok, batch_size=a.batch)
        theirs = HFLM(pretrained=str(out), device="cpu", dtype="float32",
                      batch_size=a.batch, prefix_token_id=EOS_ID)
        same = [Instance("loglikelihood", {}, ("", c + t), i)
                for i, (c, t) in enumerate(pairs[:16])]
        diff = np.max(np.abs(np.asarray([x for x, _ in ours.loglikelihood(same)]) -
                             np.asarray([x for x, _ in theirs.loglikelihood(same)])))
        best = interleaved_best({"crystal": lambda: ours.loglikelihood(reqs, True),
                                 "hf": lambda: theirs.loglikelihood(reqs, True)},
                                a.rounds, warmup=1, settle=0.3)
    tokens = sum(len(tok.encode(c + t)) + 1 for c, t in pairs)
    per_request = round(tokens / len(reqs))
    # the matrix library's own limit: the forward projections over one batch of requests
    gemm = gemm_rates(crystal_cfg(a.size, per_request, a.batch), a.rounds, forward_only=True)
    print(f"host: {cpu()}")
    print(f"{a.size} LLaMA shape, float32; {len(reqs)} loglikelihood "
          f"requests ({a.docs} contexts x {a.choices} choices, {per_request} "
          f"tokens each on average), batch {a.batch}; lm-eval {lm_eval.__version__}")
    print(f"same texts after EOS: max |crystal - hf| log-likelihood {diff:.2e} nats")
    rate = {k: len(reqs) / v for k, v in best.items()}
    for k in ("crystal", "hf"):
        print(f"{k:>8} {rate[k]:>10,.1f} requests/s  {rate[k] * tokens / len(reqs):>10,.0f} "
              f"tokens/s")
    if "torch" in gemm:
        print(f"gemm (forward projections, {a.batch} x {per_request} tokens): "
              f"xla {gemm['xla']:.0f} GFLOP/s, torch {gemm['torch']:.0f} GFLOP/s, ratio "
              f"xla/torch={gemm['xla'] / gemm['torch']:.2f}")
    print(f"ratio crystal/hf={rate['crystal'] / rate['hf']:.2f}")


if __name__ == "__main__":
    main()
