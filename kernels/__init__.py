"""Triton kernels of fastdiff (installed as ``fastdiff.kernels``).

Importing this package does not import Triton; each launcher imports its kernel module on first use.
Launchers validate their input and raise ``ValueError`` on what they cannot do; the ``*_problem``
predicates say, without launching, why an input is unsupported (None when it is supported).
"""
