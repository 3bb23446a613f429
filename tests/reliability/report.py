"""Figures of the reliability suite: each test records one row (what was done, what held, the
numbers); ``python tests/reliability/report.py`` renders the rows of the last run as the
markdown table of ``docs/reliability.md``.

``PREFIX_SERVE_RELIABILITY=full`` (``make reliability``) runs every test at full size (minutes
of load, more fuzz cases); unset, the same tests run small and fast inside ``make test``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

FULL = os.environ.get("PREFIX_SERVE_RELIABILITY") == "full"
RESULTS = Path(os.environ.get("PREFIX_SERVE_RELIABILITY_OUT", "bench/results/reliability.jsonl"))


def scale(fast, full):
    """``fast`` inside ``make test``, ``full`` inside ``make reliability``."""
    return full if FULL else fast


def record(test: str, done: str, held: str, figures: dict) -> None:
    """Append one row for ``test``; a later row for the same test replaces it in the table."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    row = {"test": test, "done": done, "held": held, "figures": figures, "full": FULL}
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _figure(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def table(path: Path = RESULTS) -> str:
    rows: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["test"]] = row
    out = ["| test | what was done | what held | figures |", "| --- | --- | --- | --- |"]
    for row in rows.values():
        figures = ", ".join(f"{k} {_figure(v)}" for k, v in row["figures"].items())
        out.append(f"| {row['test']} | {row['done']} | {row['held']} | {figures} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS))
