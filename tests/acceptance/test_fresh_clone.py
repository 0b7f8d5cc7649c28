"""A fresh clone passes its own tests: nothing in the test suite reads a file outside the repository."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
SKIP = shutil.ignore_patterns(".git", ".nox", ".venv", "__pycache__", ".pytest_cache", ".mypy_cache", "*.db")


def test_readme_tests_pass_in_a_clone_with_nothing_beside_it(tmp_path: pathlib.Path) -> None:
    clone = tmp_path / "alone" / "asyncflow"
    shutil.copytree(ROOT, clone, ignore=SKIP)
    assert not (clone.parent / "shared").exists()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/acceptance/test_readme.py",
            "-k",
            "go_table or setup_commands or cli_commands",
        ],
        cwd=clone,
        env=dict(os.environ, PYTHONPATH=str(clone)),
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout, result.stdout
