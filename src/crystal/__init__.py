"""crystal: a JAX stack for fully transparent LLM pre-training (LLM360 Amber, CrystalCoder)."""

__version__ = "0.1.0"
