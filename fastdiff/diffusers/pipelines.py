"""diffusers' DDPMPipeline and DDIMPipeline whose denoising step runs as one CUDA graph (``fastdiff.accelerate``).

``accelerate`` sets an accelerated pipeline's class to one of these subclasses (same class name, so
``save_pretrained`` writes the same ``_class_name``). On the CPU, without CUDA graphs, or with a scheduler that
is not fastdiff's, ``__call__`` is diffusers' own; on CUDA it is the same computation with the loop replaced by
``graphs.StepLoop``: the same initial noise and per-step noise from the caller's generator (drawn as diffusers'
``randn_tensor`` draws them, in the same order), the same post-processing and outputs.
"""

from __future__ import annotations

import inspect

import diffusers
import torch
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor



def _image_shape(unet, batch_size: int) -> tuple:
    size = unet.config.sample_size
    if isinstance(size, int):
        return (batch_size, unet.config.in_channels, size, size)
    return (batch_size, unet.config.in_channels, *size)


def _postprocess(pipe, image, output_type, return_dict):
    """The end of diffusers' DDPM/DDIM ``__call__``: to [0, 1], then pt / np / pil."""
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type != "pt":
        image = image.cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            image = pipe.numpy_to_pil(image)
    pipe.maybe_free_model_hooks()
    if not return_dict:
        return (image,)
    return ImagePipelineOutput(images=image)


class _GraphLoopMixin:
    """``__call__`` through a captured denoising step where possible, diffusers' own call otherwise."""

    _ddim = False

    def _use_step_graph(self) -> bool:
        """True where the denoising loop runs as ``graphs.StepLoop``: CUDA graphs allowed, the UNet on CUDA (or the
        loop forced on for a check: ``pipe._fastdiff.step_loop_off_cuda``) and a fastdiff DDPM/DDIM scheduler."""
        from fastdiff.schedulers.schedule import SchedulerBase

        state = getattr(self, "_fastdiff", None)
        if state is None or state.cuda_graphs is False or not isinstance(self.scheduler, SchedulerBase):
            return False
        return self.unet.device.type == "cuda" or state.step_loop_off_cuda

    def __call__(self, *args, **kwargs):
        parent = super().__call__
        with torch.no_grad():
            if not self._use_step_graph():
                return parent(*args, **kwargs)
            bound = inspect.signature(parent).bind(*args, **kwargs)
            bound.apply_defaults()
            return self._graph_call(**bound.arguments)

    def _graph_call(self, batch_size=1, generator=None, num_inference_steps=1000, output_type="pil",
                    return_dict=True, eta=0.0, use_clipped_model_output=None, **unused):
        unet = self.unet
        shape = _image_shape(unet, batch_size)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"You have passed a list of generators of length {len(generator)}, but requested an "
                             f"effective batch size of {batch_size}. Make sure the batch size matches the length "
                             f"of the generators.")
        device = self._execution_device
        image = randn_tensor(shape, generator=generator, device=device, dtype=unet.dtype)
        loop = self._fastdiff.step_loop(self, shape, unet.dtype, device, num_inference_steps, float(eta),
                                        bool(use_clipped_model_output), self._ddim)
        timesteps = loop.scheduler.timesteps.tolist()  # host list made at set_timesteps: no device read per step
        # diffusers draws a step's noise when DDPM's t > 0, and on every DDIM step when eta > 0
        draws = [eta > 0] * len(timesteps) if self._ddim else [t > 0 for t in timesteps]

        def draw_noise(i):
            if not draws[i]:
                return None
            return randn_tensor(shape, generator=generator, device=device, dtype=unet.dtype)

        image = loop.run(image, draw_noise, progress=self.progress_bar)
        return _postprocess(self, image, output_type, return_dict)


class DDPMPipeline(_GraphLoopMixin, diffusers.DDPMPipeline):
    """diffusers' ``DDPMPipeline``, its denoising step one CUDA graph on CUDA (set by ``fastdiff.accelerate``)."""


class DDIMPipeline(_GraphLoopMixin, diffusers.DDIMPipeline):
    """diffusers' ``DDIMPipeline``, its denoising step one CUDA graph on CUDA (set by ``fastdiff.accelerate``)."""

    _ddim = True


ACCELERATED_CLASSES = {diffusers.DDPMPipeline: DDPMPipeline, diffusers.DDIMPipeline: DDIMPipeline}
