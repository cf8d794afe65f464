"""Loads a local task's documents from a JSON-lines file beside its YAML (no download,
nothing written to the datasets cache): lm-eval calls `load(**metadata,
**dataset_kwargs)` through the YAML's `custom_dataset: !function local.load`; each line is a
document with a `split` field (train, validation or test)."""

import json
from pathlib import Path

import datasets


def load(file: str, **_) -> datasets.DatasetDict:
    rows: dict[str, list[dict]] = {}
    path = Path(__file__).parent / file
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            doc = json.loads(line)
            rows.setdefault(doc.pop("split"), []).append(doc)
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()})
