"""Generation speed: crystal's cached decoder vs transformers' `generate`, same weights.

    python benchmarks/decode.py [--size=30M] [--batch=8] [--prompt=32] [--new=128]
                                [--rounds=3] [--mem_rows=64]

One run on one machine, float32 on CPU, the LLaMA/Amber shape of benchmarks/train_step.py
with random weights converted to `LlamaForCausalLM` by crystal.interop (so both compute the same
logits; the greedy tokens are compared and their agreement printed):

- decode: `batch` prompts of `prompt` random tokens, `new` greedy tokens each, KV cache on
  both sides (`crystal.decode.Decoder.generate`; `model.generate(use_cache=True)`), new
  tokens per second of the whole call (prefill included);
- prefill: prompt tokens per second of the prefill alone (crystal: the cache filled and
  the first token chosen; transformers: one forward pass with use_cache);
- memorization: sequences scored per second at k = l = 32 (crystal.eval.memorization's
  scorer against the same study with `generate`), `mem_rows` sequences per batch.

The last line is

    ratio decode=X.XX prefill=Y.YY memorization=Z.ZZ

(crystal over transformers; above 1 is crystal faster). Best of `rounds` interleaved calls.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from train_step import SIZES, VOCAB, crystal_cfg, interleaved_best  # noqa: I001

from crystal import decode, model
from crystal.eval import memorization
from crystal.interop import registry


def hf_model(params, cfg):
    """LlamaForCausalLM with crystal's weights (crystal.interop's llama layout folds muP and
    the rotary pairing)."""
    import torch   # optional: the peer (test/bench extras)
    import transformers
    lay = registry.get("llama")
    sd = lay.to_tensors(params, cfg)
    net = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(
        lay.config_json(cfg))).float().eval()
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=False)
    return net


def hf_generate(net, prompts_BxP, new: int):
    import torch   # optional: the peer (test/bench extras)
    x = torch.from_numpy(prompts_BxP.astype(np.int64))
    with torch.inference_mode():
        out = net.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                           max_new_tokens=new, min_new_tokens=new, use_cache=True,
                           pad_token_id=0, eos_token_id=None)
    return out[:, prompts_BxP.shape[1]:].numpy()


def hf_prefill(net, prompts_BxP):
    import torch   # optional: the peer (test/bench extras)
    x = torch.from_numpy(prompts_BxP.astype(np.int64))
    with torch.inference_mode():
        return net(input_ids=x, use_cache=True).logits[:, -1].argmax(-1).numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="30M", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mem_rows", type=int, default=64)
    a = ap.parse_args()
    import torch   # optional: the peer (test/bench extras)
    torch.set_num_threads(os.cpu_count() or 1)

    cfg = crystal_cfg(a.size, max(a.prompt + a.new, 64), a.batch)
    params = jax.device_get(model.init(cfg, jax.random.key(0)))
    net = hf_model(params, cfg)
    dec = decode.Decoder(params, cfg)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, VOCAB, (a.batch, a.prompt)).astype(np.int32)
    rows = rng.integers(3, VOCAB, (a.mem_rows, 64)).astype(np.int32)
    plist = prompts.tolist()
    got = {}

    def ours():
        got["crystal"] = [r.tokens for r in dec.generate(plist, a.new, stop_at_eos=False)]

    def theirs():
        got["transformers"] = hf_generate(net, prompts, a.new).tolist()
    steps = {"crystal decode": ours, "transformers decode": theirs,
             "crystal prefill": lambda: dec.generate(plist, 1, stop_at_eos=False),
             "transformers prefill": lambda: hf_prefill(net, prompts),
             "crystal memorization": lambda: memorization.score(dec, rows, 32, 32),
             "transformers memorization": lambda: hf_generate(net, rows[:, :32], 32)}
    best = interleaved_best(steps, a.rounds, warmup=1, settle=0.3)
    same = np.mean(np.asarray(got["crystal"]) == np.asarray(got["transformers"]))
    print(f"{a.size} LLaMA shape, float32, {os.cpu_count()} CPUs; batch {a.batch}, prompt "
          f"{a.prompt}, {a.new} new tokens, greedy; same greedy tokens: {same:.1%}")
    rate = {}
    for what, n in (("decode", a.batch * a.new), ("prefill", a.batch * a.prompt),
                    ("memorization", a.mem_rows)):
        unit = "sequences/s" if what == "memorization" else "tokens/s"
        for fw in ("crystal", "transformers"):
            rate[what, fw] = n / best[f"{fw} {what}"]
            print(f"{what:>13} {fw:>13} {rate[what, fw]:>12,.1f} {unit}")
    print("ratio " + " ".join(f"{w}={rate[w, 'crystal'] / rate[w, 'transformers']:.2f}"
                              for w in ("decode", "prefill", "memorization")))


if __name__ == "__main__":
    main()
