"""fastdiff: a Triton-accelerated diffusion engine for DDPM-style UNets."""

from ._source_tree import register_source_kernels

register_source_kernels()


def __getattr__(name):
    # fastdiff.accelerate (the diffusers integration, fastdiff/diffusers/) is loaded on first use only, so importing
    # fastdiff never imports diffusers; for the same reason it is not in __all__ (a star import would load it).
    if name == "accelerate":
        from .diffusers import accelerate

        return accelerate
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")


__version__ = "0.1.0"

from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from .manifest import RunManifest  # noqa: E402
from .sampling import Sampler, generate, image_seed, image_seeds  # noqa: E402
from .schedulers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler  # noqa: E402
from .unet import UNet, UNetConfig  # noqa: E402

__all__ = ["UNet", "UNetConfig", "DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "Sampler", "generate",
           "image_seed", "image_seeds", "load_checkpoint", "save_checkpoint", "RunManifest", "__version__"]
