"""benchmarks/authors_compile.py loads the authors' stprivacy.py from a folder, without timm: its stand-ins answer the
release's two timm import lines, and a folder without the file is refused with the fix."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "authors_compile.py"

# The release's own import lines (stprivacy.py lines 11-12 at c64b6de) and a use of each name.
FAKE_RELEASE = """
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.layers import DropPath, to_2tuple, trunc_normal_

MEAN, STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
PAIR = to_2tuple(112)
DROP = DropPath(0.5)
INIT = trunc_normal_
"""


@pytest.fixture
def script():
    spec = importlib.util.spec_from_file_location("authors_compile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    before = set(sys.modules)
    yield module
    for name in set(sys.modules) - before:  # the stand-ins and the loaded file leave no trace for other tests
        if name == "stprivacy" or name == "timm" or name.startswith("timm."):
            del sys.modules[name]


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed: no stand-ins")
def test_the_release_imports_through_the_stand_ins(script, tmp_path):
    (tmp_path / "stprivacy.py").write_text(FAKE_RELEASE)
    release = script.load_release(tmp_path)
    assert release.MEAN == (0.485, 0.456, 0.406) and release.STD == (0.229, 0.224, 0.225)
    assert release.PAIR == (112, 112) and script.sys.path.count(str(tmp_path)) == 0
    x = torch.randn(4, 3, 5)
    assert torch.equal(release.DROP.eval()(x), x)  # stochastic depth is the identity at inference
    dropped = release.DROP.train()(torch.ones(64, 8))
    assert set(dropped[:, 0].tolist()) <= {0.0, 2.0} and torch.equal(dropped, dropped[:, :1].expand(-1, 8))
    w = release.INIT(torch.empty(4000), std=0.02)  # timm's bounds are absolute (-2, 2): at std 0.02, a normal
    assert 0.018 < w.std() < 0.022 and w.abs().max() < 0.2


def test_a_folder_without_the_release_is_refused_with_the_fix(script, tmp_path):
    with pytest.raises(SystemExit, match=r"no stprivacy\.py here; give --release the folder of a checkout of "
                                         r"github\.com/ming1993li/stprivacy"):
        script.load_release(tmp_path)
