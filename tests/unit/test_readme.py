"""The README tells the truth: its configuration table is the settings, and CI runs its test
command."""

from __future__ import annotations

import re
from pathlib import Path

from iotmeter.__main__ import settings_table
from iotmeter.config import Settings, env_name


def readme(repo_root: Path) -> str:
    return (repo_root / "README.md").read_text()


def test_configuration_table_is_generated_from_the_settings(repo_root: Path) -> None:
    text = readme(repo_root)
    table = text.split("<!-- settings-table:start -->\n")[1].split("<!-- settings-table:end -->")[0]
    assert table.strip() == settings_table(), "run `iotmeter settings` and paste it in the README"
    for name in Settings.model_fields:
        assert f"`{env_name(name)}`" in table


def test_quick_start_is_two_commands_and_ci_runs_the_test_one(repo_root: Path) -> None:
    text = readme(repo_root)
    quick_start = text.split("## Quick start")[1].split("```sh\n")[1].split("```")[0]
    commands = [line.split("#")[0].strip() for line in quick_start.splitlines() if line.strip()]
    assert commands == ["make run", "make test"]
    ci = (repo_root / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.MULTILINE)
