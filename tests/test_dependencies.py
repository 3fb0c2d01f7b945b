"""pyproject.toml declares exactly what production code imports (deptry): the README's first
command installs no test extras, so a package only the tests bring in would be missing there."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_declared_dependencies_match_the_imports() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "deptry", "."], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
