"""Release bundles an outsider can verify (docs/release.md): `bundle` writes one from a
run's workdir, `verify` checks one, `manifest` hashes every file, `index` lines up
checkpoints, data chunks, metrics and evals, `replay` certifies that the data is what the
checkpoints were trained on, `card` writes the README. CLIs: `python -m crystal.release`
and `python -m crystal.release.verify`."""
