"""What this installation can run: versions, devices, and each op's backends with their reasons."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from stpcore import __version__, ops

OPTIONAL = {
    "triton": "triton",
    "av (PyAV)": "av",
    "nvidia-dali": "nvidia-dali-cuda130",
    "xformers": "xformers",
    "scikit-learn": "scikit-learn",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
    "nncf": "nncf",
}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def example_inputs(op: str, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[tuple, dict]:
    """Small valid (args, kwargs) for ``op`` on ``device``: what ``stpcore info`` asks each backend about."""
    B, H, N, D, C, S = 2, 6, 392, 64, 384, 8

    def t(*shape):
        return torch.zeros(*shape, device=device, dtype=dtype)

    idx = torch.zeros(B, 272, dtype=torch.int64, device=device)
    cu = torch.tensor([0, 200, 400], dtype=torch.int32, device=device)
    table = {
        "policy_attention": ((t(B, H, N, D), t(B, H, N, D), t(B, H, N, D), t(B, N)), {"eps": 1e-6}),
        "gumbel_select": ((t(B, N, 2), t(B, N), None, torch.zeros(1, dtype=torch.int64, device=device), 1.0, True),
                          {}),
        "slot_topk": ((t(B, N), S, 34), {}),
        "gather_tokens": ((t(B, N, C), idx), {}),
        "scatter_tokens": ((t(B, 272, C), idx, N), {}),
        "slot_topk_gather": ((t(B, N), t(B, N, C), S, 34), {}),
        "predictor_pool": ((t(B, N, C), t(B, N), S), {}),
        "varlen_attention": ((t(400, H, D), t(400, H, D), t(400, H, D), cu, 200), {"scale": D**-0.5}),
    }
    return table[op]


def devices() -> list[torch.device]:
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found.append(torch.device("cuda"))
    return found


def backend_table(device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, list[tuple[str, list[str]]]]:
    """{op: [(backend, reasons it is not picked automatically), ...]} for example inputs on ``device``."""
    table = {}
    for op in ops.dispatch.ops():
        args, kwargs = example_inputs(op, device, dtype)
        table[op] = list(ops.dispatch.explain(op, *args, **kwargs).items())
    return table


def chosen(op: str, device: torch.device) -> str:
    """The backend dispatch picks for ``op``'s example inputs on ``device`` (what STPCORE_BACKEND names, if it does),
    or "error: ..." when that is no backend or cannot run them (each call of the op would fail so)."""
    args, kwargs = example_inputs(op, device)
    try:
        return ops.dispatch.select(op, None, *args, **kwargs).name
    except (ValueError, NotImplementedError) as e:
        return f"error: {e}"


def backend_errors() -> list[str]:
    """What STPCORE_BACKEND breaks: the ops whose named backend is unknown, or runs on none of this machine's devices
    (a GPU backend forced on a GPU machine refuses CPU tensors, which the table shows, and is no error)."""
    errors = []
    for op in ops.dispatch.ops():
        names = [chosen(op, device) for device in devices()]
        if all(name.startswith("error: ") for name in names):
            errors.append(names[-1][len("error: "):])
    return errors


def report() -> str:
    lines = [f"stpcore {__version__}"]
    lines.append(
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {_version('numpy')}, "
        f"einops {_version('einops')}"
    )
    lines.append(
        "optional: " + ", ".join(f"{name} {_version(dist) or 'not installed'}" for name, dist in OPTIONAL.items())
    )
    cpu = f"cpu ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"devices: {cpu}; cuda: {gpus} (CUDA {torch.version.cuda})")
    else:
        lines.append(f"devices: {cpu}; cuda: not available")
    from stpcore.inference import _resolve_precision, auto_runtime, cpu_kind

    runtime, precision = auto_runtime()
    if precision == "auto":
        precision = f"auto, here {_resolve_precision('auto', torch.device('cpu'))}"
    lines.append(f"inference on this CPU (kind {cpu_kind()}): --runtime auto runs {runtime} at precision {precision}")
    err = ops.dispatch.triton_import_error()
    lines.append("triton kernels: " + ("importable" if err is None else err))
    forced = os.environ.get(ops.dispatch.ENV_VAR, "").strip()
    for device in devices():
        lines.append("")
        lines.append(f"backends for float32 tensors on {device.type} ("
                     + (f"{ops.dispatch.ENV_VAR}={forced!r} names them" if forced else "first usable one is chosen")
                     + "):")
        for op, entries in backend_table(device).items():
            lines.append(f"  {op}: {chosen(op, device)}")
            for name, reasons in entries:
                lines.append(f"    {name:<10} " + ("can run" if not reasons else "no: " + "; ".join(reasons)))
    return "\n".join(lines)
