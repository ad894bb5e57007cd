"""fastdiff: a Triton-accelerated diffusion engine for DDPM-style UNets."""

from ._source_tree import register_source_kernels

register_source_kernels()

__version__ = "0.1.0"
