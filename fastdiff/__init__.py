"""fastdiff: a Triton-accelerated diffusion engine for DDPM-style UNets."""

from ._source_tree import register_source_kernels

register_source_kernels()

__version__ = "0.1.0"

from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from .manifest import RunManifest  # noqa: E402
from .sampling import Sampler, generate, image_seed, image_seeds  # noqa: E402
from .schedulers import DDIMScheduler, DDPMScheduler  # noqa: E402
from .schedulers import DPMSolverMultistepScheduler  # noqa: E402
from .unet import UNet, UNetConfig  # noqa: E402

__all__ = ["UNet", "UNetConfig", "DDPMScheduler", "DDIMScheduler", "Sampler", "generate", "image_seed", "image_seeds",
           "load_checkpoint", "save_checkpoint", "RunManifest", "__version__"]
__all__ += ["DPMSolverMultistepScheduler"]
