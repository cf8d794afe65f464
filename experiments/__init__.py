"""Experiments whose results are committed next to them (experiments/results/)."""
