"""Regenerate README.md's config table from the declared settings (nkat.supervisor.config.KEYS).

    python tools/config_table.py          # rewrite the table between its markers
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from nkat.supervisor.config import KEYS

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- config-table -->", "<!-- /config-table -->"


def table() -> str:
    rows = ["| key | default | allowed | seed name | what it does |",
            "| --- | --- | --- | --- | --- |"]
    for k in KEYS:
        default = "null" if k.default is None else json.dumps(k.default)
        seed = k.spec.seed or ""
        rows.append(f"| `{k.name}` | `{default}` | {k.allowed()} | {seed} | {k.help} |")
    return "\n".join(rows)


def main() -> None:
    text = README.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    README.write_text(pattern.sub(f"{START}\n{table()}\n{END}", text))


if __name__ == "__main__":
    main()
