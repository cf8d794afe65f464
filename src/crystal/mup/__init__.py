"""muP: width rules (rules.py), the coordinate check and the transfer tool."""
from crystal.mup.rules import CLASSES, Rules, param_class, rules  # noqa: F401
