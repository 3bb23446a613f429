"""The datasets of the evaluation tasks in this folder, read from the JSON Lines files beside
them (lm-evaluation-harness calls these through ``custom_dataset: !function ...``): nothing is
fetched from a hub."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent


def _split(name: str, **_kwargs):
    import datasets

    lines = (HERE / name).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def facts_mc(**kwargs):
    return _split("ps_facts_mc.jsonl", **kwargs)


def facts_gen(**kwargs):
    return _split("ps_facts_gen.jsonl", **kwargs)
