"""Fast inference of a trained STPrivacy model: the path ``stpcore anonymize`` runs on a camera box.

:class:`ClipAnonymizer` wraps a converted COPY of an :class:`~stpcore.models.STPrivacy` model (the
caller's model is never modified) and runs its eval-mode forward (per-slot top-k, or the adaptive
threshold) under ``torch.inference_mode`` in one of these precisions:

- ``"fp32"``: the plain model; outputs equal ``model.eval()`` under ``torch.no_grad`` exactly.
- ``"bf16"``: bf16 autocast. The score predictors run in fp32 (autocast disabled around them), so the
  top-k decisions see fp32 scores computed from the (bf16-perturbed) tokens. The fast choice on CUDA.
  On CPUs without native bf16 arithmetic (AVX2 only: no AVX512-BF16 / AMX) it is emulated and much slower
  than fp32.
- ``"int8"`` (CPU only): dynamic int8 quantization (``torch.ao.quantization.quantize_dynamic``, fbgemm /
  x86 engine) of the transformer blocks' Linear layers (qkv, proj, fc1, fc2: about 85% of the FLOPs),
  weights per output channel, activations per tensor at run time. The tubelet embedding, the score
  predictors and the reconstruction head stay fp32: they are a few percent of the FLOPs, and the
  predictors decide the masks, the head writes the output pixels.
- ``"auto"``: bf16 on CUDA (fp32 where the GPU has no bf16); on CPU bf16 where the CPU has native bf16
  matrix units (AMX tiles or AVX512-BF16, see :func:`cpu_has_native_bf16`), else int8 where a quantized
  engine for x86 is available, else fp32.

What each precision gives on this project's CPUs, and why, is in BENCHMARKS.md ("CPU inference").
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stpcore.models import STPrivacy, load_anonymizer
from stpcore.models.stprivacy import is_real
from stpcore.tubelets import check_finite

PRECISIONS = ("auto", "fp32", "bf16", "int8")
RUNTIMES = ("torch", "onnxruntime", "openvino", "auto")
# runtime="auto": per CPU kind (cpu_kind), the fastest (runtime, precision) measured for vit_small at B=8 among those
# whose keep decisions equal fp32's on at least 98% of tokens (BENCHMARKS.md, "ONNX Runtime and OpenVINO" and its AMX
# section; data: benchmarks/results/cpu-runtimes*.json; tests/test_deploy.py checks the table against that data). A
# committed table, not a probe at start: a probe would export and quantize every candidate first. A CPU kind without
# a measurement, or a machine without the runtime's packages, runs torch at precision "auto".
AUTO_CHOICES: dict[str, tuple[str, str]] = {"avx512_bf16": ("openvino", "int8"), "amx": ("openvino", "int8")}


@dataclass
class AnonymizedClips:
    """What :meth:`ClipAnonymizer.__call__` returns.

    Attributes:
        video: (B, 3, T, H, W) float32 on the anonymizer's device; dropped tubelets are exactly zero.
        keep: (B, N) float32, exactly 0/1, the final keep mask in original (t-major) token order.
        kept_positions: top-k mode: (B, K) int64 original positions of the kept tokens, ascending
            (K = num_slots x kept per slot); None in adaptive mode (counts differ between clips).
    """

    video: torch.Tensor
    keep: torch.Tensor
    kept_positions: torch.Tensor | None = None


class _Fp32Predictor(nn.Module):
    """A score predictor that always computes in fp32, also under autocast (low precision could flip
    top-k decisions between near-equal scores). Same call signature as ScorePredictor."""

    def __init__(self, predictor: nn.Module) -> None:
        super().__init__()
        self.predictor = predictor.float()

    def forward(self, x: torch.Tensor, keep: torch.Tensor, num_slots: int) -> torch.Tensor:
        """x (B, N, D), keep (B, N) -> (B, N, 2) fp32 log-probabilities."""
        with torch.autocast(x.device.type, enabled=False):
            return self.predictor(x.float(), keep.float(), num_slots)


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AMX tiles or AVX512-BF16), where bf16 autocast is the
    fast CPU precision; False on AVX2-only CPUs, where torch emulates it (slower than fp32)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(check()) for check in checks if check is not None)


def cpu_kind() -> str:
    """"amx", "avx512_bf16", "avx2" or "other": the CPU kinds whose best inference path differs."""
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512_bf16"
    return "avx2" if getattr(torch.cpu, "_is_avx2_supported", lambda: False)() else "other"


def auto_runtime() -> tuple[str, str]:
    """(runtime, precision) that ``runtime="auto"`` runs on this CPU (see :data:`AUTO_CHOICES`)."""
    import importlib.util

    choice = AUTO_CHOICES.get(cpu_kind())
    if choice is None:
        return "torch", "auto"
    needed = ("onnx", "onnxscript", choice[0]) + (("nncf",) if choice == ("openvino", "int8") else ())
    if any(importlib.util.find_spec(m) is None for m in needed):
        return "torch", "auto"
    return choice


def int8_unavailable_reason() -> str | None:
    """Why the int8 variant cannot run in this PyTorch build, or None when it can."""
    try:
        from torch.ao.quantization import quantize_dynamic  # noqa: F401
    except ImportError as exc:
        return f"torch.ao.quantization.quantize_dynamic is not available in torch {torch.__version__} ({exc})"
    engines = set(torch.backends.quantized.supported_engines)
    if not engines & {"x86", "fbgemm"}:
        return f"no x86/fbgemm quantized engine in this build (supported: {sorted(engines)})"
    return None


def _quantize_blocks_int8(model: STPrivacy) -> None:
    """Replace the Linear layers of model.blocks (in place, on the private copy) by dynamic int8 ones."""
    quantize_linears_int8(model.blocks)


def quantize_linears_int8(module: nn.Module) -> nn.Module:
    """Replace every nn.Linear inside ``module`` (in place) by a dynamic int8 one (per-channel weights,
    fbgemm / x86 engine); returns ``module``."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    engines = torch.backends.quantized.supported_engines
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        # Process-wide setting, but any other engine choice would not run int8 GEMMs on x86 at all.
        torch.backends.quantized.engine = "x86" if "x86" in engines else "fbgemm"
    # torch.ao.quantization announces its move to torchao (DeprecationWarning) and quantized tensor
    # creation warns likewise; both still work in torch 2.13, and int8_unavailable_reason() reports
    # their absence once they are removed, so the warnings would only be noise for every CLI run.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
        quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return module


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and device.type != "cpu":
        raise ValueError(f"precision='int8' runs on CPU only (fbgemm dynamic quantization), got device {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available (this torch is a CPU build, or no GPU is visible); "
                         f"use device 'cpu'")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        if device.type == "cpu" and cpu_has_native_bf16():
            return "bf16"
        if device.type == "cpu" and int8_unavailable_reason() is None:
            return "int8"
        return "fp32"
    if precision == "int8":
        reason = int8_unavailable_reason()
        if reason is not None:
            raise ValueError(f"precision='int8' is unavailable: {reason}")
    return precision


_LABELS = {
    "fp32": "fp32",
    "bf16": "bf16 autocast (predictors fp32)",
    "int8": "int8 dynamic (blocks' Linear, per-channel weights; embed, predictors, head fp32)",
}


class RuntimeLoadError(ValueError):
    """An ONNX runtime could not load (or quantize) the exported graph: the model cannot run there, whatever the
    input (a ValueError, so the CLI shows its message as one error line)."""


class ClipAnonymizer:
    """Anonymize clip batches with a converted copy of a trained STPrivacy model.

    Args:
        model: the trained model; copied (and converted) here, never modified.
        device: where the copy runs ("cpu", "cuda", "cuda:1", a torch.device).
        precision: one of :data:`PRECISIONS` (see the module docstring); "auto" picks bf16 on CUDA and
            on CPUs with native bf16, else int8 on CPU when available.
        threads: CPU threads for intra-op parallelism (``torch.set_num_threads``, a process-wide
            setting); None leaves the current setting.
        compile: run the model through ``torch.compile`` (Inductor), the batch dimension dynamic so a new
            batch size does not recompile; a string is the compile mode (``"reduce-overhead"`` adds CUDA
            graphs on a GPU). The first call compiles (BENCHMARKS.md gives the seconds); the adaptive mode's
            data-dependent packing runs outside the compiled graphs.
        runtime: "auto": on a CPU with precision "auto", the path measured fastest on this CPU kind at 98% keep
            agreement (:data:`AUTO_CHOICES`, a committed table; :func:`auto_runtime`), else torch; "torch";
            "onnxruntime" or "openvino": the model exported to ONNX (``stpcore.deploy``, one graph
            per keep ratio, exported on first use) and run on the CPU by ONNX Runtime (fp32, or int8: dynamic
            quantization of the blocks' linear layers) or OpenVINO (fp32; bf16 where the CPU has native bf16,
            which ``precision="auto"`` picks there; int8: NNCF's quantization of the blocks' linear layers,
            calibrated on ``calibration``, the other layers in bf16 where the CPU has native bf16, else fp32).
            Needs ``stpcore[deploy]``; the adaptive mode stays in PyTorch.
        onnx: with an ONNX runtime, a graph written by ``stpcore export`` to run instead of exporting one (checked
            against ``model``'s geometry and weights, :func:`stpcore.deploy.weights_fingerprint`: a graph exported
            from other weights is refused; its keep ratio is fixed, so a call may not ask for another).
        calibration: OpenVINO int8: (N, 3, T, H, W) clips to calibrate the quantization on (None: the first
            batch this anonymizer is given).

    The clips' values are checked here, once per call (finite; one host sync), and the model's own
    per-forward checks are off (``validate``), so the compiled forward has no host sync in top-k mode.

    Raises:
        ValueError: unknown precision (the message names the choices), int8 off CPU or unavailable,
            threads < 1, a CUDA device where CUDA is not available, an ``onnx`` file that is not this model's export.
    """

    def __init__(self, model: STPrivacy, *, device: str | torch.device = "cpu", precision: str = "auto",
                 threads: int | None = None, compile: bool | str = False, runtime: str = "torch",
                 onnx: str | os.PathLike | None = None, calibration: torch.Tensor | None = None) -> None:
        if not isinstance(model, STPrivacy):
            raise ValueError(f"model must be an STPrivacy, got {type(model).__name__}")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
        if runtime == "auto":  # the measured choice on a CPU; torch elsewhere or with explicit settings
            usable = (torch.device(device).type == "cpu" and precision == "auto" and not compile and onnx is None
                      and calibration is None)
            runtime, precision = auto_runtime() if usable else ("torch", precision)
        allowed = {"onnxruntime": ("auto", "fp32", "int8"), "openvino": ("auto", "fp32", "bf16", "int8")}.get(runtime)
        if allowed is not None and (precision not in allowed or torch.device(device).type != "cpu" or compile):
            raise ValueError(f"runtime={runtime!r} runs {'/'.join(allowed[1:])} on the CPU without torch.compile, got "
                             f"precision={precision!r}, device {device}, compile={compile!r}")
        if allowed is None and (onnx is not None or calibration is not None):
            raise ValueError("onnx= and calibration= belong to runtime='onnxruntime' or 'openvino'")
        self.runtime = runtime
        self._sessions: dict[tuple[int, ...], object] = {}
        self._sessions_lock = threading.Lock()
        self.runtime_precision = "fp32"
        if runtime == "openvino" and (precision == "bf16" or precision == "auto" and cpu_has_native_bf16()):
            self.runtime_precision = "bf16"
        if allowed is not None and precision == "int8":
            self.runtime_precision = "int8"
        self._calibration = None
        self._calibration_digest = None
        if calibration is not None:
            self._set_calibration(calibration, model.cfg)
            if not (runtime == "openvino" and self.runtime_precision == "int8"):
                raise ValueError(f"calibration= is used by runtime='openvino' with precision='int8' only (NNCF "
                                 f"calibrates its quantization on it); here runtime={runtime!r}, "
                                 f"precision={precision!r}: leave it out")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        if allowed is not None:  # the extras, named now (after the settings' own checks) rather than at a batch
            from stpcore.deploy import require

            try:
                for module in ("onnx", "onnxscript", runtime) + (("nncf",) if runtime == "openvino" and
                                                                  precision == "int8" else ()):
                    require(module)
            except RuntimeError as exc:
                raise ValueError(str(exc)) from exc
            precision = "fp32"  # the PyTorch copy the graphs are exported from
        self.device = torch.device(device)
        self.precision = _resolve_precision(precision, self.device)
        if threads is not None:
            torch.set_num_threads(threads)
        # A private copy: .eval(), .to() and the conversions below all act in place on a module.
        net = copy.deepcopy(model).eval().to(self.device, torch.float32)
        for p in net.parameters():
            p.requires_grad_(False)
        from stpcore.deploy import weights_fingerprint

        # Which weights these are (float32, before any conversion): anonymize's records name them, so a resume
        # with another checkpoint of the same architecture is not taken for the same run.
        self.weights_fingerprint = weights_fingerprint(net)
        self.onnx_meta = None
        self._onnx_file = None
        if onnx is not None:  # the graph must hold this model's geometry and weights (fp32, as export_onnx's copy)
            from stpcore.deploy import CONFIG_KEY, WEIGHTS_KEY, forward_config, read_onnx

            cfg = net.cfg
            self.onnx_meta = read_onnx(onnx, expect={"num_frames": cfg.num_frames, "image_size": cfg.image_size,
                                                     "tubelet": list(cfg.tubelet),
                                                     WEIGHTS_KEY: self.weights_fingerprint,
                                                     CONFIG_KEY: forward_config(cfg)})
            self._onnx_file = Path(onnx)
        if self.precision == "bf16":
            net.score_predictor = nn.ModuleList(_Fp32Predictor(p) for p in net.score_predictor)
        elif self.precision == "int8":
            _quantize_blocks_int8(net)
        net.validate = False  # checked in __call__, once per batch
        self.model = net
        self.cfg = net.cfg
        self.compiled = bool(compile)
        mode = compile if isinstance(compile, str) else None
        self._forward = torch.compile(net, mode=mode) if compile else net
        self._prepared: set[tuple] = set()  # the compiled graphs prepare() has run
        self._graph_ratios: dict[tuple[int, ...], float] = {}  # per-slot counts -> the ratio compiled for them

    @property
    def description(self) -> str:
        """A one-line summary, e.g. "cpu, int8 dynamic (...), 2 threads"."""
        where = str(self.device)
        if self.device.type == "cpu":
            where += f", {_LABELS[self.precision]}, {torch.get_num_threads()} threads"
        else:
            where += f", {_LABELS[self.precision]}"
        if self.runtime != "torch":
            extra = " (bf16 elsewhere)" if self.runtime == "openvino" and self.runtime_precision == "int8" \
                and self._openvino_hint() == "bf16" else ""
            return f"cpu, {self.runtime} {self.runtime_precision}{extra}, {torch.get_num_threads()} threads"
        return where + (", compiled" if self.compiled else "")

    @property
    def numerics(self) -> dict:
        """What decides this anonymizer's arithmetic besides the weights (anonymize's records keep it, so a resume
        with another precision or runtime is not taken for the same run): runtime, precision, device type, and
        whether a clip's result depends on the other clips of its batch (and "compiled" for torch.compile). Dynamic
        int8 (PyTorch's, ONNX Runtime's) quantizes each layer's input with one scale over the whole batch, so the
        batch size, and which clips share a batch, move its results slightly; OpenVINO int8 is calibrated on
        ``calibration``, else on the first batch it is given."""
        precision = self.precision if self.runtime == "torch" else self.runtime_precision
        batch_dependent = precision == "int8" and self.runtime != "openvino"
        return {"runtime": self.runtime, "precision": precision, "device": self.device.type,
                "batch_dependent": batch_dependent,
                # Inductor's code rounds otherwise than eager (compiled int8 keeps 98.4% of eager int8's decisions:
                # BENCHMARKS.md); said only when compiled, so the records of eager runs stay as they were.
                **({"compiled": True} if self.compiled else {}),
                **({"calibrated_on": self._calibration_digest or "first batch"}
                   if self.runtime == "openvino" and precision == "int8" else {})}

    @property
    def calibration_pending(self) -> bool:
        """Whether this is OpenVINO int8 still without its calibration clips: it would calibrate on the first batch
        it is given (:meth:`calibrate` sets them first; ``stpcore anonymize`` does, from its first input)."""
        return (self.runtime == "openvino" and self.runtime_precision == "int8" and self._calibration is None
                and not self._sessions)

    def calibrate(self, clips: torch.Tensor) -> None:
        """OpenVINO int8: calibrate the quantization on ``clips`` (N, 3, T, H, W), normalised as the clips it
        anonymizes, instead of the first batch; before the first call (a graph already quantized is refused)."""
        if not (self.runtime == "openvino" and self.runtime_precision == "int8"):
            raise ValueError(f"calibrate() is for runtime='openvino' with precision='int8', not {self.runtime} "
                             f"{self.runtime_precision}")
        with self._sessions_lock:  # no graph is quantized meanwhile, on half-set clips
            if self._sessions:
                raise ValueError("calibrate() must come before the first batch: a graph is already quantized (on "
                                 f"{self._calibration_digest or 'the first batch'})")
            self._set_calibration(clips, self.cfg)

    def _set_calibration(self, calibration, cfg) -> None:
        want = (3, cfg.num_frames, cfg.image_size, cfg.image_size)
        if not isinstance(calibration, torch.Tensor) or calibration.ndim != 5 or calibration.shape[0] < 1 \
                or tuple(calibration.shape[1:]) != want:
            raise ValueError(f"calibration must be clips (N, {', '.join(map(str, want))}) for this model (N >= 1, "
                             f"normalised as the clips it anonymizes), got "
                             f"{tuple(getattr(calibration, 'shape', ())) or type(calibration).__name__}")
        if not torch.isfinite(calibration).all():
            raise ValueError("calibration holds NaN or Inf values; give finite normalised clips")
        self._calibration = calibration.detach().cpu().float().contiguous()
        # Which clips (anonymize's records keep it): the same clips quantize to the same graph, bit for bit, and other
        # clips to another one (0.56 apart in the video of the tiny preset, measured).
        digest = hashlib.sha256(self._calibration.numpy().tobytes()).hexdigest()[:16]
        self._calibration_digest = f"clips {tuple(self._calibration.shape)} sha256:{digest}"

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, clips: torch.Tensor, *, keep_ratio: float | None = None,
                 adaptive_threshold: float | None = None) -> AnonymizedClips:
        """Anonymize a batch of clips.

        Args:
            clips: (B, 3, T, H, W) float, normalised as in training (T = num_frames, H = W = image_size);
                any float dtype and device (moved to the anonymizer's device as float32).
            keep_ratio: alpha in (0, 1] per stage instead of the trained one (top-k mode).
            adaptive_threshold: t in (0, 1): keep tokens whose keep probability > t instead of top-k
                (a variable count per clip); cannot be combined with keep_ratio.

        Returns:
            :class:`AnonymizedClips`: video (B, 3, T, H, W) float32 with dropped tubelets exactly zero,
            keep (B, N) float32 0/1, kept_positions (B, K) int64 or None.

        Raises:
            ValueError: bad clip shape/dtype or non-finite values, bad keep_ratio / threshold (from the model).
        """
        if not isinstance(clips, torch.Tensor) or not clips.is_floating_point():
            what = clips.dtype if isinstance(clips, torch.Tensor) else type(clips).__name__
            raise ValueError(f"clips must be a float tensor (B, 3, T, H, W), got {what}")
        video = clips.to(self.device, torch.float32)
        self.model.check_video(video)  # shapes (the model's validate is off: values are checked next)
        check_finite(video, name="video")
        if self.runtime != "torch":
            return self._run_onnx(video, keep_ratio, adaptive_threshold)
        if self.compiled:
            keep_ratio = self._graph_ratio(keep_ratio, adaptive_threshold)
            if video is clips:  # the caller's own tensor: mark an alias, not it (it may go to a compile of theirs)
                video = video.view_as(video)
            if video.shape[0] > 1:
                torch._dynamo.mark_dynamic(video, 0)  # one graph for every batch size >= 2 (1 is specialised)
        with torch.inference_mode(), self._autocast():
            out = self._forward(video, keep_ratio=keep_ratio, adaptive_threshold=adaptive_threshold)
        # Casting a bf16 video to fp32 keeps exact zeros exact.
        video, keep, positions = out.video.float(), out.keep.float(), out.kept_positions
        if self.compiled and self.device.type == "cuda":
            # A CUDA-graph mode ("reduce-overhead") hands out buffers the next call overwrites: own copies.
            video, keep = video.clone(), keep.clone()
            positions = positions.clone() if positions is not None else None
        return AnonymizedClips(video, keep, positions)

    def _graph_ratio(self, keep_ratio: float | None, adaptive_threshold: float | None) -> float | None:
        """The keep ratio a compiled forward is called with: one float per set of per-slot counts (the first given
        with those counts; None means the trained ratio), since the compiled graph specialises on the float's value
        and ratios with the same counts compute the same thing. None in adaptive mode."""
        self.model.check_keep_setting(keep_ratio, adaptive_threshold)
        if adaptive_threshold is not None:
            return None
        ratio = float(self.cfg.keep_ratio if keep_ratio is None else keep_ratio)
        return self._graph_ratios.setdefault(tuple(self.cfg.kept_per_slot(ratio)), ratio)

    def _onnx_ratio(self, keep_ratio: float | None, adaptive_threshold: float | None) -> tuple[float, tuple[int, ...]]:
        """The keep ratio an ONNX runtime call runs at, and its per-slot counts (checked against a given graph)."""
        if adaptive_threshold is not None:
            raise ValueError("adaptive_threshold: the adaptive mode has data-dependent shapes and runs in PyTorch "
                             "only; use runtime='torch'")
        default = self.onnx_meta["keep_ratio"] if self.onnx_meta else self.cfg.keep_ratio
        ratio = default if keep_ratio is None else keep_ratio
        if not (is_real(ratio) and 0 < ratio <= 1):
            raise ValueError(f"keep_ratio must be a real number in (0, 1] (a Python or NumPy float), got "
                             f"{keep_ratio!r}")
        ratio = float(ratio)
        key = tuple(self.cfg.kept_per_slot(ratio))  # ratios with the same per-slot counts share one graph
        if self.onnx_meta and list(key) != self.onnx_meta["kept_per_slot"]:
            raise ValueError(f"keep_ratio={ratio:g}: the graph {self._onnx_file} was exported at keep ratio "
                             f"{self.onnx_meta['keep_ratio']:g} (tokens per slot {self.onnx_meta['kept_per_slot']}); "
                             f"export one at this ratio (stpcore export --keep-ratio {ratio:g})")
        return ratio, key

    def _session(self, ratio: float, key: tuple[int, ...], first: torch.Tensor | None):
        """The runtime's session for these per-slot counts, exported and loaded on first use (one ONNX graph per set
        of counts: every k is a constant in it)."""
        with self._sessions_lock:  # threads sharing the anonymizer export and load each graph once
            session = self._sessions.get(key)
            if session is None:
                import tempfile

                from stpcore.deploy import export_onnx

                with tempfile.TemporaryDirectory(prefix="stpcore-onnx-") as tmp:  # the runtimes load it into memory
                    path = self._onnx_file
                    if path is None:
                        path = Path(tmp) / f"stprivacy-{ratio:g}.onnx"
                        export_onnx(self.model, path, keep_ratio=ratio, verify=False)
                    session = self._load_session(path, Path(tmp), first)
                self._sessions[key] = session
        return session

    def prepare(self, batch_sizes: int | Iterable[int] = 8, *, keep_ratio: float | None = None,
                adaptive_threshold: float | None = None) -> float:
        """Do now the one-time work the first batch would otherwise do, and fail here if the model cannot run:
        export and load the ONNX graph (runtime onnxruntime / openvino), or compile (``compile``) with batches of
        black clips of the sizes in ``batch_sizes`` (one graph serves every batch of 2 or more clips, another a
        batch of 1; each is compiled once). Eager PyTorch runs one black clip (its first forward's one-time setup
        is seconds on a CPU). OpenVINO int8 without
        ``calibration`` still quantizes at the first batch (it calibrates on that batch's clips). A live stream calls
        it before it reads the source, so its first chunks are not held up (and later ones dropped) by the export or
        the compile. Returns the seconds it took."""
        start = time.perf_counter()
        sizes = {batch_sizes} if isinstance(batch_sizes, int) else set(batch_sizes)
        if any(not isinstance(b, int) or b < 1 for b in sizes):
            raise ValueError(f"prepare: batch sizes must be positive ints, got {batch_sizes!r}")
        if self.runtime != "torch":
            if not (self.runtime == "openvino" and self.runtime_precision == "int8" and self._calibration is None):
                self._session(*self._onnx_ratio(keep_ratio, adaptive_threshold), None)
        elif self.compiled:
            cfg = self.cfg
            for b in sorted({min(b, 2) for b in sizes}):  # 1, and one size for the dynamic graph of 2 and more
                key = (b, self._graph_ratio(keep_ratio, adaptive_threshold), adaptive_threshold)
                if key not in self._prepared:
                    self(torch.zeros(b, 3, cfg.num_frames, cfg.image_size, cfg.image_size, device=self.device),
                         keep_ratio=keep_ratio, adaptive_threshold=adaptive_threshold)
                    self._prepared.add(key)
        elif "eager" not in self._prepared:
            # Eager PyTorch's first forward pays one-time imports and setup (the custom ops' dispatch brings in
            # torch._dynamo: about 3 s measured on a CPU): one clip now, not in a live stream's first chunk.
            cfg = self.cfg
            self(torch.zeros(1, 3, cfg.num_frames, cfg.image_size, cfg.image_size, device=self.device),
                 keep_ratio=keep_ratio, adaptive_threshold=adaptive_threshold)
            self._prepared.add("eager")
        return time.perf_counter() - start

    def _run_onnx(self, video: torch.Tensor, keep_ratio: float | None,
                  adaptive_threshold: float | None) -> AnonymizedClips:
        session = self._session(*self._onnx_ratio(keep_ratio, adaptive_threshold), video)
        out_video, keep = session(video.detach().numpy())
        keep = torch.from_numpy(keep).float()
        positions = keep.nonzero()[:, 1].reshape(keep.shape[0], -1)  # equal counts per clip in top-k mode
        return AnonymizedClips(torch.from_numpy(out_video), keep, positions)

    def _openvino_hint(self) -> str:
        """OpenVINO's precision for what is not int8: bf16 for "bf16", and for "int8" where the CPU has native bf16
        (the quantized layers run int8, the rest bf16; measured in BENCHMARKS.md); f32 otherwise."""
        bf16 = self.runtime_precision == "bf16" or self.runtime_precision == "int8" and cpu_has_native_bf16()
        return "bf16" if bf16 else "f32"

    def _load_session(self, path: Path, scratch: Path, first: torch.Tensor):
        """A callable numpy clips -> (video, keep) of the runtime, on the ONNX file at ``path`` (int8: quantized
        into ``scratch``; OpenVINO's calibrated on ``calibration``, else on ``first``, the batch being run)."""
        from stpcore.deploy import quantize_onnxruntime_int8, quantize_openvino_int8, require

        ort = require("onnxruntime") if self.runtime == "onnxruntime" else None
        ov = require("openvino") if self.runtime == "openvino" else None
        try:
            if self.runtime == "onnxruntime":
                if self.runtime_precision == "int8":
                    path = quantize_onnxruntime_int8(path, scratch / "int8.onnx")
                options = ort.SessionOptions()
                options.intra_op_num_threads = torch.get_num_threads()
                onnx = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                return lambda x: onnx.run(None, {"clips": x})
            core = ov.Core()
            if self.runtime_precision == "int8":
                clips = self._calibration if self._calibration is not None else first
                model = quantize_openvino_int8(path, [c.detach().cpu().float().numpy() for c in clips.split(4)])
            else:
                model = core.read_model(str(path))
            compiled = core.compile_model(model, "CPU", {
                "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                "INFERENCE_PRECISION_HINT": self._openvino_hint()})
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - the runtimes raise their own types (OpenVINO: RuntimeError)
            raise RuntimeLoadError(f"{self.runtime} could not load the graph {path}: "
                                   f"{str(exc).splitlines()[0][:300]}") from exc
        # One infer request per thread: the compiled model's own call shares one request between callers, so
        # threads sharing an anonymizer got "Infer Request is busy" or another call's clips back.
        local = threading.local()

        def run(x):
            request = getattr(local, "request", None)
            if request is None:
                request = local.request = compiled.create_infer_request()
            return tuple(request.infer({"clips": x}).values())  # copies of the outputs (share_outputs=False)

        return run

    def __repr__(self) -> str:
        return f"ClipAnonymizer({self.description})"


def load_trained(path: str | os.PathLike, **kwargs) -> ClipAnonymizer:
    """A :class:`ClipAnonymizer` for the model saved at ``path`` by ``stpcore.models.save_anonymizer``
    (or a training checkpoint); ``kwargs`` go to :class:`ClipAnonymizer` (device, precision, threads, compile,
    runtime)."""

    return ClipAnonymizer(load_anonymizer(path, map_location="cpu"), **kwargs)
