"""What does torch.compile gain on the authors' release, and on stpcore? Both STPrivacy models (vit_small, the same
keep schedule 392 -> 272 -> 192 -> 128, B=8, fp32 CPU inference) timed eager and compiled (default Inductor), each
pair back to back in every round with the order alternating, all in one process; the median of eager / compiled
per variant, and one warm forward of each under torch.profiler (CPU self time per aten op).

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) .venv/bin/python benchmarks/authors_compile.py --release DIR \
        [--rounds 15] [--threads N] [--json OUT.json]

(the empty cache makes the compile seconds a cold compile's). Variants:

- ``authors``: the release's model; ``torch.compile(model)``, the batch static.
- ``authors+sdpa``: the same model with its attention's matmul, softmax and matmul replaced by one
  ``F.scaled_dot_product_attention`` call (the same function: eval runs it without a policy), eager and compiled:
  how much of the release's compile gain that one call gives without a compiler.
- ``stpcore``: stpcore's model called directly; ``torch.compile(model)``, the batch static, as the release's.
- ``stpcore anonymizer``: ``ClipAnonymizer`` eager and ``compile=True`` (the batch dynamic; a finite check per call).

``DIR`` holds the release's ``stprivacy.py`` (github.com/ming1993li/stprivacy; checked at commit c64b6de): it is
imported from there, never copied here. It imports three timm helpers and two ImageNet constants; timm is not part of
stpcore's install (it pulls its own torch), so this script puts parameter-free stand-ins of its own under those
names in ``sys.modules`` first: DropPath (the identity at inference), to_2tuple and trunc_normal_ (torch's). They add
no state and no work at inference. The release's eval forward keeps the top-scoring tokens per slot and gathers
them (``stprivacy.py`` 383-394), as stpcore's does; its attention is written out as matmul, softmax and matmul
(185-192), where stpcore calls SDPA.

Every model gets the predictor separation of the project's other benchmarks (``separate_keep_scores``), so that
compiled and eager rounding cannot flip a near-tied keep decision; it changes no amount of work. The JSON records
the machine (CPU flags, torch's CPU capability, threads) and the sha256 of the ``stprivacy.py`` that ran.
"""

from __future__ import annotations

import argparse
import collections.abc
import copy
import hashlib
import importlib
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's benchmarks package
from benchmarks.ab import cpu_flags  # noqa: E402
from benchmarks.compile_options import forward_profile  # noqa: E402
from stpcore.inference import ClipAnonymizer  # noqa: E402
from stpcore.models import STPrivacy, STPrivacyConfig  # noqa: E402
from stpcore.testing import separate_keep_scores  # noqa: E402

# The library calls of these forwards: the GEMMs (the release's attention adds bmm) and SDPA.
LIBRARY_OPS = ("aten::addmm", "aten::bmm", "aten::mm", "aten::_scaled_dot_product_flash_attention_for_cpu")


def _install_timm_stand_ins() -> None:
    """``timm.data`` and ``timm.models.layers`` with what the release imports from them (no timm needed)."""
    if "timm" in sys.modules:
        return

    class DropPath(torch.nn.Module):
        """Stochastic depth: the identity at inference, which is all this script runs."""

        def __init__(self, drop_prob: float = 0.0):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            if not self.training or self.drop_prob == 0.0:
                return x
            keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.drop_prob)
            return x * keep / (1.0 - self.drop_prob)

    def to_2tuple(x):
        return tuple(x) if isinstance(x, collections.abc.Iterable) and not isinstance(x, str) else (x, x)

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
        return torch.nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)

    modules = {name: types.ModuleType(name) for name in ("timm", "timm.data", "timm.models", "timm.models.layers")}
    modules["timm.data"].IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
    modules["timm.data"].IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
    layers = modules["timm.models.layers"]
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = DropPath, to_2tuple, trunc_normal_
    modules["timm"].data, modules["timm"].models = modules["timm.data"], modules["timm.models"]
    modules["timm.models"].layers = layers
    sys.modules.update(modules)


def load_release(release: Path):
    """The release's ``stprivacy`` module, imported from ``release``."""
    if not (release / "stprivacy.py").is_file():
        raise SystemExit(f"{release}: no stprivacy.py here; give --release the folder of a checkout of "
                         "github.com/ming1993li/stprivacy")
    _install_timm_stand_ins()
    sys.path.insert(0, str(release))
    try:
        return importlib.import_module("stprivacy")
    finally:
        sys.path.remove(str(release))


def authors_model(module, cfg: STPrivacyConfig) -> torch.nn.Module:
    """The paper's ViT-S as the release builds it, with stpcore's keep schedule (0.7 per stage, cumulative)."""
    return module.STPrivacy(img_size=cfg.image_size, patch_size=16, tubelet_size=2, all_frames=cfg.num_frames,
                            in_chans=3, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, qkv_bias=True,
                            pruning_loc=[3, 6, 9], token_ratio=[0.7, 0.49, 0.343])


def _sdpa_attention(self, x: torch.Tensor, policy) -> torch.Tensor:
    """The release's Attention.forward at inference (no policy) with one SDPA call for its matmul, softmax, matmul
    (its scale is head_dim ** -0.5 unless given, as SDPA's default; checked by the output comparison)."""
    if policy is not None:
        raise ValueError("the SDPA stand-in covers inference only (no policy)")
    B, N, C = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
    return self.proj(out.transpose(1, 2).reshape(B, N, C))


def with_sdpa(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the release's model whose every Attention runs :func:`_sdpa_attention`."""
    model = copy.deepcopy(model)
    swapped = 0
    for module in model.modules():
        if type(module).__name__ == "Attention" and hasattr(module, "qkv"):
            module.forward = types.MethodType(_sdpa_attention, module)
            swapped += 1
    if swapped == 0:
        raise SystemExit("no Attention module found in the release's model: has stprivacy.py changed?")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, required=True, help="folder holding the release's stprivacy.py")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    release = load_release(args.release)
    cfg = STPrivacyConfig.from_name("vit_small")
    torch.manual_seed(0)
    clips = torch.randn(8, 3, cfg.num_frames, cfg.image_size, cfg.image_size)
    torch.manual_seed(0)
    theirs = separate_keep_scores(authors_model(release, cfg), scale=10.0).eval()
    theirs_sdpa = with_sdpa(theirs)
    ours = separate_keep_scores(STPrivacy(cfg), scale=10.0).eval()

    def run(model):
        def forward(x):
            with torch.inference_mode():
                return model(x)
        return forward

    variants = {"authors": (run(theirs), run(torch.compile(theirs))),
                "authors+sdpa": (run(theirs_sdpa), run(torch.compile(theirs_sdpa))),
                "stpcore": (run(ours), run(torch.compile(ours))),
                "stpcore anonymizer": (ClipAnonymizer(ours, precision="fp32"),
                                       ClipAnonymizer(ours, precision="fp32", compile=True))}
    report = {"release_sha256": hashlib.sha256((args.release / "stprivacy.py").read_bytes()).hexdigest(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_flags": cpu_flags(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "batch": clips.shape[0], "models": {}}
    authors_reference = variants["authors"][0](clips)
    for name, (eager, compiled) in variants.items():
        reference = eager(clips)
        start = time.perf_counter()
        out = compiled(clips)
        entry = report["models"][name] = {"compile_s": round(time.perf_counter() - start, 1)}
        # The release returns (video, keep (B, N, 1)); stpcore an STPrivacyOutput. The SDPA variant's eager output
        # is also compared with the release's own (the stand-in must compute the same function).
        pick = (lambda o: (o[0], o[1])) if name.startswith("authors") else (lambda o: (o.video, o.keep))
        (video, keep), (video_ref, keep_ref) = pick(out), pick(reference)
        entry["video_max_abs_diff"] = float((video - video_ref).abs().max())
        entry["keep_agreement"] = round((keep == keep_ref).float().mean().item(), 4)
        entry["kept_tokens_per_clip"] = int(keep_ref.flatten(1).sum(dim=1)[0])
        if name == "authors+sdpa":
            original_video, original_keep = pick(authors_reference)
            entry["eager_vs_release_video_max_abs_diff"] = float((video_ref - original_video).abs().max())
            entry["eager_vs_release_keep_agreement"] = round((keep_ref == original_keep).float().mean().item(), 4)
        compiled(clips)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn(clips)
        return time.perf_counter() - start

    times = {name: {"eager": [], "compiled": []} for name in variants}
    for r in range(args.rounds):
        for name, (eager, compiled) in variants.items():
            order = ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")
            for which in order:
                times[name][which].append(timed(eager if which == "eager" else compiled))
    for name, t in times.items():
        ratios = [e / c for e, c in zip(t["eager"], t["compiled"], strict=True)]
        report["models"][name].update(
            speedup_vs_eager=round(statistics.median(ratios), 3), rounds=[round(v, 3) for v in ratios],
            eager_ms=round(statistics.median(t["eager"]) * 1e3, 1),
            compiled_ms=round(statistics.median(t["compiled"]) * 1e3, 1))
        eager, compiled = variants[name]
        report["models"][name]["eager_profile"] = forward_profile(eager, clips, top=10, library_ops=LIBRARY_OPS)
        report["models"][name]["compiled_profile"] = forward_profile(compiled, clips, top=10, library_ops=LIBRARY_OPS)
        print(name, {k: v for k, v in report["models"][name].items() if "profile" not in k})
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
