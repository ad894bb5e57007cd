"""fastdiff inside diffusers: ``accelerate(pipe)`` patches a pipeline's models in place.

The only part of fastdiff that imports diffusers; the engine never imports this package.
"""

from .accelerate import accelerate
from .modules import FastdiffAttnProcessor, PatchReport, patch_model, unpatch_model

__all__ = ["accelerate", "patch_model", "unpatch_model", "FastdiffAttnProcessor", "PatchReport"]
