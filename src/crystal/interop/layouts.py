"""A Hugging Face layout: how one crystal model becomes config.json + named tensors and back.

Three layouts (registry.py; docs/interop.md):

    llama     LlamaForCausalLM (Amber): RMSNorm, full RoPE, in transformers
    stablelm  StableLmForCausalLM: LayerNorm, partial RoPE, QKV bias, in transformers; no
              attention-output or FFN biases, so CrystalCoder only without them
    llm360    LLM360's CrystalCoderLMHeadModel (trust_remote_code): their GPT-2 tensor
              names, Conv1D orientation and muP fields; holds every LayerNorm model

A layout *holds* a model exactly when its tensors are crystal's numbers, reordered or
reshaped but never multiplied: llm360 always (muP lives in config.json), llama and stablelm
when every muP multiplier they must fold into the weights is 1 (SP). `auto` picks the exact
one for the model's norm: llama for RMSNorm, llm360 for LayerNorm (registry.auto).
"""

from __future__ import annotations

import math

import numpy as np

from crystal import model as model_lib
from crystal.errors import ConversionError
from crystal.interop import tree


def f32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def pair_perm(head_dim: int, rotary_dims: int, src: str, dst: str) -> np.ndarray:
    """Head-dim index j of the `dst` pairing holds index perm[j] of the `src` pairing.

    Interleaved (GPT-J) pair i is dims (2i, 2i+1), rotate-half pair i is dims (i, i + r/2),
    both at frequency base**(-2i/r); dims past `rotary_dims` pass through. Permuting q and k
    by the same perm leaves every q.k product unchanged, and a permutation is exact.
    """
    k, r = head_dim, rotary_dims
    to_half = np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2), np.arange(r, k)])
    if src == dst:
        return np.arange(k)
    return to_half if (src, dst) == ("interleaved", "half") else np.argsort(to_half)


class Tensors:
    """An HF checkpoint's tensors as crystal reads them: each by name and shape, taken once;
    a tensor no slot takes, a missing or misshapen one is a ConversionError naming it."""

    def __init__(self, state_dict: dict, where: str = "HF checkpoint"):
        self.sd = {k: np.asarray(_numpy(v)) for k, v in state_dict.items()}
        self.where = where
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.sd

    def take(self, name: str, shape) -> np.ndarray:
        if name not in self.sd:
            raise ConversionError(f"{self.where}: missing {name}")
        x = self.sd[name]
        if x.shape != tuple(shape):
            raise ConversionError(f"{self.where}: {name} has shape {x.shape}, expected "
                                  f"{tuple(shape)} for this config")
        self.used.add(name)
        return x.astype(np.float32)

    def zero_or_absent(self, name: str, shape, why: str) -> None:
        """A tensor crystal has no place for: it may only be absent or all zeros."""
        if name in self.sd:
            x = self.take(name, shape)
            if np.any(x != 0):
                raise ConversionError(f"{self.where}: {name} is non-zero but this config "
                                      f"has {why}")

    def bias(self, name: str, shape, keep: bool, why: str):
        """A bias crystal keeps (returned), or one it lacks (absent or zero; None)."""
        if keep:
            return self.take(name, shape)
        self.zero_or_absent(name, shape, why)
        return None

    def finish(self) -> None:
        leftover = sorted(set(self.sd) - self.used)
        if leftover:
            raise ConversionError(f"{self.where}: {len(leftover)} tensors this config has "
                                  f"no place for, e.g. {leftover[0]}")


def _numpy(x):
    if hasattr(x, "detach"):  # a torch tensor (tests hand state_dicts over directly)
        return x.detach().cpu().float().numpy()
    return x


class Layout:
    """One HF layout. Subclasses fill in the names; `holds` refuses what it cannot store."""
    name = ""
    architecture = ""
    model_type = ""

    def holds(self, spec: model_lib.ModelSpec) -> None:
        """Raises ConversionError (naming the field and the layout that can) if not."""
        raise NotImplementedError

    def exact(self, spec: model_lib.ModelSpec) -> bool:
        """True when a round trip through this layout is bitwise (nothing multiplied)."""
        raise NotImplementedError

    def config_json(self, cfg) -> dict:
        raise NotImplementedError

    def to_tensors(self, params, cfg) -> dict[str, np.ndarray]:
        """{tensor name: float32 array}, in file order."""
        raise NotImplementedError

    def from_tensors(self, tensors: Tensors, cfg) -> dict:
        """crystal params (numpy float32, cfg's layer layout), each tensor taken from
        `tensors` (params_from then refuses what is left over)."""
        raise NotImplementedError

    def model_fields(self, hc: dict, where: str) -> dict:
        """{dotted crystal field: value} that config.json alone determines, for a checkpoint
        crystal did not write (no crystal_config.json beside it)."""
        raise NotImplementedError

    # the fields of config.json that must agree with a crystal config (checked on import)
    checked_fields: tuple[str, ...] = ()

    def check_config(self, hc: dict, cfg, where: str) -> None:
        """Every checked field of `hc` equals what exporting `cfg` writes."""
        want = self.config_json(cfg)
        for key in self.checked_fields:
            got, exp = lookup(hc, key), lookup(want, key)
            same = (math.isclose(got, exp, rel_tol=1e-9)
                    if isinstance(exp, float) and isinstance(got, (int, float))
                    and not isinstance(got, bool) else got == exp)
            if not same:
                raise ConversionError(f"{where}: field {key} is {got!r}, the crystal config "
                                      f"expects {exp!r}")

    def params_from(self, state_dict: dict, cfg, where: str = "HF checkpoint") -> dict:
        self.holds(model_lib.ModelSpec.from_config(cfg))
        t = Tensors(state_dict, where)
        params = self.from_tensors(t, cfg)
        t.finish()
        return params


def lookup(d: dict, dotted: str):
    """d['a']['b'] for 'a.b' (None where absent)."""
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def require(hc: dict, key: str, allowed, where: str):
    """hc[key], which must be one of `allowed` (a ConversionError naming the field)."""
    v = hc.get(key)
    if v not in allowed:
        raise ConversionError(f"{where}: field {key} is {v!r}; crystal can hold "
                              f"{' or '.join(map(repr, allowed))}")
    return v


def positive_int(hc: dict, key: str, where: str) -> int:
    v = hc.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConversionError(f"{where}: field {key} is {v!r}, expected a positive integer")
    return v


def layer_params(params) -> list[dict]:
    return tree.split_layers(params)


def assemble(cfg, layers: list[dict], top: dict) -> dict:
    """The param tree of cfg's layer layout, every leaf float32."""
    out = dict(top)
    out.update(tree.join_layers(layers, bool(cfg.model.scan_layers)))
    return tree.tree_map(f32, out)
