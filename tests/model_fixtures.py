"""Random crystal params for model and HF-parity tests."""
import jax
import numpy as np

from crystal import model as model_lib


def random_params(cfg, seed=0, zero=()):
    """Random crystal params of the model's own tree (from abstract shapes: no compile).

    Every norm and bias is non-trivial (init has ones/zeros) except the bias names in
    `zero`; q and k are large enough that attention is far from uniform (at a muP init it
    is nearly uniform, and a rotary mistake would hide in it).
    """
    rng = np.random.default_rng(seed)
    D = cfg.model.d_model

    def f(path, s):
        name = path[-1].key
        n = lambda std: (std * rng.standard_normal(s.shape)).astype(np.float32)  # noqa: E731
        if name == "scale":
            return 1 + n(0.2)
        if name == "bias" or name.startswith("b_"):
            return np.zeros(s.shape, np.float32) if name in zero else n(0.2)
        if name in ("w_q", "w_k"):
            return n(2 / D ** 0.5)
        if name == "embedding":
            return n(0.5)
        fan_in = cfg.model.ffn_dim if name == "w_down" else D
        return n(1 / fan_in ** 0.5)
    return jax.tree_util.tree_map_with_path(f, model_lib.abstract_params(cfg))
