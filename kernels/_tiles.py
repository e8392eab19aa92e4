"""Measured tile sizes per GPU model, read from ``kernels/tiles.json`` once a GPU run has written it (none has
yet: the defaults below run until then). torch and json only: no triton.

The GPU script's tile sweep (``benchmarks/gpu/tiles.py``, run by ``benchmarks/gpu/run.sh``) times a few
candidate tiles per kernel pass on the GPU at hand and writes the fastest correct ones; ``python
benchmarks/gpu/tiles.py merge RESULTS/tiles.json`` copies them into ``kernels/tiles.json``. The launchers
ask :func:`measured_tiles` first and fall back to :func:`default_attention_tiles` (the heuristic both
attention kernels share) when the file, the GPU model, the dtype/head-dim key or the pass is absent. Format::

    {"policy_attention": {"NVIDIA H200": {"bf16-D64": {"fwd": [64, 64, 4, 3], "bwd": [64, 32, 4, 3]}}}}

each entry (BLOCK_M, BLOCK_N, num_warps, num_stages). An entry that is not four sane integers is ignored
with a warning, so a bad edit cannot break a launch.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import torch

from stpcore.kernels._launch import INTERPRET, dot_precision

Tiles = tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
TILES_FILE = Path(__file__).with_name("tiles.json")
PASSES = ("fwd", "bwd")
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# The tile sweep's candidates for policy attention at the paper's shape (bf16/fp16, D = 64): at most four per
# pass, the default first. tests/kernels/test_compile.py compiles every one for sm_90 and checks its spills.
POLICY_TILE_CANDIDATES: dict[str, tuple[Tiles, ...]] = {
    "fwd": ((64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 4)),
    "bwd": ((64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 2)),
}


def tile_key(dtype: torch.dtype, head_dim: int, precision: str = "") -> str:
    """The table key of one configuration: "bf16-D64", or "fp32-ieee-D64" / "fp32-tf32-D64" for fp32."""
    name = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    if dtype == torch.float32 and precision:
        name += f"-{precision}"
    return f"{name}-D{head_dim}"


def default_attention_tiles(n: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> Tiles:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the attention kernels (policy and varlen) for sequences of up
    to ``n`` tokens when no measured tiles apply.

    The interpreter runs every program in Python, so fewer, larger blocks are faster there. On the GPU,
    64 x 64 tiles keep q, k, v tiles of D <= 64 (and the fp32 score tile) in registers with 4 warps at
    the paper's N = 392 (7 blocks, 56 padded rows); D = 128 or fp32 operands halve the key block to stay
    within registers, and use 2 pipeline stages instead of 3 to bound shared memory. (A heuristic, not
    tuned on hardware: autotuning cannot run in the interpreter.)

    fp32 operands with IEEE dots (torch's default: TF32 off) run on FMA units, where every thread holds
    its rows of both operands over the whole head dim: 64 x 32 tiles there spill 5-17 KB per thread to
    local memory on sm_90 (and take 10-30 s to compile), so they get 32 x 32 tiles, 16 x 16 at D = 128,
    over 8 warps, which compile without spills (tests/kernels/test_compile.py checks all of this).
    """
    if INTERPRET or device.type != "cuda":
        blk = max(16, min(128, 1 << (max(1, n) - 1).bit_length()))  # triton.next_power_of_2, without triton
        return blk, blk, 4, 1
    if dtype == torch.float32 and dot_precision(dtype) == "ieee":
        return (32, 32, 8, 2) if head_dim <= 64 else (16, 16, 8, 2)
    wide = head_dim * (4 if dtype == torch.float32 else 2) > 128
    return 64, 32 if wide else 64, 4, 2 if wide else 3


def valid_tiles(entry) -> bool:
    """Four integers: power-of-two blocks of 16-256, 1-16 warps (a power of two), 1-6 pipeline stages."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 4:
        return False
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in entry):
        return False
    bm, bn, warps, stages = entry
    pow2 = lambda x: x > 0 and x & (x - 1) == 0  # noqa: E731
    return (all(pow2(b) and 16 <= b <= 256 for b in (bm, bn)) and pow2(warps) and warps <= 16
            and 1 <= stages <= 6)


@functools.cache
def load_table(path: str) -> dict:
    """{op: {gpu name: {key: {pass: Tiles}}}} from ``path``; {} when the file is absent. Invalid entries dropped."""
    file = Path(path)
    if not file.is_file():
        return {}
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        warnings.warn(f"{file}: unreadable tile table ({exc}); using the default tiles", stacklevel=2)
        return {}
    table: dict = {}
    for op, gpus in (raw.items() if isinstance(raw, dict) else ()):
        if not isinstance(gpus, dict):
            continue
        for gpu, keys in gpus.items():
            for key, passes in (keys.items() if isinstance(keys, dict) else ()):
                for pass_, entry in (passes.items() if isinstance(passes, dict) else ()):
                    if pass_ not in PASSES:
                        continue
                    if not valid_tiles(entry):
                        warnings.warn(f"{file}: {op}/{gpu}/{key}/{pass_} = {entry!r} is not (BLOCK_M, BLOCK_N, "
                                      "num_warps, num_stages); ignored", stacklevel=2)
                        continue
                    table.setdefault(op, {}).setdefault(gpu, {}).setdefault(key, {})[pass_] = tuple(entry)
    return table


def cuda_available() -> bool:
    return torch.cuda.is_available()


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str:
    """The GPU model as torch names it ("NVIDIA H200"): the table's second key."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_name(index)


def measured_tiles(op: str, device: torch.device, key: str, pass_: str, path: Path | None = None) -> Tiles | None:
    """The committed tiles of ``op``'s ``pass_`` for this GPU model and key, or None (use the defaults; always
    where CUDA is absent, as in the sm_90 compile test on a CPU machine)."""
    table = load_table(str(path or TILES_FILE))
    if op not in table or not cuda_available():
        return None
    return table[op].get(device_name(device), {}).get(key, {}).get(pass_)
