"""Every public op is a torch.library custom op: torch.library.opcheck on CPU (schema, fake implementation,
registered autograd, AOT dispatch with dynamic shapes) for each backend that runs CPU tensors, and the
backend choice inside the op still follows STPCORE_BACKEND."""

from __future__ import annotations

import pytest
import torch

from stpcore import ops
from stpcore.ops import dispatch

B, H, N, D, S = 2, 2, 12, 8, 3


def _policy_args(backend, dtype=torch.float32, fused=False):
    g = torch.Generator().manual_seed(0)
    if fused:  # views of one fused qkv projection, as the model passes them: strided, not dense
        qkv = torch.randn(B, N, 3, H, D, generator=g).to(dtype).requires_grad_()
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (torch.randn(B, H, N, D, generator=g).to(dtype).requires_grad_() for _ in range(3))
    policy = (torch.rand(B, N, generator=g) > 0.4).to(dtype).requires_grad_()
    return (q, k, v, policy, 1e-6, backend)


def _varlen_args(backend):
    g = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    q, k, v = (torch.randn(12, H, D, generator=g, requires_grad=True) for _ in range(3))
    return (q, k, v, cu, 7, D**-0.5, backend)


def _gumbel_args(backend, with_noise=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    lp = torch.randn(B, N, 2, generator=g).log_softmax(-1).to(dtype).requires_grad_()
    prev = (torch.rand(B, N, generator=g) > 0.3).float().requires_grad_()
    noise = -torch.empty(B, N, 2).exponential_(generator=g).log() if with_noise else None
    seed = None if with_noise else torch.tensor([123], dtype=torch.int64)
    return (lp, prev, noise, seed, 0.7, True, backend)


def _pool_args(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, N, 3 * D, generator=g, requires_grad=True)
    keep = (torch.rand(B, N, generator=g) > 0.5).float().requires_grad_()
    return (x, keep, S, backend)


def _tokens_args(op, backend):
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(B, N, generator=g)
    x = torch.randn(B, N, D, generator=g, requires_grad=True)
    idx = ops.slot_topk_ref(scores, S, 2)
    return {
        "slot_topk": (scores, S, 2, backend),
        "gather_tokens": (x, torch.tensor([[0, 3, 3, 7], [1, 1, 2, 11]]), backend),  # repeats: an accumulating adjoint
        "scatter_tokens": (ops.gather_tokens_ref(x, idx).detach().requires_grad_(), idx, N, False, backend),
        "slot_topk_gather": (scores, x, S, 2, backend),
    }[op]


CASES = [
    ("policy_attention", _policy_args, "reference"),
    ("policy_attention", _policy_args, "chunked"),
    ("policy_attention", _policy_args, ""),
    ("policy_attention", lambda b: _policy_args(b, fused=True), ""),
    ("policy_attention", lambda b: _policy_args(b, fused=True), "reference"),
    ("policy_attention", lambda b: _policy_args(b, dtype=torch.float16), "chunked"),
    ("varlen_attention", _varlen_args, "reference"),
    ("gumbel_select", _gumbel_args, ""),
    ("gumbel_select", lambda b: _gumbel_args(b, with_noise=False), "reference"),
    ("gumbel_select", lambda b: _gumbel_args(b, with_noise=False, dtype=torch.float16), "reference"),
    ("predictor_pool", _pool_args, ""),
    *[(op, lambda b, op=op: _tokens_args(op, b), "") for op in
      ("slot_topk", "gather_tokens", "scatter_tokens", "slot_topk_gather")],
]


@pytest.mark.parametrize("op, make, backend", CASES,
                         ids=[f"{op}-{backend or 'auto'}-{i}" for i, (op, _, backend) in enumerate(CASES)])
def test_opcheck(op, make, backend):
    torch.library.opcheck(getattr(torch.ops.stpcore, op), make(backend))


def test_every_dispatched_op_is_a_registered_custom_op():
    for op in dispatch.ops():
        assert hasattr(torch.ops.stpcore, op), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"stpcore::{op}", "Meta") or \
            torch._library.simple_registry.singleton.find(f"stpcore::{op}").fake_impl.kernel is not None, op


def test_the_backend_is_chosen_inside_the_op_and_follows_the_environment(monkeypatch):
    """The op picks its backend when it runs: STPCORE_BACKEND switches the policy-attention op from the chunked
    path to the direct formulation, whose statistics are zeros, with the same output."""
    q, k, v, policy, eps, _ = _policy_args("")
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    chunked = torch.ops.stpcore.policy_attention(q, k, v, policy, eps, "")
    monkeypatch.setenv(dispatch.ENV_VAR, "policy_attention=reference")
    direct = torch.ops.stpcore.policy_attention(q, k, v, policy, eps, "")
    torch.testing.assert_close(direct[0], chunked[0], rtol=1e-5, atol=1e-6)
    assert chunked[2].abs().sum() > 0 and direct[2].abs().sum() == 0  # row_max: real vs the reference's zeros
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        torch.ops.stpcore.policy_attention(q, k, v, policy, eps, "nope")


def test_reference_gumbel_given_a_seed_is_deterministic():
    """The reference drawing its own noise from a seed tensor (a CUDA call forced to the reference): the same
    seed, the same decision; the gradient is the straight-through softmax's."""
    a = torch.ops.stpcore.gumbel_select(*_gumbel_args("reference", with_noise=False))
    b = torch.ops.stpcore.gumbel_select(*_gumbel_args("reference", with_noise=False))
    assert torch.equal(a, b)
    lp, prev, _, seed, tau, hard, backend = _gumbel_args("reference", with_noise=False)
    other = torch.ops.stpcore.gumbel_select(lp, prev, None, seed + 1, tau, hard, backend)
    assert not torch.equal(a, other)


def test_the_eval_forward_exports_and_decomposes_into_aten_ops():
    """torch.export of STPrivacy's eval forward holds stpcore's ops as nodes; run_decompositions with
    stpcore.ops.export.decompositions() leaves aten ops only (what an ONNX exporter translates), with the same
    output as eager."""
    from stpcore.models import STPrivacy, STPrivacyConfig
    from stpcore.ops.export import decompositions

    class VideoAndKeep(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, clips):
            out = self.model(clips)
            return out.video, out.keep

    torch.manual_seed(0)
    module = VideoAndKeep(STPrivacy(STPrivacyConfig.from_name("tiny")).eval())
    clips = torch.randn(2, 3, 8, 32, 32)

    def stpcore_nodes(ep):
        return sorted({str(n.target) for n in ep.graph.nodes if str(n.target).startswith("stpcore.")})

    ep = torch.export.export(module, (clips,))
    assert stpcore_nodes(ep) == ["stpcore.predictor_pool.default", "stpcore.scatter_tokens.default",
                                 "stpcore.slot_topk_gather.default"]
    flat = ep.run_decompositions(decompositions())
    assert stpcore_nodes(flat) == []
    for got, want in zip(flat.module()(clips), module(clips), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _public_call(op, args):
    """The public function of ``op`` called with the custom op's arguments (its backend last)."""
    if op == "policy_attention":
        q, k, v, policy, eps, backend = args
        return ops.policy_attention(q, k, v, policy, eps=eps, backend=backend or None)
    if op == "varlen_attention":
        q, k, v, cu, max_seqlen, scale, backend = args
        return ops.varlen_attention(q, k, v, cu, max_seqlen, scale=scale, backend=backend or None)
    if op == "gumbel_select":
        lp, prev, noise, _seed, tau, hard, backend = args
        return ops.gumbel_select(lp, prev, tau=tau, hard=hard, noise=noise, backend=backend or None)
    x, keep, slots, backend = args
    return ops.predictor_pool(x, keep, slots, backend=backend or None)


DIRECT = {"policy_attention": _policy_args, "varlen_attention": _varlen_args, "gumbel_select": _gumbel_args,
          "predictor_pool": _pool_args}


@pytest.mark.parametrize("how", ["argument", "environment"])
@pytest.mark.parametrize("op", list(DIRECT))
def test_a_named_reference_runs_directly_under_plain_autograd(monkeypatch, op, how):
    """Named in eager code, the reference of an op without a backward of its own runs as the function itself, so
    autograd records it (the authors' formulation, what the whole-model `reference` baseline must measure: its
    memory and its time) instead of rerunning it in the backward: called once per forward and backward, not
    twice; the same outputs and gradients as the custom op's reference; the choice still recorded."""
    import importlib

    module = importlib.import_module(f"stpcore.ops.{op}")
    ref_name = f"{op}_ref"
    calls = []
    original = getattr(module, ref_name)

    def counted(*a, **kw):
        calls.append(1)
        return original(*a, **kw)

    monkeypatch.setattr(module, ref_name, counted)
    backend = "reference" if how == "argument" else ""
    if how == "environment":
        monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    else:
        monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.forget_choices()
    args = DIRECT[op](backend)
    out = _public_call(op, args)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    assert len(calls) == 1, f"{op}: the reference ran {len(calls)} times for one forward and backward"
    assert dispatch.chosen() == {op: ["reference"]}

    monkeypatch.setattr(module, ref_name, original)
    args_op = DIRECT[op]("reference")
    through_op = getattr(torch.ops.stpcore, op)(*args_op)
    through_op = through_op[0] if isinstance(through_op, tuple) else through_op
    inputs_op = [a for a in args_op if isinstance(a, torch.Tensor) and a.requires_grad]
    grads_op = torch.autograd.grad((through_op * weights).sum(), inputs_op)
    torch.testing.assert_close(out, through_op, rtol=0, atol=0)
    for name, (a, b) in enumerate(zip(grads, grads_op, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"{op} gradient {name}")


def test_a_named_reference_is_still_one_custom_op_when_traced(monkeypatch):
    """torch.compile traces the custom op, not the direct formulation, whatever is named (no graph break)."""
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes)
        return gm

    q, k, v, policy, eps, _ = _policy_args("")
    compiled = torch.compile(lambda *t: ops.policy_attention(*t, eps=eps), backend=record, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, policy), ops.policy_attention(q, k, v, policy, eps=eps),
                               rtol=0, atol=0)
    assert "stpcore.policy_attention" in targets, targets
