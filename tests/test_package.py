"""Packaging: import without optional dependencies, the CLI entry points, the package layout."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import stpcore
from stpcore.cli import main

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = textwrap.dedent(
    """
    import sys
    BLOCKED = ("triton", "nvidia", "av", "xformers")

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} blocked for this test")
            return None

    sys.meta_path.insert(0, Block())
    """
)


def test_import_works_without_triton_dali_or_pyav():
    code = BLOCKER + textwrap.dedent(
        """
        import torch
        import stpcore, stpcore.ops, stpcore.models, stpcore.data
        from stpcore import ops
        from stpcore.cli import main
        q = torch.randn(1, 2, 5, 4)
        out = ops.policy_attention(q, q, q, torch.ones(1, 5))
        assert out.shape == q.shape
        reasons = ops.dispatch.explain("policy_attention", q, q, q, torch.ones(1, 5), eps=1e-6)["triton"]
        assert any("not importable" in r for r in reasons), reasons
        assert main(["info"]) == 0
        assert "triton" not in sys.modules and "av" not in sys.modules and "nvidia" not in sys.modules
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "triton is not importable" in result.stdout


def test_python_dash_m_and_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"stpcore {stpcore.__version__}" in out
    assert "policy_attention:" in out and "varlen_attention:" in out
    from stpcore.inference import auto_runtime, cpu_kind

    runtime, precision = auto_runtime()  # what --runtime auto runs here, and the deploy extras' versions
    assert f"inference on this CPU (kind {cpu_kind()}): --runtime auto runs {runtime} at precision {precision}" in out
    assert "onnxruntime " in out and "openvino " in out
    result = subprocess.run([sys.executable, "-m", "stpcore", "info"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "backends for float32 tensors on cpu" in result.stdout


def test_info_shows_the_backend_stpcore_backend_names_and_rejects_a_bad_one(capsys, monkeypatch):
    """info listed the first usable backend whatever STPCORE_BACKEND said, and a name that is no backend (every op
    call then fails) passed without a word."""
    monkeypatch.setenv("STPCORE_BACKEND", "reference")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "STPCORE_BACKEND='reference' names them" in out and "  policy_attention: reference" in out
    monkeypatch.setenv("STPCORE_BACKEND", "bogus")
    assert main(["info"]) == 2
    captured = capsys.readouterr()
    assert "policy_attention: error: policy_attention: unknown backend 'bogus'" in captured.out
    assert captured.err.startswith("error: STPCORE_BACKEND: ")


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_kernels_installed_as_stpcore_kernels():
    import stpcore.kernels

    assert Path(stpcore.kernels.__file__).resolve().parent == ROOT / "kernels"
    setup = (ROOT / "setup.py").read_text()
    assert '"stpcore.kernels": "kernels"' in setup


def test_setup_lists_every_package():
    """setup.py lists packages by hand: each folder of stpcore/ with an __init__.py must be there (a plain,
    non-editable install would silently leave out a missing one)."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    listed = next(ast.literal_eval(k.value) for k in call.keywords if k.arg == "packages")
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "stpcore").rglob("__init__.py")}
    assert found | {"stpcore.kernels"} == set(listed), (sorted(found), listed)
