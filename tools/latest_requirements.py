"""Print the project's dependencies (runtime and the `test` extra) without their version
bounds, for `make test-latest`: the newest releases, to see the next break before users do.

torch is left out: its newest PyPI build is a multi-GB CUDA one; `make test-latest` keeps the
CPU build of requirements.lock.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
names = [
    re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0]
    for spec in project["dependencies"] + project["optional-dependencies"]["test"]
]
print(" ".join(n for n in names if n != "torch"))
