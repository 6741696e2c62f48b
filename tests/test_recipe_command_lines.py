"""The recipes' command lines: every recipe's `--help`, and the run comparison table."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(path.stem for path in (ROOT / "recipes").glob("*.py"))


@pytest.mark.parametrize("name", RECIPES)
def test_help_of_every_recipe_prints_usage_and_exits_0(name, capsys):
    recipe = load_recipe(name)
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
