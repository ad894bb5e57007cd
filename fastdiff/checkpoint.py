"""UNet checkpoints: a directory with ``config.json`` and ``model.safetensors``. Never pickle.

config.json of a fastdiff checkpoint::

    {"fastdiff_unet": 1,              # format marker and version
     "config": {...},                 # UNetConfig.to_dict()
     ...extra_metadata}               # e.g. "scheduler": {...} (read by fastdiff.pipeline)

``load_checkpoint`` also reads a diffusers ``UNet2DModel`` directory (config.json with
``"_class_name": "UNet2DModel"`` and diffusion_pytorch_model.safetensors). Every problem raises
``CheckpointError`` (a ValueError) with a one-line message naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os

import torch

from .fileio import atomic_write, atomic_write_text
from .unet import UNet, UNetConfig

FORMAT_KEY = "fastdiff_unet"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_MAX_LISTED = 8  # keys listed per category in a mismatch message


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, corrupt, or not matching its config."""


# ---------------------------------------------------------------------------------------------- saving
def save_checkpoint(model: UNet, directory, extra_metadata: dict | None = None) -> str:
    """Write ``model`` to ``directory`` (created if needed) as config.json + model.safetensors, each atomically.

    ``extra_metadata``: JSON-safe entries stored at the top level of config.json beside the config.
    Returns the directory.
    """
    from safetensors.torch import save_file

    if not isinstance(model, UNet):
        raise TypeError(f"save_checkpoint expects a fastdiff UNet, got {type(model).__name__}")
    extra = dict(extra_metadata or {})
    reserved = {FORMAT_KEY, "config"} & set(extra)
    if reserved:
        raise ValueError(f"extra_metadata may not use the reserved keys {sorted(reserved)}")
    document = {FORMAT_KEY: FORMAT_VERSION, "config": model.config.to_dict(), **extra}
    try:
        text = json.dumps(document, indent=2, sort_keys=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra_metadata is not JSON-serialisable: {exc}") from None

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", FORMAT_KEY: str(FORMAT_VERSION)}
    atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp, metadata=metadata))

    atomic_write_text(os.path.join(directory, CONFIG_NAME), text)
    return directory


# ---------------------------------------------------------------------------------------------- loading
def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from None


def _inspect(path, want_diffusers: bool = False) -> tuple[str, UNetConfig, str, dict]:
    """(kind "fastdiff" | "diffusers", config, weights file, raw config.json) of a checkpoint directory."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path does not exist: {path}")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory (a checkpoint is a directory holding {CONFIG_NAME} "
                              f"and {WEIGHTS_NAME})")
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        hint = " (for a diffusers pipeline, pass its unet/ folder)" if os.path.isdir(os.path.join(path, "unet")) else ""
        raise CheckpointError(f"{path}: {CONFIG_NAME} is missing{hint}")
    raw = _read_json(config_path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")

    if FORMAT_KEY in raw:
        if want_diffusers:
            raise CheckpointError(f"{path} is a fastdiff checkpoint, not a diffusers UNet2DModel; use load_checkpoint")
        if raw[FORMAT_KEY] != FORMAT_VERSION:
            raise CheckpointError(f"{config_path}: checkpoint format version {raw[FORMAT_KEY]!r} is not supported "
                                  f"(this fastdiff reads version {FORMAT_VERSION})")
        if not isinstance(raw.get("config"), dict):
            raise CheckpointError(f"{config_path}: the \"config\" entry is missing or not an object")
        try:
            config = UNetConfig.from_dict(raw["config"])
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{config_path}: invalid config: {exc}") from None
        return "fastdiff", config, os.path.join(path, WEIGHTS_NAME), raw

    class_name = raw.get("_class_name")
    if class_name == "UNet2DModel":
        from .diffusers_compat import config_from_diffusers

        try:
            config = config_from_diffusers(raw)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{config_path}: invalid or unsupported diffusers config: {exc}") from None
        weights = os.path.join(path, DIFFUSERS_WEIGHTS_NAME)
        if not os.path.isfile(weights):
            if any(os.path.isfile(os.path.join(path, n)) for n in ("diffusion_pytorch_model.bin", "pytorch_model.bin")):
                raise CheckpointError(f"{path}: only a pickle .bin weights file is present; fastdiff refuses pickle "
                                      f"files (convert to {DIFFUSERS_WEIGHTS_NAME} with save_pretrained("
                                      f"safe_serialization=True))")
        return "diffusers", config, weights, raw
    if class_name is not None:
        raise CheckpointError(f"{config_path}: a diffusers {class_name!r} config; fastdiff loads UNet2DModel only")
    raise CheckpointError(f"{config_path}: neither a fastdiff checkpoint (no \"{FORMAT_KEY}\" marker) nor a "
                          f"diffusers UNet2DModel config (no \"_class_name\")")


def load_config(path) -> UNetConfig:
    """The UNetConfig of a fastdiff checkpoint or diffusers UNet2DModel directory (weights are not read)."""
    return _inspect(path)[1]


def load_metadata(path) -> dict:
    """The extra_metadata stored with a fastdiff checkpoint ({} for a diffusers directory)."""
    kind, _, _, raw = _inspect(path)
    if kind != "fastdiff":
        return {}
    return {k: v for k, v in raw.items() if k not in (FORMAT_KEY, "config")}


def _listed(items) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def check_state_dict_shapes(config: UNetConfig, shapes: dict[str, tuple], source: str) -> None:
    """Raise CheckpointError listing missing keys, unexpected keys and shape mismatches against ``config``."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UNet(config).state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(shapes) if tuple(shapes[k]) != expected[k])
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {_listed(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {_listed(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches: "
                     + _listed(f"{k} is {tuple(shapes[k])} in the weights, {expected[k]} in the config"
                               for k in mismatched))
    raise CheckpointError(f"{source}: weights do not match the config: " + "; ".join(parts))


def unet_from_state_dict(config: UNetConfig, state_dict: dict, source: str = "state dict", dtype=None) -> UNet:
    """A UNet in eval mode holding exactly ``state_dict``'s tensors (checked against ``config`` first)."""
    check_state_dict_shapes(config, {k: tuple(v.shape) for k, v in state_dict.items()}, source)
    bad = sorted(k for k, v in state_dict.items() if not v.is_floating_point())
    if bad:
        raise CheckpointError(f"{source}: non floating-point tensors: {_listed(bad)}")
    if dtype is not None:
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    with torch.device("meta"):
        model = UNet(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def _read_weights(config: UNetConfig, weights: str, device, rename=None) -> dict:
    """The tensors of a safetensors file, keys renamed by ``rename`` (a dict -> dict function), checked against
    ``config`` from the header alone before any tensor is read."""
    from safetensors import safe_open

    if not os.path.isfile(weights):
        raise CheckpointError(f"weights file is missing: {weights}")
    try:
        with safe_open(weights, framework="pt", device=str(torch.device(device))) as f:
            names = {k: k for k in f.keys()}  # fastdiff name -> stored name
            if rename is not None:
                names = rename(names)
            shapes = {new: tuple(f.get_slice(old).get_shape()) for new, old in names.items()}
            check_state_dict_shapes(config, shapes, weights)
            return {new: f.get_tensor(old) for new, old in names.items()}
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors reports header and size errors with its own exception types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{weights}: corrupt or unreadable safetensors file ({reason})") from None


def load_checkpoint(path, device="cpu", dtype: torch.dtype | None = None) -> UNet:
    """A UNet (eval mode) from a fastdiff checkpoint directory or a diffusers UNet2DModel directory.

    ``dtype``: cast the weights (None keeps the stored dtype). Raises CheckpointError on any problem.
    """
    kind, config, weights, _ = _inspect(path)
    if kind == "diffusers":
        return load_diffusers_directory(path, device=device, dtype=dtype)
    state = _read_weights(config, weights, device)
    return unet_from_state_dict(config, state, source=weights, dtype=dtype)


def load_diffusers_directory(path, device="cpu", dtype: torch.dtype | None = None) -> UNet:
    """A UNet from a diffusers UNet2DModel directory (config.json + diffusion_pytorch_model.safetensors)."""
    from .diffusers_compat import state_dict_from_diffusers

    _, config, weights, _ = _inspect(path, want_diffusers=True)
    state = _read_weights(config, weights, device, rename=state_dict_from_diffusers)
    return unet_from_state_dict(config, state, source=weights, dtype=dtype)
