"""The settings table of the docs, made from ``config.SETTINGS``.

README.md and docs/operations.md carry the table between two markers;
``python scripts/settings_table.py`` rewrites it there (``--check`` only says whether it is
current), and tests/test_settings_doc.py fails when a file's table differs from what
``SETTINGS`` gives.
"""

from __future__ import annotations

from aleatoria.config import SETTINGS, Setting

BEGIN = "<!-- settings-table: made from aleatoria/config.py SETTINGS by scripts/settings_table.py -->"
END = "<!-- /settings-table -->"
REGENERATE = "python scripts/settings_table.py"
FILES = ("README.md", "docs/operations.md")


def markdown_table() -> str:
    """Every setting as a Markdown table: variable, flag, default, meaning."""
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for setting in SETTINGS:
        flag = f"`{setting.flag}`" + (" (repeatable)" if setting.repeatable else "")
        meaning = setting.help.replace("|", "\\|")
        rows.append(f"| `{setting.env}` | {flag} | {_default(setting)} | {meaning} |")
    return "\n".join(rows) + "\n"


def _default(setting: Setting) -> str:
    value = setting.default
    if setting.default_text is not None or value is None or isinstance(value, bool) or value == ():
        return setting.shown_default
    return f"`{setting.shown_default}`"


def with_table(text: str, where: str = "the file") -> str:
    """``text`` with the table between its markers replaced by the current one. Raises
    ValueError if the markers are missing."""
    start = text.find(BEGIN)
    end = text.find(END, start)
    if start < 0 or end < 0:
        raise ValueError(f"{where} has no settings table markers ({BEGIN} ... {END})")
    return text[: start + len(BEGIN)] + "\n" + markdown_table() + text[end:]
