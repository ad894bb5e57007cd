"""fastdiff benchmarks: ``python -m bench.kernels``, ``python -m bench.sampling`` or ``fastdiff bench ...``.

This folder lives beside ``fastdiff/`` in the source tree and is not part of the installed package.
"""
