"""Triton kernels of stpcore, installed as ``stpcore.kernels``; the only package that imports triton.

Each module reads top to bottom: ``@triton.jit`` kernels, host launchers, the autograd.Function, and
the entry point with the same signature as its reference in ``stpcore.ops``, plus
``not_supported_reasons(...)`` used by the dispatcher. Importing this package does not import triton;
importing one of its modules does.
"""
