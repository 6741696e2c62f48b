"""Keep `docs/results.md` in step with the benchmarks: each benchmark owns one marked section."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DOC = ROOT / "docs" / "results.md"
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


def git_commit() -> str:
    """The checked-out commit, marked when tracked files have uncommitted changes."""
    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()

    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return git("rev-parse", "HEAD") + (" (with uncommitted changes)" if dirty else "")
