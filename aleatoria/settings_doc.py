"""The settings tables of the docs, made from ``config.SETTINGS``.

README.md and docs/operations.md carry the table of every setting between two markers,
docs/scaleout.md the table of the settings marked ``scale_out`` between markers of its own;
``python scripts/settings_table.py`` rewrites them there (``--check`` only says whether they
are current), and tests/test_settings_doc.py fails when a file's table differs from what
``SETTINGS`` gives.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from aleatoria.config import SETTINGS, Setting

BEGIN = "<!-- settings-table: made from aleatoria/config.py SETTINGS by scripts/settings_table.py -->"
SCALE_OUT_BEGIN = (
    "<!-- settings-table scale-out: the settings marked scale_out, made from aleatoria/config.py "
    "SETTINGS by scripts/settings_table.py -->"
)
END = "<!-- /settings-table -->"
REGENERATE = "python scripts/settings_table.py"


@attrs.frozen
class Table:
    """One kind of settings table: the marker that opens it and which settings it lists."""

    begin: str
    scale_out_only: bool = False

    def settings(self) -> tuple[Setting, ...]:
        return tuple(s for s in SETTINGS if s.scale_out or not self.scale_out_only)


EVERY_SETTING = Table(BEGIN)
SCALE_OUT = Table(SCALE_OUT_BEGIN, scale_out_only=True)
# Each file with a table, and the table it has.
FILES: dict[str, Table] = {
    "README.md": EVERY_SETTING,
    "docs/operations.md": EVERY_SETTING,
    "docs/scaleout.md": SCALE_OUT,
}


def markdown_table(settings: Iterable[Setting] = SETTINGS) -> str:
    """``settings`` (by default every one) as a Markdown table: variable, flag, default,
    meaning."""
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for setting in settings:
        flag = f"`{setting.flag}`" + (" (repeatable)" if setting.repeatable else "")
        meaning = setting.help.replace("|", "\\|")
        rows.append(f"| `{setting.env}` | {flag} | {_default(setting)} | {meaning} |")
    return "\n".join(rows) + "\n"


def _default(setting: Setting) -> str:
    value = setting.default
    if setting.default_text is not None or value is None or isinstance(value, bool) or value == ():
        return setting.shown_default
    return f"`{setting.shown_default}`"


def with_table(text: str, where: str = "the file", table: Table | None = None) -> str:
    """``text`` with the table between its markers replaced by the current one. ``table``:
    which one (by default the one ``FILES`` gives ``where``, else every setting). Raises
    ValueError if the markers are missing."""
    if table is None:
        table = FILES.get(where, EVERY_SETTING)
    start = text.find(table.begin)
    end = text.find(END, start)
    if start < 0 or end < 0:
        raise ValueError(f"{where} has no settings table markers ({table.begin} ... {END})")
    return text[: start + len(table.begin)] + "\n" + markdown_table(table.settings()) + text[end:]
