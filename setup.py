"""Packaging for stpcore.

The Triton kernels live in the top-level ``kernels/`` folder but are installed as ``stpcore.kernels``
(a top-level package called ``kernels`` would collide with an unrelated PyPI project). Packages are
listed explicitly so nothing else in the repository (tests, benchmarks) is installed.
"""

from setuptools import setup

setup(
    packages=[
        "stpcore",
        "stpcore.ops",
        "stpcore.layers",
        "stpcore.models",
        "stpcore.data",
        "stpcore.training",
        "stpcore.evaluation",
        "stpcore.kernels",
    ],
    package_dir={"stpcore.kernels": "kernels"},
    package_data={"stpcore.kernels": ["tiles.json"]},
)
