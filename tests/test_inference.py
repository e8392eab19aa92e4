from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stpcore import inference
from stpcore.inference import (
    PRECISIONS,
    AnonymizedClips,
    ClipAnonymizer,
    cpu_has_native_bf16,
    int8_unavailable_reason,
    load_trained,
)
from stpcore.models import STPrivacy, STPrivacyConfig
from stpcore.testing import separate_keep_scores
from stpcore.tubelets import keep_to_pixels

CFG = STPrivacyConfig.from_name("tiny")  # 8 x 32 x 32 clips, 4 slots x 16 tokens, kept per slot 11, 7, 5
B = 4
VARIANTS = ["fp32", "bf16", "auto"] + ([] if int8_unavailable_reason() else ["int8"])
LOW_PRECISION = [p for p in VARIANTS if p in ("bf16", "int8")]


def _separated(model: STPrivacy) -> STPrivacy:
    # scale 10 rather than 100: low-precision top-k must measure precision, not tie-breaking (see the helper).
    return separate_keep_scores(model, scale=10.0)


@pytest.fixture(scope="module")
def model() -> STPrivacy:
    torch.manual_seed(1)
    return _separated(STPrivacy(STPrivacyConfig.from_name("tiny")))


@pytest.fixture
def clips() -> torch.Tensor:
    return torch.randn(B, 3, CFG.num_frames, CFG.image_size, CFG.image_size)


def _pixel_mask(keep: torch.Tensor, cfg=CFG) -> torch.Tensor:
    return keep_to_pixels(keep, cfg.grid, cfg.tubelet).expand(-1, 3, -1, -1, -1).bool()  # (B, 3, T, H, W)


def _check_structure(out: AnonymizedClips, cfg, batch: int, per_slot: int) -> None:
    assert isinstance(out, AnonymizedClips)
    assert out.video.shape == (batch, 3, cfg.num_frames, cfg.image_size, cfg.image_size)
    assert out.video.dtype == torch.float32 and out.keep.dtype == torch.float32
    assert out.keep.shape == (batch, cfg.num_tokens)
    assert bool(((out.keep == 0) | (out.keep == 1)).all())
    counts = out.keep.reshape(batch, cfg.num_slots, cfg.tokens_per_slot).sum(-1)
    assert bool((counts == per_slot).all()), counts
    assert out.kept_positions is not None and out.kept_positions.shape == (batch, cfg.num_slots * per_slot)
    assert bool((out.keep.gather(1, out.kept_positions) == 1).all())
    mask = _pixel_mask(out.keep, cfg)
    assert torch.equal(out.video[~mask], torch.zeros_like(out.video[~mask])), "dropped tubelets must be exactly zero"
    assert bool(torch.isfinite(out.video).all()) and bool((out.video[mask] != 0).any())


@pytest.mark.parametrize("precision", VARIANTS)
def test_every_variant_shapes_counts_and_zeros(model, clips, precision):
    anon = ClipAnonymizer(model, precision=precision)
    assert anon.precision in PRECISIONS and anon.precision != "auto"
    _check_structure(anon(clips), CFG, B, CFG.kept_per_slot()[-1])
    # A deployment keep ratio changes the per-slot counts without retraining.
    _check_structure(anon(clips, keep_ratio=0.5), CFG, B, CFG.kept_per_slot(0.5)[-1])


# -- "auto": the chooser, with the probes' answers fixed; then the probes against sources of their own ----------

# (native bf16 on the CPU, why int8 cannot run or None) -> what "auto" picks on CPU.
AUTO_ON_CPU = [
    (True, None, "bf16"),
    (True, "no x86/fbgemm engine", "bf16"),
    (False, None, "int8"),
    (False, "no x86/fbgemm engine", "fp32"),
]


@pytest.mark.parametrize("native_bf16, int8_reason, expected", AUTO_ON_CPU,
                         ids=["native-bf16-int8", "native-bf16-no-int8", "emulated-bf16-int8", "emulated-bf16-no-int8"])
def test_auto_on_cpu_choice_for_each_probe_answer(monkeypatch, native_bf16, int8_reason, expected):
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(inference, "int8_unavailable_reason", lambda: int8_reason)
    assert inference._resolve_precision("auto", torch.device("cpu")) == expected
    for explicit in ("fp32", "bf16"):  # a named precision is taken as it is
        assert inference._resolve_precision(explicit, torch.device("cpu")) == explicit
    if int8_reason is None:
        assert inference._resolve_precision("int8", torch.device("cpu")) == "int8"
    else:
        with pytest.raises(ValueError, match=f"int8.* unavailable: {int8_reason}"):
            inference._resolve_precision("int8", torch.device("cpu"))


@pytest.mark.parametrize("native_bf16, int8_reason, expected", [(True, None, "bf16"), (False, "no engine", "fp32")])
def test_auto_on_cpu_builds_what_it_chose(model, monkeypatch, native_bf16, int8_reason, expected):
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(inference, "int8_unavailable_reason", lambda: int8_reason)
    anon = ClipAnonymizer(model)
    assert anon.precision == expected
    predictors = {type(p).__name__ for p in anon.model.score_predictor}
    assert predictors == ({"_Fp32Predictor"} if expected == "bf16" else {type(model.score_predictor[0]).__name__})


@pytest.mark.parametrize("cuda_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_follows_the_gpu_not_the_cpu_probes(monkeypatch, cuda_bf16, expected):
    def not_asked():
        raise AssertionError("the CPU probes must not decide the precision on CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: cuda_bf16)
    monkeypatch.setattr(inference, "cpu_has_native_bf16", not_asked)
    monkeypatch.setattr(inference, "int8_unavailable_reason", not_asked)
    assert inference._resolve_precision("auto", torch.device("cuda")) == expected


@pytest.mark.parametrize("amx, avx512_bf16", [(True, False), (False, True), (True, True), (False, False)])
def test_native_bf16_probe_reads_both_torch_flags(monkeypatch, amx, avx512_bf16):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert cpu_has_native_bf16() is (amx or avx512_bf16)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert cpu_has_native_bf16() is False  # a torch without the probes: assume emulated bf16


def test_native_bf16_probe_agrees_with_proc_cpuinfo():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo (not Linux): nothing independent to compare the probe with")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    assert cpu_has_native_bf16() is bool(flags & {"amx_tile", "avx512_bf16"}), sorted(f for f in flags if "512" in f)


def _int8_linear_runs() -> bool:
    """Whether a dynamic int8 Linear runs here on the x86 or fbgemm engine, found by running one."""
    try:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        return False
    previous = torch.backends.quantized.engine
    try:
        for engine in ("x86", "fbgemm"):
            try:
                torch.backends.quantized.engine = engine
                linear, x = torch.nn.Linear(16, 8), torch.randn(4, 16)
                with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices
                    warnings.simplefilter("ignore")
                    quantized = quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8)
                    runs = isinstance(quantized[0], DynamicInt8Linear) and torch.allclose(quantized(x), linear(x),
                                                                                          atol=0.1)
                if runs:
                    return True
            except RuntimeError:  # this engine is not in the build
                continue
        return False
    finally:
        torch.backends.quantized.engine = previous


def test_int8_probe_agrees_with_running_an_int8_linear():
    reason = int8_unavailable_reason()
    assert (reason is None) is _int8_linear_runs(), reason


def test_int8_probe_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(torch.backends, "quantized", SimpleNamespace(supported_engines=["qnnpack", "none"]))
    assert "no x86/fbgemm quantized engine" in int8_unavailable_reason() and "qnnpack" in int8_unavailable_reason()
    monkeypatch.setitem(sys.modules, "torch.ao.quantization", None)  # the import fails, as in a torch without it
    assert "quantize_dynamic is not available" in int8_unavailable_reason()


def test_fp32_equals_the_plain_model_exactly(model, clips):
    anon = ClipAnonymizer(model, precision="fp32")
    plain = model.eval()
    with torch.no_grad():
        for kwargs in ({}, {"keep_ratio": 0.5}, {"adaptive_threshold": 0.5}):
            ref, out = plain(clips, **kwargs), anon(clips, **kwargs)
            assert torch.equal(out.video, ref.video), kwargs
            assert torch.equal(out.keep, ref.keep), kwargs
    assert torch.equal(anon(clips).kept_positions, plain(clips).kept_positions)


@pytest.mark.parametrize("precision", LOW_PRECISION)
@pytest.mark.parametrize("mode", ["topk", "adaptive"])
def test_low_precision_agrees_with_fp32(model, precision, mode):
    clips = torch.randn(8, 3, CFG.num_frames, CFG.image_size, CFG.image_size)
    kwargs = {"adaptive_threshold": 0.5} if mode == "adaptive" else {}
    ref = ClipAnonymizer(model, precision="fp32")(clips, **kwargs)
    out = ClipAnonymizer(model, precision=precision)(clips, **kwargs)
    agreement = (out.keep == ref.keep).float().mean().item()
    assert agreement >= 0.98, f"{precision} {mode}: keep agreement {agreement:.4f} < 0.98"
    # Not trivial: some tokens are dropped and some kept.
    assert 0 < int(ref.keep.sum()) < ref.keep.numel()
    # On tubelets both keep, the pixels are close. Measured here: relative RMS ~0.004 (bf16) and ~0.002
    # (int8), max abs error ~0.003 with outputs up to ~0.6; bounds 5x / 15x above that.
    both = _pixel_mask(out.keep * ref.keep)
    diff, expected = out.video[both] - ref.video[both], ref.video[both]
    rel_rms = (diff.pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()).item()
    assert rel_rms < 0.02, f"{precision} {mode}: relative RMS {rel_rms:.3g}"
    assert diff.abs().max().item() < 0.05
    # Zeros are exact wherever this variant dropped a tubelet.
    dropped = ~_pixel_mask(out.keep)
    assert torch.equal(out.video[dropped], torch.zeros_like(out.video[dropped]))


@pytest.mark.parametrize("precision", VARIANTS)
def test_the_model_passed_in_is_not_modified(precision):
    model = STPrivacy(CFG).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    anon = ClipAnonymizer(model, precision=precision)
    anon(torch.randn(1, 3, CFG.num_frames, CFG.image_size, CFG.image_size))
    assert model.training, "the caller's model must stay in train mode"
    assert [type(m) for m in model.modules()] == types, "modules were swapped in the caller's model"
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert all(p.requires_grad for p in model.parameters())
    assert anon.model is not model


def test_bad_arguments_raise(model, clips):
    with pytest.raises(ValueError, match=r"precision must be one of .*'auto'.*'fp32'.*'bf16'.*'int8'.*'fp16'"):
        ClipAnonymizer(model, precision="fp16")
    with pytest.raises(ValueError, match="CPU only"):
        ClipAnonymizer(model, device="cuda", precision="int8")  # refused before anything touches CUDA
    with pytest.raises(ValueError, match="threads"):
        ClipAnonymizer(model, precision="fp32", threads=0)
    with pytest.raises(ValueError, match="STPrivacy"):
        ClipAnonymizer(torch.nn.Linear(2, 2))
    anon = ClipAnonymizer(model, precision="fp32")
    with pytest.raises(ValueError, match="float"):
        anon(clips.to(torch.uint8))
    with pytest.raises(ValueError, match="cannot be combined"):
        anon(clips, keep_ratio=0.5, adaptive_threshold=0.5)


def test_threads_and_description(model):
    old = torch.get_num_threads()
    try:
        anon = ClipAnonymizer(model, precision="fp32", threads=1)
        assert torch.get_num_threads() == 1
        assert anon.description == "cpu, fp32, 1 threads"
        assert "bf16 autocast" in ClipAnonymizer(model, precision="bf16").description
    finally:
        torch.set_num_threads(old)


def test_load_trained_round_trip(model, clips, tmp_path):
    from stpcore.models import save_anonymizer

    path = save_anonymizer(model, tmp_path / "stprivacy.pt")
    anon = load_trained(path, precision="fp32")
    ref = ClipAnonymizer(model, precision="fp32")(clips)
    out = anon(clips)
    assert torch.equal(out.video, ref.video) and torch.equal(out.keep, ref.keep)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_vit_small_single_clip(precision):
    cfg = STPrivacyConfig.from_name("vit_small")
    model = _separated(STPrivacy(cfg))
    clip = torch.randn(1, 3, cfg.num_frames, cfg.image_size, cfg.image_size)
    out = ClipAnonymizer(model, precision=precision)(clip)
    _check_structure(out, cfg, 1, 16)  # 8 slots x 16 = 128 of 392 tokens
    if precision == "auto":
        # A sanity bound only: one clip has 392 decisions, so each flip costs 0.26%; the 98% bar is measured
        # at B=8 in benchmarks/bench_inference.py.
        ref = ClipAnonymizer(model, precision="fp32")(clip)
        assert (out.keep == ref.keep).float().mean().item() >= 0.95


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
def test_cuda_device_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        ClipAnonymizer(STPrivacy(STPrivacyConfig.from_name("tiny")), device="cuda")


def test_numerics_say_when_a_clips_result_depends_on_its_batch():
    """Dynamic int8 quantizes each layer's input with one scale over the batch: a clip's output moves with the other
    clips beside it (what ``numerics["batch_dependent"]`` says, and anonymize's record then keeps the batch size);
    fp32 gives a clip the same output alone or in a batch."""
    from stpcore.inference import ClipAnonymizer, int8_unavailable_reason
    from stpcore.models import STPrivacy, STPrivacyConfig

    torch.manual_seed(0)
    model = STPrivacy(STPrivacyConfig.from_name("tiny")).eval()
    x = torch.randn(1, 3, 8, 32, 32, generator=torch.Generator().manual_seed(1))
    beside = torch.cat([x, 3 * torch.randn(1, 3, 8, 32, 32, generator=torch.Generator().manual_seed(2))])
    fp32 = ClipAnonymizer(model, precision="fp32")
    assert fp32.numerics == {"runtime": "torch", "precision": "fp32", "device": "cpu", "batch_dependent": False}
    assert torch.equal(fp32(x).video[0], fp32(beside).video[0])
    # A compiled anonymizer says so (anonymize's --skip-existing took its outputs for eager ones); eager records
    # are as before.
    assert ClipAnonymizer(model, precision="fp32", compile=True).numerics == {**fp32.numerics, "compiled": True}
    if int8_unavailable_reason() is not None:
        pytest.skip(int8_unavailable_reason())
    int8 = ClipAnonymizer(model, precision="int8")
    assert int8.numerics["batch_dependent"] and int8.numerics["precision"] == "int8"
    assert not torch.equal(int8(x).video[0], int8(beside).video[0])


def test_prepare_runs_each_compiled_graph_once_a_batch_of_one_included():
    """A compiled model has a graph for a batch of one clip and a dynamic one for 2 or more: prepare() runs each
    size class it is given once (black clips of the model's shape); eager PyTorch runs one black clip, once (its
    first forward's one-time setup took about 3 s of a live stream's first chunk)."""
    from stpcore.inference import ClipAnonymizer
    from stpcore.models import STPrivacy, STPrivacyConfig

    anon = ClipAnonymizer(STPrivacy(STPrivacyConfig.from_name("tiny")), precision="fp32")
    seen = []
    real = anon._forward
    anon._forward = lambda video, **kw: seen.append((tuple(video.shape), float(video.abs().max()))) or real(video, **kw)
    anon.prepare([1, 4, 8])
    anon.prepare(4)
    assert seen == [((1, 3, 8, 32, 32), 0.0)]  # eager: one clip, once
    seen.clear()
    anon.compiled = True  # stands in for compile=True, whose compile takes a minute on a small CPU
    anon.prepare([4, 8])
    anon.prepare([1, 4, 3], keep_ratio=0.5)
    anon.prepare(8)
    assert seen == [((2, 3, 8, 32, 32), 0.0), ((1, 3, 8, 32, 32), 0.0), ((2, 3, 8, 32, 32), 0.0)]
    with pytest.raises(ValueError, match="positive ints"):
        anon.prepare([0])
