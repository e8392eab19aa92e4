"""The policy-attention tile sweep of the GPU harvest, and the merge of its result into ``kernels/tiles.json``.

    python benchmarks/gpu/tiles.py sweep OUT/tiles.json     # on a GPU: time every candidate, keep the best
    python benchmarks/gpu/tiles.py sweep --plan             # list the candidates (any machine)
    python benchmarks/gpu/tiles.py merge OUT/tiles.json     # copy the chosen tiles into kernels/tiles.json

At the paper's shape (B=32, H=6, N=392, D=64), in bf16 and fp16, each candidate of
``stpcore.kernels._tiles.POLICY_TILE_CANDIDATES`` (at most four per pass, the default first) is first checked
against the fp32 reference (flash-attention's rule: at most twice the error of the reference run in the same
precision), then timed with ``triton.testing.do_bench`` (median): the forward alone under no_grad, and the
backward alone (``autograd.grad`` with the graph retained) with the default forward. The fastest correct
candidate of each pass is written under ``policy_attention/<GPU name>/<dtype>-D64``; the file also keeps
every measurement. Merging replaces those entries in ``kernels/tiles.json`` and leaves the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPE = dict(B=32, H=6, N=392, D=64)
DTYPES = ("bf16", "fp16")


def _inputs(dtype):
    import torch

    torch.manual_seed(0)
    B, H, N, D = SHAPE["B"], SHAPE["H"], SHAPE["N"], SHAPE["D"]
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    policy = (torch.rand(B, N, device="cuda") < 0.7).float().requires_grad_()
    dout = torch.randn(B, H, N, D, device="cuda", dtype=dtype)
    return q, k, v, policy, dout


def _outputs(fn, q, k, v, policy, dout, dtype):
    import torch

    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    p = policy.detach().clone().requires_grad_()
    out = fn(*leaves, p)
    return [out, *torch.autograd.grad(out, (*leaves, p), dout.to(out.dtype))]


def sweep_dtype(name: str) -> dict:
    """{"fwd": [{tiles, ms, ok, error?}], "bwd": [...], "best": {"fwd": tiles, "bwd": tiles}} for one dtype."""
    import torch
    import triton.testing

    from stpcore.kernels import policy_attention as kernel
    from stpcore.kernels._tiles import POLICY_TILE_CANDIDATES
    from stpcore.ops.policy_attention import policy_attention_ref
    from stpcore.testing import assert_close

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
    q, k, v, policy, dout = _inputs(dtype)
    want = _outputs(policy_attention_ref, q, k, v, policy, dout, torch.float32)
    lowp = _outputs(policy_attention_ref, q, k, v, policy, dout, dtype)
    names = ("out", "dq", "dk", "dv", "dpolicy")
    result: dict = {"fwd": [], "bwd": [], "best": {}}
    for pass_ in ("fwd", "bwd"):
        for tiles in POLICY_TILE_CANDIDATES[pass_]:
            row: dict = {"tiles": list(tiles)}
            try:
                with kernel.use_tiles(**{pass_: tiles}):
                    got = _outputs(kernel.policy_attention, q, k, v, policy, dout, dtype)
                    checked = [0] if pass_ == "fwd" else range(1, 5)
                    for i in checked:
                        assert_close(got[i], want[i], op="policy_attention", dtype=dtype, name=names[i],
                                     lowp_reference=lowp[i])
                    if pass_ == "fwd":
                        def run():
                            with torch.no_grad():
                                kernel.policy_attention(q, k, v, policy)
                    else:
                        out = kernel.policy_attention(q, k, v, policy)

                        def run(out=out):
                            torch.autograd.grad(out, (q, k, v, policy), dout, retain_graph=True)
                    row["ms"] = round(triton.testing.do_bench(run, return_mode="median"), 5)
                row["ok"] = True
            except Exception as exc:  # noqa: BLE001 - a wrong or failing candidate is recorded, never chosen
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:400])
            result[pass_].append(row)
            print(f"  {name} {pass_} {tuple(tiles)}: " + (f"{row['ms']:.4f} ms" if row.get("ok") else row["error"]),
                  flush=True)
        good = [r for r in result[pass_] if r.get("ok")]
        if good:
            result["best"][pass_] = min(good, key=lambda r: r["ms"])["tiles"]
    return result


def sweep(out: Path) -> int:
    import torch

    from stpcore.kernels._launch import dot_precision
    from stpcore.kernels._tiles import tile_key

    if not torch.cuda.is_available():
        print("tiles: CUDA is not available")
        return 1
    gpu = torch.cuda.get_device_name(0)
    doc: dict = {"gpu": gpu, "shape": SHAPE, "torch": torch.__version__, "measurements": {}, "policy_attention": {}}
    chosen: dict = {}
    for name in DTYPES:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
        result = sweep_dtype(name)
        doc["measurements"][name] = result
        if result["best"]:
            chosen[tile_key(dtype, SHAPE["D"], dot_precision(dtype))] = result["best"]
        # Written after each dtype: a sweep cut short keeps what it measured.
        doc["policy_attention"] = {gpu: chosen}
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, out)
    print(f"tiles: chosen {json.dumps(chosen)} for {gpu}; merge with: python benchmarks/gpu/tiles.py merge {out}")
    return 0


def merge(result: Path, into: Path) -> dict:
    """Copy the chosen tiles of a sweep result into the committed table; returns the new table."""
    from stpcore.kernels._tiles import valid_tiles

    chosen = json.loads(result.read_text()).get("policy_attention", {})
    table = json.loads(into.read_text()) if into.is_file() else {}
    for gpu, keys in chosen.items():
        for key, passes in keys.items():
            for pass_, tiles in passes.items():
                if not valid_tiles(tiles):
                    raise ValueError(f"{result}: {gpu}/{key}/{pass_} = {tiles!r} is not a valid tile entry")
                table.setdefault("policy_attention", {}).setdefault(gpu, {}).setdefault(key, {})[pass_] = tiles
    into.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep", help="time the candidates on this GPU")
    s.add_argument("out", nargs="?", type=Path, help="the result file (tiles.json)")
    s.add_argument("--plan", action="store_true", help="list the candidates and exit")
    m = sub.add_parser("merge", help="copy a sweep's chosen tiles into kernels/tiles.json")
    m.add_argument("result", type=Path)
    m.add_argument("--into", type=Path, default=ROOT / "kernels" / "tiles.json")
    args = parser.parse_args(argv)
    if args.cmd == "merge":
        print(json.dumps(merge(args.result, args.into), indent=1))
        return 0
    if args.plan:
        from stpcore.kernels._tiles import POLICY_TILE_CANDIDATES

        for pass_, candidates in POLICY_TILE_CANDIDATES.items():
            print(f"tiles: {pass_} candidates {[tuple(c) for c in candidates]} x {DTYPES} at {SHAPE}")
        return 0
    if args.out is None:
        parser.error("sweep needs OUT (the result file) unless --plan")
    return sweep(args.out)


if __name__ == "__main__":
    raise SystemExit(main())
