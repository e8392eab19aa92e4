"""Triton kernels of stpcore, installed as ``stpcore.kernels``; the only package that imports triton.

Each module reads top to bottom: ``@triton.jit`` kernels, host launchers, the autograd.Function, and
the entry point with the same signature as its reference in ``stpcore.ops``, plus the reasons function
the dispatcher asks: ``not_supported_reasons(...)`` in a module with one entry point, ``<entry>_reasons(...)``
beside each entry point of a module with several (``tokens``, ``varlen_attention``). ``_launch`` holds what
the modules share (the interpreter flag, constants, host helpers). Importing this package does not import
triton; importing one of its kernel modules does.
"""
