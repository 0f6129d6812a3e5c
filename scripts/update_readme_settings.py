"""Regenerate the README's configuration table from the settings (`iotmeter settings`)."""

from __future__ import annotations

from pathlib import Path

from iotmeter.__main__ import settings_table

START, END = "<!-- settings-table:start -->\n", "<!-- settings-table:end -->"


def main() -> None:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    head, rest = text.split(START)
    _, tail = rest.split(END)
    readme.write_text(head + START + settings_table() + "\n" + END + tail)


if __name__ == "__main__":
    main()
