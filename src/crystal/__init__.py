"""crystal: a JAX stack for fully transparent LLM pre-training (LLM360 Amber, CrystalCoder)."""

import os as _os

__version__ = "0.1.0"

# XLA:CPU flags crystal runs with, appended to XLA_FLAGS unless the user already set them.
# They are read when JAX starts its CPU backend, so they apply to any program that imports
# crystal before its first JAX computation.
#   copy_insertion_use_region_analysis: without it XLA:CPU copies every donated param and
#   Adam moment before updating it in place (3 x the model per step; see benchmarks/).
CPU_XLA_FLAGS = ("--xla_cpu_copy_insertion_use_region_analysis=true",)


def _add_cpu_xla_flags():
    flags = _os.environ.get("XLA_FLAGS", "")
    extra = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in flags]
    if extra:
        _os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


_add_cpu_xla_flags()
