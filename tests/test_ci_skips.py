"""Under CI=true a skip whose reason is not on tests/conftest.py's ALLOWED_SKIPS fails: a broken environment
(triton or PyAV missing, a compile toolchain that does not work) must not pass as a row of skips. Checked by
running pytest on small test files with tests/conftest.py loaded as a plugin."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TESTS = textwrap.dedent(
    """
    import pytest

    def test_broken_dependency():
        pytest.skip("could not import 'something': No module named 'something'")

    def test_allowed_reason():
        pytest.skip("needs a CUDA GPU")

    @pytest.mark.skipif(True, reason="nvidia-dali not installed")
    def test_allowed_marker():
        pass
    """
)
MODULE_SKIP = "import pytest\npytest.importorskip('no_such_module_here')\n\ndef test_never():\n    pass\n"


def _pytest(tmp_path: Path, ci: str | None, source: str = TESTS) -> subprocess.CompletedProcess:
    (tmp_path / "test_inner.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "CI"))}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           "-p", "no:xdist", "-o", "addopts=", "--rootdir", str(tmp_path), "-rA",
                           str(tmp_path / "test_inner.py")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def test_ci_fails_skips_that_are_not_allowed(tmp_path):
    proc = _pytest(tmp_path, "true")
    out = proc.stdout
    assert proc.returncode == 1, out
    assert "FAILED" in out and "test_inner.py::test_broken_dependency" in out and "1 failed, 2 skipped" in out
    assert "not on tests/conftest.py's ALLOWED_SKIPS" in out
    assert "SKIPPED" in out and "needs a CUDA GPU" in out and "nvidia-dali not installed" in out


def test_ci_fails_a_module_level_importorskip(tmp_path):
    proc = _pytest(tmp_path, "true", MODULE_SKIP)
    assert proc.returncode != 0 and "ERROR" in proc.stdout, proc.stdout
    assert "not on tests/conftest.py's ALLOWED_SKIPS: Skipped: could not import 'no_such_module_here'" in proc.stdout
    outside = _pytest(tmp_path, None, MODULE_SKIP)  # outside CI it stays a skip (5: no test ran)
    assert outside.returncode in (0, 5) and "1 skipped" in outside.stdout, outside.stdout


def test_outside_ci_skips_stay_skips(tmp_path):
    proc = _pytest(tmp_path, None)
    assert proc.returncode == 0, proc.stdout
    assert "3 skipped" in proc.stdout and "failed" not in proc.stdout
