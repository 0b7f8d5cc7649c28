"""Declared dependency ranges are true: `nox -s lowest` (run by .ci/run) tests the lowest versions
pyproject.toml allows, pinned in .ci/lowest.txt; this keeps the two in step."""

from __future__ import annotations

import pathlib
import re
import tomllib

from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower()


def _lower_bounds() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    drivers = project["optional-dependencies"]["postgres"] + project["optional-dependencies"]["redis"]
    bounds = {}
    for requirement in project["dependencies"] + drivers:
        marker = Requirement(requirement).marker
        if marker is not None and not marker.evaluate():
            continue  # not installed on this platform (tzdata on Windows only)
        found = re.search(r">=\s*([\w.]+)", requirement)
        assert found, f"{requirement!r} has no lower bound"
        bounds[_name(requirement)] = found.group(1)
    return bounds


def _pins() -> dict[str, str]:
    lines = (ROOT / ".ci" / "lowest.txt").read_text(encoding="utf-8").splitlines()
    pairs = [line.split("==") for line in lines if line.strip() and not line.startswith("#")]
    return {name.strip().lower(): version.strip() for name, version in pairs}


def test_the_lowest_pins_are_the_declared_lower_bounds() -> None:
    assert _pins() == _lower_bounds()


def test_the_known_too_old_versions_are_excluded() -> None:
    bounds = _lower_bounds()
    as_tuple = {name: tuple(int(p) for p in version.split(".")) for name, version in bounds.items()}
    assert as_tuple["redis"] >= (5, 0, 1)  # 5.0.0 has no Redis.aclose()
    assert as_tuple["sqlalchemy"] >= (2, 0, 38)  # older ones fail repo/driver tests


def test_ci_runs_the_lowest_session() -> None:
    assert "def lowest(session" in (ROOT / "noxfile.py").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^python3 -m nox [^\n]*-s lowest", ci, flags=re.MULTILINE), ci
