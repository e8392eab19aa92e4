"""Test-session set-up shared by every test folder.

- Without a CUDA GPU, Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET must be
  set before any kernel module is imported, so it is set here, at collection start. Where CUDA exists the
  kernel tests put their tensors on the GPU and the compiled kernels run.
- ``gpu`` tests are skipped where CUDA is absent. ``full_matrix`` tests (the rest of the GPU dtype/shape
  matrix beyond the reduced one the GPU script runs) are deselected unless ``STPCORE_FULL_MATRIX=1``.
- Under ``CI=true`` a skip whose reason is not on :data:`ALLOWED_SKIPS` fails the test: a broken
  environment (triton or PyAV missing, a toolchain that cannot compile) must not pass as a row of skips.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_ABSENT = "is absent (outside the project's machines)"
NO_CUDA = "needs a CUDA GPU"

# The only skip reasons CI accepts (substrings of the reason): no GPU for `gpu` tests, ../shared absent, an
# optional dependency the README names that CI does not install, and checks that belong to the other kind of
# machine (CUDA present / absent).
ALLOWED_SKIPS: tuple[str, ...] = (
    NO_CUDA,
    SHARED_ABSENT,
    "nvidia-dali not installed",
    "xformers is not installed",
    "the interpreter check; the GPU runs the test below",
    "checks the message where CUDA is absent",
)


def full_matrix() -> bool:
    return os.environ.get("STPCORE_FULL_MATRIX", "") not in ("", "0")


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


KERNEL_SUITE = ("kernels", "models")  # tests/<these>: the kernel and model suite the GPU script runs in full


def pytest_collection_modifyitems(config, items):
    tests_dir = Path(__file__).resolve().parent
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if path.is_relative_to(tests_dir) and path.relative_to(tests_dir).parts[0] in KERNEL_SUITE:
            item.add_marker(pytest.mark.kernel_suite)
    if not full_matrix():
        kept = [item for item in items if "full_matrix" not in item.keywords]
        if len(kept) != len(items):
            config.hook.pytest_deselected(items=[item for item in items if "full_matrix" in item.keywords])
            items[:] = kept
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _refuse_skip(report) -> None:
    """Turn a skip into a failure under CI=true unless its reason is allowed."""
    if not (_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = skip_reason(report)
    if any(allowed in reason for allowed in ALLOWED_SKIPS):
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true for a reason not on tests/conftest.py's ALLOWED_SKIPS: {reason}\n"
                       "(fix the environment, or add the reason there if the skip is legitimate)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _refuse_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _refuse_skip(outcome.get_result())  # module-level importorskip / skip


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared (the project's shared data); tests that need it skip where it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} {SHARED_ABSENT}")
    return SHARED


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
