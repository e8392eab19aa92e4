"""Backend dispatch for stpcore ops, kept small (after xformers' dispatcher).

Every op has an ordered list of :class:`Backend` objects. Each backend answers
``reasons(explicit, *inputs, **options)`` with a list of human-readable reasons why it cannot run
these inputs (empty: it can). With no backend named, the first one with no reasons is used; the
environment variable ``STPCORE_BACKEND`` (``reference`` or ``triton``; or ``op=backend`` pairs,
comma separated) forces one; a backend named explicitly that cannot run raises with its reasons.

Triton runs CUDA tensors. Under ``TRITON_INTERPRET=1`` an explicitly named ``triton`` backend also runs
CPU tensors (Triton's interpreter, for tests), but automatic dispatch never picks it for CPU tensors.

Every public op is a ``torch.library`` custom op (``torch.ops.stpcore.<op>``, with a fake implementation and
registered autograd, its backward a custom op of its own), so ``torch.compile`` traces a model that calls
them as single graph nodes. The backend is chosen inside the op, when it runs on real tensors: the
choice is outside any traced region, ``STPCORE_BACKEND`` keeps working, and a choice depends only on the
inputs' metadata (device, dtype, shape, strides) and the other arguments, so it is cached per that key.
A backend gives ``fwd`` (the op's outputs, plus the statistics its backward reads, in a layout fixed per op)
and ``bwd``; a backend without its own ``bwd`` (the references, xformers) is differentiated by running the
reference again under ``torch.func.vjp`` (:func:`recompute_backward`). The backward op chooses its backend again
from the forward's inputs: changing ``STPCORE_BACKEND`` between a forward and its backward is not supported.

One exception keeps the reference what it is meant to be, the direct formulation under plain autograd (the
authors' release, the baseline the benchmarks compare against): in eager code, when the reference is named
(``backend="reference"`` or ``STPCORE_BACKEND``), an op whose reference has no backward of its own runs that
reference function directly instead of its custom op (:func:`direct_reference`), so autograd records it and keeps
what it saves, rather than rerunning it in the backward. Traced code (``torch.compile``) always takes the custom op.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

ENV_VAR = "STPCORE_BACKEND"


@functools.cache
def triton_import_error() -> str | None:
    """Why triton cannot be imported here, or None when it can."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available", with its reason
        return f"triton is not importable ({type(exc).__name__}: {exc}); install stpcore[triton]"
    return None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_device_reasons(tensors: Sequence[torch.Tensor], explicit: bool) -> list[str]:
    """Reasons shared by all Triton backends: importable, and tensors on a device Triton can run."""
    err = triton_import_error()
    if err is not None:
        return [err]
    reasons = []
    devices = {t.device.type for t in tensors}
    if devices - {"cuda"}:
        if not (explicit and triton_interpret() and devices == {"cpu"}):
            where = ", ".join(sorted(devices))
            reasons.append(
                f"tensors are on {where}; triton runs CUDA tensors"
                + ("" if explicit else " (CPU tensors run it only when named explicitly under TRITON_INTERPRET=1)")
            )
    if len({t.device for t in tensors}) > 1:
        reasons.append("tensors are on different devices")
    return reasons


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    Args:
        name: "reference", "triton", "xformers", ...
        fn: the implementation's forward; called with the op's arguments (no autograd recorded).
        reasons: ``reasons(explicit, *args, **kwargs) -> list[str]``; empty when ``fn`` can run them.
        bwd: the backward, with the arguments the op's backward gives (see each op); None: the op's backward
            reruns the reference backend under ``torch.func.vjp`` (:func:`recompute_backward`).
    """

    name: str
    fn: Callable
    reasons: Callable[..., list[str]] = field(default=lambda explicit, *a, **k: [])
    bwd: Callable | None = None


_REGISTRY: dict[str, list[Backend]] = {}


def register(op: str, backend: Backend) -> None:
    backends = _REGISTRY.setdefault(op, [])
    if any(b.name == backend.name for b in backends):
        raise ValueError(f"backend {backend.name!r} registered twice for op {op!r}")
    backends.append(backend)


def backends(op: str) -> list[Backend]:
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; known: {sorted(_REGISTRY)}")
    return list(_REGISTRY[op])


def ops() -> list[str]:
    return sorted(_REGISTRY)


def _forced(op: str) -> str | None:
    """The backend STPCORE_BACKEND names for ``op``: "NAME" for every op, "op=NAME,..." per op, or both
    ("reference,slot_top_k=triton": the pairs win). An op name that is not an op is an error (a typo would
    otherwise leave the backend unforced without a word)."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    default, per_op = None, {}
    for item in filter(None, (v.strip() for v in value.split(","))):
        name, sep, backend = (part.strip() for part in item.partition("="))
        if not sep:
            if default is not None:
                raise ValueError(f"{ENV_VAR}={value!r}: two backends for every op ({default!r}, {name!r}); name one, "
                                 f"or give the others as op=backend pairs")
            default = name
        elif name not in _REGISTRY:
            raise ValueError(f"{ENV_VAR}={value!r}: {name!r} is not an op; the ops are {sorted(_REGISTRY)}")
        else:
            per_op[name] = backend
    return per_op.get(op, default)


def _meta(value):
    """A hashable stand-in for an argument: what backends' reasons may read of it."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.device, value.dtype, tuple(value.shape), value.stride())
    if isinstance(value, (list, tuple)):
        return tuple(_meta(v) for v in value)
    if isinstance(value, torch.Generator):
        return ("generator", value.device)
    return value


_CHOICES: dict = {}
_MAX_CHOICES = 4096


def select(op: str, backend: str | None, *args, **kwargs) -> Backend:
    """The backend that runs ``op`` on these inputs (see the module docstring for the rules); cached per the
    inputs' metadata, the environment and the backends registered."""
    key = (op, backend, os.environ.get(ENV_VAR, ""), triton_interpret(), len(_REGISTRY.get(op, ())),
           _meta(args), tuple((k, _meta(v)) for k, v in sorted(kwargs.items())))
    found = _CHOICES.get(key)
    if found is None:
        found = _select(op, backend, *args, **kwargs)
        if len(_CHOICES) >= _MAX_CHOICES:
            _CHOICES.clear()
        _CHOICES[key] = found
    return found


def chosen() -> dict[str, list[str]]:
    """The backends dispatch picked, per op, since :func:`forget_choices` (or the start of the process): what ran,
    for a benchmark or profile to record (a missing Triton install shows here as the reference or chunked backend)."""
    out: dict[str, set[str]] = {}
    for key, backend in _CHOICES.items():
        out.setdefault(key[0], set()).add(backend.name)
    return {op: sorted(names) for op, names in sorted(out.items())}


def forget_choices() -> None:
    """Empty the cache of choices (the next call of each op chooses afresh; :func:`chosen` starts from nothing)."""
    _CHOICES.clear()


def _select(op: str, backend: str | None, *args, **kwargs) -> Backend:
    candidates = backends(op)
    named = backend if backend is not None else _forced(op)
    if named is not None:
        match = [b for b in candidates if b.name == named]
        if not match:
            raise ValueError(
                f"{op}: unknown backend {named!r}; choose one of {[b.name for b in candidates]}"
                + (f" (set by {ENV_VAR})" if backend is None else "")
            )
        reasons = match[0].reasons(True, *args, **kwargs)
        if reasons:
            raise NotImplementedError(f"{op}: backend {named!r} cannot run these inputs: " + "; ".join(reasons))
        return match[0]
    for b in candidates:
        if not b.reasons(False, *args, **kwargs):
            return b
    raise NotImplementedError(f"{op}: no backend can run these inputs")  # the reference never refuses


def direct_reference(op: str, backend: str | None, *args, **kwargs) -> bool:
    """True when ``op``'s public function should call its reference directly, under plain autograd: not while
    torch.compile traces, and the reference named by ``backend`` or ``STPCORE_BACKEND``. The choice is recorded
    (:func:`chosen`) as the custom op would record it; ``args``/``kwargs`` are the custom op's."""
    if torch.compiler.is_compiling():
        return False
    if (backend or _forced(op)) != "reference":
        return False
    return select(op, backend or None, *args, **kwargs).name == "reference"


def call(op: str, backend: str | None, *args, **kwargs):
    return select(op, backend, *args, **kwargs).fn(*args, **kwargs)


def explain(op: str, *args, **kwargs) -> dict[str, list[str]]:
    """{backend name: reasons it would not be picked automatically for these inputs}."""
    return {b.name: b.reasons(False, *args, **kwargs) for b in backends(op)}


def recompute_backward(fn: Callable, inputs: Sequence[torch.Tensor | None], grads: Sequence[torch.Tensor],
                       *args, **kwargs) -> list[torch.Tensor]:
    """Gradients of ``fn(*inputs, *args, **kwargs)`` with respect to its float ``inputs``, given the gradients of
    its first ``len(grads)`` outputs, by running ``fn`` again under ``torch.func.vjp`` (plain autograd does not
    record inside a custom op's implementation). Inputs that are None or not floating point get zeros (a custom
    op's backward returns a tensor per input)."""
    floats = [i for i, t in enumerate(inputs) if t is not None and t.is_floating_point()]

    def differentiable(*primals):
        full = list(inputs)
        for i, t in zip(floats, primals, strict=True):
            full[i] = t
        outs = fn(*full, *args, **kwargs)
        outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        return outs[: len(grads)]

    _, vjp = torch.func.vjp(differentiable, *[inputs[i] for i in floats])
    found = dict(zip(floats, vjp(tuple(grads)), strict=True))
    taken = {t.untyped_storage().data_ptr() for t in (*inputs, *grads) if t is not None and t.numel()}
    result = []
    for i, t in enumerate(inputs):
        g = found.get(i)
        if g is None:
            g = t.new_zeros(t.shape) if t is not None else torch.zeros(0)
        elif not g.numel():  # an empty gradient can share an input's (empty) storage: a custom op's may not
            g = g.new_empty(g.shape)
        elif g.numel() and g.untyped_storage().data_ptr() in taken:
            g = g.clone(memory_format=torch.contiguous_format)  # outputs alias neither inputs nor each other
        g = g.contiguous()  # the backward ops' fakes promise dense gradients, whatever the inputs' strides
        if g.numel():
            taken.add(g.untyped_storage().data_ptr())
        result.append(g)
    return result


def reference(op: str) -> Backend:
    """The reference backend of ``op``: what a backward without a ``bwd`` of its own reruns under vjp (the same
    function, so the same gradient, whichever backend ran the forward)."""
    return next(b for b in backends(op) if b.name == "reference")


def triton_backend(module: str, fn: str, tensors: Callable[..., Sequence[torch.Tensor]],
                   reasons: str = "not_supported_reasons", bwd: str | None = None) -> Backend:
    """A backend that calls ``stpcore.kernels.<module>.<fn>``, importing it only when first needed.

    ``stpcore.kernels.<module>.<reasons>(*args, **kwargs) -> list[str]`` takes ``fn``'s arguments and says why
    the kernel cannot run them (shapes, dtypes, head dims it handles): ``not_supported_reasons`` in a module
    with one entry point, ``<fn>_reasons`` beside each entry point of a module with several. Device and
    import checks are done here. ``tensors(*args, **kwargs)`` returns the input tensors whose devices must
    suit Triton.
    """

    def load():
        return importlib.import_module(f"stpcore.kernels.{module}")

    def not_supported(explicit: bool, *args, **kwargs) -> list[str]:
        found = triton_device_reasons([t for t in tensors(*args, **kwargs) if t is not None], explicit)
        if found:
            return found
        try:
            mod = load()
        except ImportError as exc:
            return [f"stpcore.kernels.{module} cannot be imported: {exc}"]
        return list(getattr(mod, reasons)(*args, **kwargs))

    def run(*args, **kwargs):
        return getattr(load(), fn)(*args, **kwargs)

    def run_bwd(*args, **kwargs):
        return getattr(load(), bwd)(*args, **kwargs)

    run.__name__ = f"triton_{fn}"
    return Backend("triton", run, not_supported, run_bwd if bwd is not None else None)
