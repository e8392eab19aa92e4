"""Deploying the anonymizer outside PyTorch: ONNX export of the inference path (``stpcore export``).

:func:`export_onnx` exports STPrivacy's eval forward (per-slot top-k at the trained or a given keep ratio: every k
is a constant, as ONNX Runtime, OpenVINO and TensorRT need) with a dynamic batch axis. The graph takes normalised
clips (B, 3, T, H, W) float32, the shared preprocessing's output (``stpcore.data.preprocess``), and returns
``video`` (B, 3, T, H, W), dropped tubelets exactly 0, and ``keep`` (B, N) 0/1. stpcore's custom ops are
decomposed into their references (``stpcore.ops.export.decompositions(onnx=True)``), so the file holds standard
ONNX operators only. The adaptive (variable-count) mode has data-dependent shapes and stays in PyTorch.

Each export is checked against PyTorch with ONNX Runtime (:func:`verify_onnx`): the share of equal keep
decisions and the largest video difference, on random clips at two batch sizes.

int8: :func:`quantize_onnxruntime_int8` (ONNX Runtime's dynamic quantization) and :func:`quantize_openvino_int8`
(NNCF's post-training quantization for OpenVINO, calibrated on clips) quantize the transformer blocks' linear
layers (qkv, proj, fc1, fc2: :func:`block_linear_nodes`), as torch's int8 path does; the patch embedding, the
keep-score predictors, the attention products and the reconstruction head stay in float, which keeps the keep
decisions close to fp32 (measured in BENCHMARKS.md). "In float" means the runtime's float precision: ONNX Runtime
runs them in fp32, OpenVINO at its precision hint, which ``ClipAnonymizer`` sets to bf16 for ``precision="bf16"``
and, on CPUs with native bf16, for int8, the keep-score predictors included (unlike torch's bf16 path, which keeps
them fp32).

The exported file carries its geometry, its keep ratio and a fingerprint of the weights it was exported from as ONNX
metadata (:func:`read_onnx`, :func:`weights_fingerprint`), so a graph exported once (``stpcore export``) can be run
later (``stpcore anonymize --onnx``) and is checked against the model it is meant for: a graph of other weights with
the same geometry is refused, not run in that model's name.

Needs the ``deploy`` extra (onnx, onnxscript, onnxruntime, openvino, nncf): ``pip install 'stpcore[deploy]'``.
``stpcore.inference.ClipAnonymizer(runtime="onnxruntime" | "openvino")`` runs the exported graphs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stpcore.models import STPrivacy

DEPLOY_EXTRA = "pip install 'stpcore[deploy]' (onnx, onnxscript, onnxruntime, openvino, nncf)"
BLOCK_LINEARS = ("qkv", "proj", "fc1", "fc2")
WEIGHTS_KEY = "weights_sha256"  # the fingerprint of the exported weights (weights_fingerprint)
METADATA = ("num_frames", "image_size", "tubelet", "keep_ratio", "kept_per_slot", WEIGHTS_KEY)  # stpcore.<key>
# The model's settings that shape its eval forward beyond its weights (output options, pruning stages); graphs
# exported before it was recorded lack it and are checked by geometry and weights alone.
CONFIG_KEY = "model_config"
NOT_IN_GRAPH = ("keep_ratio", "tau", "attn_eps", "num_classes")  # per graph, training only, or the action head


def forward_config(cfg) -> dict:
    """The settings of an STPrivacyConfig that shape its eval forward besides its weights (every field but the keep
    ratio, which the metadata holds per graph, the training-only Gumbel temperature and attention smoothing, and
    the action head's class count), as JSON values."""
    import dataclasses

    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_GRAPH}
    return json.loads(json.dumps(fields))


def _forward_defaults() -> dict:
    """forward_config's fields at their defaults: a field a graph's record lacks (exported before the field
    existed) had its default then."""
    from stpcore.models import STPrivacyConfig

    return forward_config(STPrivacyConfig())


class _VideoAndKeep(nn.Module):
    """STPrivacy's eval forward as (video, keep) at a fixed keep ratio: what the ONNX graph computes."""

    def __init__(self, model: STPrivacy, keep_ratio: float | None) -> None:
        super().__init__()
        self.model, self.keep_ratio = model, keep_ratio

    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(clips, keep_ratio=self.keep_ratio)
        return out.video, out.keep


def require(module: str):
    """Import ``module`` of the deploy extra, or a RuntimeError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeError(f"{module} is not installed ({exc}); {DEPLOY_EXTRA}") from exc


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how the file agrees with PyTorch.

    Attributes:
        path: the .onnx file.
        keep_ratio: the per-stage alpha baked in.
        keep_agreement: the share of equal keep decisions (ONNX Runtime against PyTorch fp32).
        max_video_diff: the largest absolute difference of the videos, where both kept the same tokens.
        batches: the batch sizes compared.
    """

    path: Path
    keep_ratio: float
    keep_agreement: float
    max_video_diff: float
    batches: tuple[int, ...]


def weights_fingerprint(model: nn.Module) -> str:
    """The SHA-256 (hex) of ``model``'s weights: every tensor of its ``state_dict`` (parameters and buffers), names
    sorted, each hashed as its name, dtype, shape and raw bytes (on the CPU, contiguous). Equal weights give equal
    fingerprints whatever the device; one changed bit changes it.

    :func:`export_onnx` stores the fingerprint of the float32 eval copy it exports (the weights the graph holds, before
    any int8 quantization, so an int8 graph quantized from that file still names them), and
    ``ClipAnonymizer(model, onnx=FILE)`` compares it with the fingerprint of its own float32 copy of ``model``.
    """
    import hashlib

    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # view: bf16 has no numpy dtype
    return digest.hexdigest()


def _unsupported_op(exc: BaseException) -> str | None:
    """The operator an exporter error names, e.g. "aten.sort.stable"."""
    text = "".join(str(e) for e in (exc, exc.__cause__, exc.__context__) if e is not None)
    found = re.search(r"op='([\w.]+)', overload='(\w+)'", text) or re.search(r"target=(torch\.ops\.[\w.]+)", text)
    if not found:
        return None
    return ".".join(found.groups()) if found.lastindex == 2 else found.group(1)


def export_onnx(model: STPrivacy, path: str | os.PathLike, *, keep_ratio: float | None = None,
                verify: bool = True, opset: int | None = None, min_agreement: float = 0.99,
                max_video_diff: float = 1e-3, max_video_share: float = 1e-4) -> ExportReport:
    """Export ``model``'s eval forward to ``path`` (see the module docstring) and, with ``verify``, check it.

    Args:
        model: the trained STPrivacy (a copy is exported in eval mode; the model is not modified).
        path: the .onnx file (written atomically; with ``verify``, only once the check has passed, so a failed
            export or check leaves ``path`` as it was).
        keep_ratio: alpha in (0, 1] per stage (None: the model's trained ratio).
        verify: compare with PyTorch through ONNX Runtime (:func:`verify_onnx`); the graph passes when at least
            ``min_agreement`` of its keep decisions equal PyTorch's and, on the clips whose masks agree, at most
            ``max_video_share`` of the video values differ by more than ``max_video_diff`` (fp32 on both sides: a
            sound export agrees exactly on the masks and to about 1e-6 on the video; a near-tie in the keep scores
            may flip a rare decision, and with ``binary_output`` a pixel whose channel mean is within rounding of 0
            takes the other level, a difference of 2).
        opset: the ONNX opset (None: the exporter's default).

    Raises:
        RuntimeError: the deploy extra is missing (the message names it; onnxruntime is checked up front when
            ``verify`` needs it), or an operator cannot be exported (the message names it).
        ValueError: ``keep_ratio`` is out of range, ONNX Runtime cannot load the exported graph, or the graph
            fails the check (then nothing is written).
    """
    import copy

    require("onnx")
    require("onnxscript")
    if verify:
        require("onnxruntime")  # before the export's seconds to minutes, not after them
    from stpcore.media import atomic_path
    from stpcore.ops.export import decompositions

    ratio = model.cfg.keep_ratio if keep_ratio is None else float(keep_ratio)
    if not 0 < ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    net = copy.deepcopy(model).eval().float().cpu()  # the example clips and the check run on the CPU
    net.validate = False  # a value check would be a data-dependent branch in the graph
    module = _VideoAndKeep(net, ratio)
    cfg = net.cfg
    example = torch.randn(2, 3, cfg.num_frames, cfg.image_size, cfg.image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
            program = program.run_decompositions(decompositions(onnx=True))
            onnx_program = torch.onnx.export(program, (example,), dynamo=True, opset_version=opset, verbose=False,
                                             input_names=["clips"], output_names=["video", "keep"])
    except Exception as exc:  # noqa: BLE001 - every exporter failure becomes one message naming the operator
        op = _unsupported_op(exc)
        where = f" at operator {op}" if op else ""
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines()[0][:300]  # without the exporter's colours
        raise RuntimeError(f"ONNX export failed{where}: {first}") from exc
    path = Path(path)
    report = ExportReport(path, ratio, float("nan"), float("nan"), ())
    with atomic_path(path) as tmp:
        onnx_program.save(str(tmp))
        _write_metadata(tmp, {"num_frames": cfg.num_frames, "image_size": cfg.image_size, "tubelet": list(cfg.tubelet),
                              "keep_ratio": ratio, "kept_per_slot": list(cfg.kept_per_slot(ratio)),
                              WEIGHTS_KEY: weights_fingerprint(net), CONFIG_KEY: forward_config(cfg)})
        if verify:  # the temporary file, before the rename: a graph that fails the check never reaches ``path``
            try:
                agreement, diff, batches, over = verify_onnx(tmp, module, tolerance=max_video_diff)
            except ValueError as exc:
                reason = str(exc).removeprefix(f"{tmp}: ")  # the temporary name means nothing to the reader
                raise ValueError(f"{path}: the exported graph failed its check, so it was not written ({reason})") \
                    from exc
            if not (agreement >= min_agreement and over <= max_video_share):  # NaN (no mask agreed) fails too
                raise ValueError(
                    f"{path}: the exported graph failed its check, so it was not written: ONNX Runtime's keep "
                    f"decisions equal PyTorch's on {100 * agreement:.2f}% (at least {100 * min_agreement:g}% needed), "
                    f"and {100 * over:.3g}% of the video values differ by more than {max_video_diff:g} where the "
                    f"masks agree (at most {100 * max_video_share:g}%; largest difference {diff:.3g}). The exporter "
                    f"or an operator's decomposition (stpcore/ops/export.py) changed what the model computes: "
                    f"report it with `stpcore info`'s output")
            report.keep_agreement, report.max_video_diff, report.batches = agreement, diff, batches
    return report


class _DropMessages(logging.Filter):
    """A logging filter that drops the records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence two messages the exporter prints on every export that say nothing about stpcore's graph: torch's
    FutureWarning that ``isinstance(treespec, LeafSpec)`` is deprecated (raised inside torch.export), and the
    ONNX exporter's "torchvision is not installed. Skipping torchvision::nms" lines (stpcore uses no torchvision
    op). Every other warning and log record passes."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    drop = _DropMessages("torchvision is not installed")
    registration.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        registration.removeFilter(drop)


def verify_onnx(path: str | os.PathLike, module: nn.Module, batches: tuple[int, ...] = (1, 3),
                seed: int = 0, tolerance: float = 1e-3) -> tuple[float, float, tuple[int, ...], float]:
    """(keep agreement, max video difference where the keep masks agree, batches, the share of those video values
    that differ by more than ``tolerance``) of the ONNX file at ``path`` run by ONNX Runtime against ``module`` (a
    (video, keep) PyTorch module) on random normalised clips. The difference and the share are NaN where no clip's
    mask agrees."""
    ort = require("onnxruntime")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for unreadable files
        raise ValueError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0][:200]})") from exc
    shape = session.get_inputs()[0].shape
    g = torch.Generator().manual_seed(seed)
    equal = total = compared = over = 0
    diff = float("nan")  # no clip whose mask agrees: nothing to compare
    for b in batches:
        clips = torch.randn(b, *[int(s) for s in shape[1:]], generator=g)
        video, keep = session.run(None, {session.get_inputs()[0].name: clips.numpy()})
        with torch.no_grad():
            want_video, want_keep = module(clips)
        keep = torch.from_numpy(keep)
        equal += int((keep == want_keep).sum())
        total += keep.numel()
        same = (keep == want_keep).all(dim=1)
        if same.any():
            gap = (torch.from_numpy(video)[same] - want_video[same]).abs()
            here = float(gap.max())
            diff = here if diff != diff else max(diff, here)
            compared += gap.numel()
            over += int((gap > tolerance).sum())
    return equal / total, diff, tuple(batches), over / compared if compared else float("nan")


def _write_metadata(path: Path, values: dict) -> None:
    onnx = require("onnx")
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"stpcore.{key}", json.dumps(value)
    onnx.save(model, str(path))


def read_onnx(path: str | os.PathLike, expect: dict | None = None) -> dict:
    """The stpcore metadata of an exported graph ({num_frames, image_size, tubelet, keep_ratio, kept_per_slot,
    weights_sha256, and model_config where the exporter recorded it}), after checking that the file is a readable
    ONNX model with stpcore's input and outputs.

    Args:
        path: the .onnx file.
        expect: values the file must hold (e.g. the geometry and the :func:`weights_fingerprint` of the model it will
            stand for); a difference is an error naming both (for the fingerprint: that the graph holds other
            weights).

    Raises:
        ValueError: the file is missing, unreadable or corrupt, not an stpcore export (no metadata, other inputs or
            outputs), exported before the fingerprint was recorded, or differs from ``expect``.
    """
    onnx = require("onnx")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such ONNX file (write one with: stpcore export CHECKPOINT {path})")
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - protobuf and the checker raise their own types
        raise ValueError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0][:200]}); export it again "
                         f"with stpcore export") from exc
    props = {p.key.removeprefix("stpcore."): p.value for p in model.metadata_props if p.key.startswith("stpcore.")}
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    ours = inputs == ["clips"] and outputs == ["video", "keep"]
    if set(props) - {CONFIG_KEY} == set(METADATA) - {WEIGHTS_KEY} and ours:
        raise ValueError(f"{path}: exported by an older stpcore, without the fingerprint of the weights it holds, so "
                         f"it cannot be checked against a model; export it again (stpcore export CHECKPOINT {path})")
    if set(props) - {CONFIG_KEY} != set(METADATA) or not ours:
        raise ValueError(f"{path}: not a graph written by stpcore export (inputs {inputs}, outputs {outputs}, "
                         f"stpcore metadata {sorted(props)}); export it with stpcore export")
    try:
        meta = {k: json.loads(v) for k, v in props.items()}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: its stpcore metadata is damaged ({exc}); export it again with stpcore export") \
            from exc
    expect = dict(expect or {})
    weights = expect.pop(WEIGHTS_KEY, None)  # checked after the geometry, whose message says more
    settings = expect.pop(CONFIG_KEY, None)
    for key, want in expect.items():
        if json.loads(json.dumps(want)) != meta[key]:
            raise ValueError(f"{path}: exported with {key}={meta[key]}, but the model here has {key}={want}; "
                             f"export this model again (stpcore export)")
    if weights is not None and weights != meta[WEIGHTS_KEY]:
        raise ValueError(f"{path}: the graph was exported from other weights than the model here (weights "
                         f"fingerprint {meta[WEIGHTS_KEY][:12]}..., the model's {weights[:12]}...); it would anonymize "
                         f"with those weights, not this model's. Export the graph again from this model's checkpoint: "
                         f"stpcore export CHECKPOINT {path}")
    if settings is not None and CONFIG_KEY in meta:
        there = {**_forward_defaults(), **meta[CONFIG_KEY]}
        differ = {k: (there.get(k), v) for k, v in json.loads(json.dumps(settings)).items() if there.get(k) != v}
        if differ:
            raise ValueError(f"{path}: the graph was exported from a model with other settings than the model here "
                             f"({', '.join(f'{k}: {a} there, {b} here' for k, (a, b) in sorted(differ.items()))}); "
                             f"it computes another output. Export the graph again from this model: stpcore export "
                             f"CHECKPOINT {path}")
    return meta


def block_linear_nodes(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(the MatMul/Gemm nodes of the transformer blocks' linear layers qkv, proj, fc1 and fc2, every other
    MatMul/Gemm node) of an exported graph, found by the module scope the exporter records on each node."""
    onnx = require("onnx")
    blocks, other = [], []
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        scope = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        inside = ".blocks." in scope and any(f".{name}'" in scope for name in BLOCK_LINEARS)
        (blocks if inside else other).append(node.name)
    return blocks, other


def quantize_onnxruntime_int8(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """ONNX Runtime's dynamic int8 quantization (int8 weights, activations quantized per call) of the blocks'
    linear layers of the graph at ``src``, written to ``dst``."""
    require("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    blocks, _ = block_linear_nodes(src)
    if not blocks:
        raise ValueError(f"{src}: no transformer-block linear layers found to quantize (not an stpcore export?)")
    # quantize_dynamic logs "Please consider to run pre-processing before quantization..." on the root logger on
    # every call, a general hint, printed on every --precision int8 run; it is silenced for this call only.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, nodes_to_quantize=blocks)
    finally:
        root.setLevel(level)
    return Path(dst)


def quantize_openvino_int8(path: str | os.PathLike, calibration):
    """NNCF's post-training int8 quantization of the graph at ``path`` for OpenVINO (an ``openvino.Model``),
    calibrated on ``calibration`` (a list of (B, 3, T, H, W) float32 numpy batches); the blocks' linear layers
    only (:func:`block_linear_nodes`)."""
    import contextlib
    import io
    import logging

    ov = require("openvino")
    nncf = require("nncf")
    blocks, other = block_linear_nodes(path)
    model = ov.Core().read_model(str(path))
    names = {op.get_friendly_name() for op in model.get_ops()}
    missing = [n for n in blocks + other if n not in names]
    if not blocks or missing:  # the layers to keep in float must be found by name, or int8 would cover them too
        raise ValueError(f"{path}: cannot map the graph's matrix products onto OpenVINO's ({len(blocks)} block linear "
                         f"layers found, {len(missing)} names missing, e.g. {missing[:3]}); use precision='fp32' or "
                         f"'bf16', or runtime='onnxruntime' for int8")
    log = logging.getLogger("nncf")
    level = log.level
    log.setLevel(logging.ERROR)
    try:  # NNCF draws progress bars on the terminal; they would interleave with stpcore's own lines
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return nncf.quantize(model, nncf.Dataset(list(calibration)), subset_size=len(calibration),
                                 model_type=nncf.ModelType.TRANSFORMER,
                                 ignored_scope=nncf.IgnoredScope(names=other, validate=False))
    finally:
        log.setLevel(level)
