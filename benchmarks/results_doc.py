"""Keep `docs/results.md` in step with the benchmarks: each benchmark owns one marked section."""

from __future__ import annotations

import datetime
from pathlib import Path

RESULTS_DOC = Path(__file__).resolve().parents[1] / "docs" / "results.md"
HEADER = "# Results\n\nEvery figure below was written by the benchmark command shown with it.\n"


def replace_section(name: str, body: str, command: str) -> None:
    """Replace (or append) the section between this benchmark's markers."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    stamp = datetime.date.today().isoformat()
    section = f"{start}\nProduced by `{command}` on {stamp}.\n\n{body}\n{end}"
    text = RESULTS_DOC.read_text() if RESULTS_DOC.exists() else HEADER
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS_DOC.write_text(text)
