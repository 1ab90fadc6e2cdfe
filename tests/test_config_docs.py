"""`docs/configuration.md` and `.env.example` list exactly the variables `Settings` reads,
with the defaults it really has and the production requirements it really enforces."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Any

import pytest

from agent_orchestrator.config import PRODUCTION_REQUIRED, Settings

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
ENV_EXAMPLE = ROOT / ".env.example"

_ROW = re.compile(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|(.*)$")
_ENV_LINE = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=")


def settings_variables() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


def doc_rows() -> dict[str, list[str]]:
    """Variable name -> the other cells of its row in the table."""
    rows: dict[str, list[str]] = {}
    for line in DOC.read_text().splitlines():
        match = _ROW.match(line.strip())
        if match:
            name, rest = match.groups()
            assert name not in rows, f"{name} is listed twice in {DOC.name}"
            rows[name] = [cell.strip() for cell in rest.strip().strip("|").split("|")]
    return rows


def env_example_variables() -> set[str]:
    names: list[str] = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = _ENV_LINE.match(line.strip())
        if match:
            names.append(match.group(1))
    duplicates = {name for name in names if names.count(name) > 1}
    assert not duplicates, f"listed twice in {ENV_EXAMPLE.name}: {sorted(duplicates)}"
    return set(names)


def drift(listed: set[str], where: str) -> str:
    expected = settings_variables()
    missing = sorted(expected - listed)
    extra = sorted(listed - expected)
    problems = []
    if missing:
        problems.append(f"missing from {where}: {', '.join(missing)}")
    if extra:
        problems.append(f"listed in {where} but not in Settings: {', '.join(extra)}")
    return "; ".join(problems)


def test_the_parsers_find_the_tables() -> None:
    assert len(doc_rows()) >= 20
    assert len(env_example_variables()) >= 20


@pytest.mark.parametrize("where", ["docs/configuration.md", ".env.example"])
def test_every_setting_is_listed_and_nothing_else(where: str) -> None:
    listed = set(doc_rows()) if where.startswith("docs") else env_example_variables()
    assert drift(listed, where) == ""


def test_drift_is_reported_by_name() -> None:
    listed = (settings_variables() - {"SESSION_TTL"}) | {"NOT_A_SETTING"}
    message = drift(listed, "the doc")
    assert "missing from the doc: SESSION_TTL" in message
    assert "not in Settings: NOT_A_SETTING" in message


def _documented_default(default: Any) -> str | None:
    """How the doc writes a scalar default; None for defaults not worth comparing."""
    if default is None:
        return "unset"
    if isinstance(default, Enum):
        return f"`{default.value}`"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, float) and default.is_integer():
        return f"`{int(default)}`"
    if isinstance(default, int | float | str):
        return f"`{default}`"
    return None


def test_documented_defaults_and_production_requirements_match() -> None:
    rows = doc_rows()
    wrong = []
    for name, field in Settings.model_fields.items():
        cells = rows.get(name.upper())
        if cells is None or len(cells) < 3:
            wrong.append(f"{name.upper()}: row needs default, production, meaning")
            continue
        expected = _documented_default(field.get_default(call_default_factory=True))
        if expected is not None and cells[0] != expected:
            wrong.append(f"{name.upper()}: doc says {cells[0]}, Settings has {expected}")
        required = cells[1].lower().startswith("yes")
        if required != (name.upper() in PRODUCTION_REQUIRED):
            wrong.append(f"{name.upper()}: production column says {cells[1]!r}")
        if not cells[2]:
            wrong.append(f"{name.upper()}: no meaning given")
    assert wrong == []


def test_env_example_values_are_valid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Uncommenting every line that shows a value yields a configuration that starts."""
    monkeypatch.chdir(tmp_path)
    for name in settings_variables():
        monkeypatch.delenv(name, raising=False)
    shown = 0
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(.+)$", line.strip())
        if match:
            monkeypatch.setenv(*match.groups())
            shown += 1
    settings = Settings()
    assert shown >= 20
    assert settings.database_url is not None
