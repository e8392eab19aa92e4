"""`stpcore export`: the inference path in ONNX, checked against PyTorch with ONNX Runtime; bad input named."""

from __future__ import annotations

import pytest
import torch

onnxruntime = pytest.importorskip("onnxruntime")  # the deploy extra: CI installs it
pytest.importorskip("onnxscript")

from stpcore.deploy import _VideoAndKeep, export_onnx, verify_onnx  # noqa: E402
from stpcore.models import STPrivacy, STPrivacyConfig  # noqa: E402
from stpcore.testing import RandomClipLoader, separate_keep_scores  # noqa: E402


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """A tiny STPrivacy the test trains itself (a few steps of phases 1 and 2)."""
    from stpcore.training import TrainConfig, Trainer

    out = tmp_path_factory.mktemp("train")
    cfg = TrainConfig(data_root="unused", out_dir=str(out), preset="tiny", batch_size=4, phase1_epochs=2,
                      phase2_epochs=1, base_lr=0.5, warmup_epochs=0, progress=False, labels="unused.csv")
    Trainer(cfg, RandomClipLoader(3, 4, 8, 32)).fit()
    return out / "stprivacy.pt"


def test_a_trained_tiny_model_exports_and_matches_pytorch(trained_tiny, tmp_path):
    from stpcore.models import load_anonymizer

    model = load_anonymizer(trained_tiny)
    report = export_onnx(model, tmp_path / "tiny.onnx")
    assert report.keep_agreement >= 0.99 and report.max_video_diff < 1e-4, report
    session = onnxruntime.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    (clips,) = session.get_inputs()
    assert clips.name == "clips" and isinstance(clips.shape[0], str)  # the batch axis is dynamic
    assert [o.name for o in session.get_outputs()] == ["video", "keep"]
    # Another keep ratio is another graph with other constants.
    half = export_onnx(model, tmp_path / "half.onnx", keep_ratio=0.5)
    assert half.keep_ratio == 0.5 and half.keep_agreement >= 0.99


def test_vit_small_with_separated_scores_exports_and_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    model = separate_keep_scores(STPrivacy(STPrivacyConfig.from_name("vit_small")), scale=10.0)
    report = export_onnx(model, tmp_path / "vit_small.onnx")
    assert report.keep_agreement >= 0.99 and report.max_video_diff < 1e-3, report


def test_export_cli_reports_the_check(trained_tiny, tmp_path, capsys):
    from stpcore.cli import main

    assert main(["export", str(trained_tiny), str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "keep decisions equal 100.00%" in out and "adaptive mode stays in PyTorch" in out


def test_an_operator_onnx_cannot_express_is_named(tmp_path, monkeypatch):
    """Without the decompositions the custom ops reach the exporter, which has no translation for them."""
    import stpcore.ops.export as ops_export

    monkeypatch.setattr(ops_export, "decompositions", lambda onnx=False: {})
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match=r"ONNX export failed at operator stpcore\.\w+"):
        export_onnx(STPrivacy(STPrivacyConfig.from_name("tiny")), tmp_path / "x.onnx", verify=False)


def test_a_corrupt_onnx_file_is_an_error_not_a_crash(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    module = _VideoAndKeep(STPrivacy(STPrivacyConfig.from_name("tiny")).eval(), None)
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        verify_onnx(bad, module)


def test_a_missing_runtime_names_the_extra(tmp_path, monkeypatch, trained_tiny, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # importing it now raises ImportError
    from stpcore.cli import main

    assert main(["export", str(trained_tiny), str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "onnxscript is not installed" in err and "stpcore[deploy]" in err and not (tmp_path / "m.onnx").exists()


def test_clip_anonymizer_on_onnxruntime_matches_torch(trained_tiny):
    from stpcore.inference import ClipAnonymizer
    from stpcore.models import load_anonymizer

    model = load_anonymizer(trained_tiny)
    clips = torch.randn(5, 3, 8, 32, 32, generator=torch.Generator().manual_seed(3))
    torch_run = ClipAnonymizer(model, precision="fp32")(clips)
    ort = ClipAnonymizer(model, runtime="onnxruntime")
    assert "onnxruntime fp32" in ort.description
    got = ort(clips)
    assert torch.equal(got.keep, torch_run.keep) and torch.equal(got.kept_positions, torch_run.kept_positions)
    torch.testing.assert_close(got.video, torch_run.video, rtol=1e-4, atol=1e-4)
    half = ort(clips[:2], keep_ratio=0.5)  # another ratio: another graph, exported on first use
    assert torch.equal(half.keep, ClipAnonymizer(model, precision="fp32")(clips[:2], keep_ratio=0.5).keep)
    with pytest.raises(ValueError, match="adaptive mode has data-dependent shapes"):
        ort(clips, adaptive_threshold=0.5)


_OPENVINO_CHECK = """
import sys, torch
from stpcore.inference import ClipAnonymizer, cpu_has_native_bf16
from stpcore.models import load_anonymizer
model = load_anonymizer(sys.argv[1])
clips = torch.randn(4, 3, 8, 32, 32, generator=torch.Generator().manual_seed(4))
want = ClipAnonymizer(model, precision="fp32")(clips)
fp32 = ClipAnonymizer(model, runtime="openvino", precision="fp32")
got = fp32(clips)
assert torch.equal(got.keep, want.keep) and "openvino fp32" in fp32.description
torch.testing.assert_close(got.video, want.video, rtol=1e-4, atol=1e-4)
auto = ClipAnonymizer(model, runtime="openvino")
assert auto.runtime_precision == ("bf16" if cpu_has_native_bf16() else "fp32")
assert (auto(clips).keep == want.keep).float().mean() >= 0.95
print("ok")
"""


def test_clip_anonymizer_on_openvino_matches_torch(trained_tiny):
    """In a process of its own: with OpenVINO loaded, a later test in the same process that sends itself SIGTERM
    during training crashed (segfault; not understood yet), so the suite's workers never load it."""
    import subprocess
    import sys

    pytest.importorskip("openvino")
    run = subprocess.run([sys.executable, "-c", _OPENVINO_CHECK, str(trained_tiny)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


@pytest.mark.parametrize("kwargs, match", [
    ({"runtime": "tensorrt"}, r"runtime must be one of \['torch', 'onnxruntime', 'openvino'\]"),
    ({"runtime": "onnxruntime", "precision": "int8"}, "runs fp32 on the CPU"),
    ({"runtime": "openvino", "precision": "int8"}, "runs fp32/bf16 on the CPU"),
    ({"runtime": "onnxruntime", "compile": True}, "without torch.compile"),
])
def test_bad_runtime_settings_are_refused(kwargs, match):
    from stpcore.inference import ClipAnonymizer

    with pytest.raises(ValueError, match=match):
        ClipAnonymizer(STPrivacy(STPrivacyConfig.from_name("tiny")), **kwargs)


def test_runtime_anonymizers_name_a_missing_extra_up_front_and_leave_no_files(trained_tiny, monkeypatch):
    import glob
    import sys
    import tempfile

    from stpcore.inference import ClipAnonymizer
    from stpcore.models import load_anonymizer

    model = load_anonymizer(trained_tiny)
    pattern = f"{tempfile.gettempdir()}/stpcore-onnx-*"
    before = set(glob.glob(pattern))
    ClipAnonymizer(model, runtime="onnxruntime")(torch.randn(1, 3, 8, 32, 32))
    assert set(glob.glob(pattern)) == before  # the exported graph lives in the session, not in /tmp
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ValueError, match=r"onnxscript is not installed.*stpcore\[deploy\]"):
        ClipAnonymizer(model, runtime="onnxruntime")


def test_anonymize_refuses_adaptive_with_an_onnx_runtime(tmp_path, capsys):
    from stpcore.cli import main

    assert main(["anonymize", "x.mp4", "-o", str(tmp_path), "--checkpoint", "c.pt", "--runtime", "onnxruntime",
                 "--adaptive", "0.5"]) == 2
    assert "--adaptive runs in PyTorch only" in capsys.readouterr().err
