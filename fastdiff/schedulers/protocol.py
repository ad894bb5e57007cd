"""The parts of diffusers' scheduler protocol that are not the algorithm: config, output, loading and saving.

fastdiff's schedulers are built, configured, saved and loaded the way diffusers' are (``Cls(**kwargs)``,
``Cls.from_config(config)``, ``.config``, ``save_pretrained`` / ``from_pretrained`` of a local folder), so
``pipe.scheduler = fastdiff.DDIMScheduler.from_config(pipe.scheduler.config)`` works, and a fastdiff config
loads back into diffusers. No diffusers import: the rules of ``ConfigMixin.from_config`` are written here.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
from collections.abc import Mapping

import torch

from fastdiff.fileio import atomic_write_text

log = logging.getLogger("fastdiff.schedulers")

CONFIG_NAME = "scheduler_config.json"  # diffusers' file name inside a pipeline's scheduler/ folder


class SchedulerConfig(dict):
    """A read-only dict with attribute access (``config.num_train_timesteps``), like diffusers' FrozenDict.

    A dict subclass, so diffusers' ``from_config`` takes it as a config; change settings by building a new
    scheduler: ``Cls.from_config(config, prediction_type="v_prediction")``.
    """

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no entry {name!r}") from None

    def _read_only(self, *args, **kwargs):
        raise TypeError("a scheduler config is read-only; build a new scheduler with from_config(config, key=value)")

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = __ior__ = _read_only
    update = pop = popitem = setdefault = clear = _read_only

    def __reduce__(self):  # copy, deepcopy and pickle rebuild it from a plain dict
        return (type(self), (dict(self),))


@dataclasses.dataclass
class SchedulerOutput:
    """What ``step`` returns: diffusers' DDPMSchedulerOutput / DDIMSchedulerOutput fields.

    ``out.prev_sample``, ``out["prev_sample"]``, ``out[0]`` and ``out.to_tuple()`` all work, as on diffusers'
    BaseOutput.
    """

    prev_sample: torch.Tensor  # x_{t'}
    pred_original_sample: torch.Tensor  # the predicted (clipped) x_0

    def to_tuple(self) -> tuple:
        return (self.prev_sample, self.pred_original_sample)

    def keys(self):
        return [f.name for f in dataclasses.fields(self)]

    def values(self):
        return list(self.to_tuple())

    def items(self):
        return list(zip(self.keys(), self.values()))

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]


class ConfigProtocol:
    """diffusers' ConfigMixin behaviour for a scheduler whose ``__init__`` takes diffusers' keyword arguments.

    Subclasses set ``self.config`` (a SchedulerConfig) in ``__init__``; every positional-or-keyword parameter of
    ``__init__`` is a config key, keyword-only ones (``backend``) are fastdiff's own and never stored.
    """

    config_name = CONFIG_NAME
    _registry: list = []  # every scheduler class, for the keys of "compatible" configs (see from_config)
    diffusers_class_name: str  # the diffusers class this one stands in for
    num_inference_steps: int | None = None  # set by set_timesteps
    order = 1  # model evaluations per step (diffusers' attribute)

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @classmethod
    def _init_keys(cls) -> list[str]:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        return [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]

    @property
    def compatibles(self) -> list[type]:
        """The fastdiff scheduler classes that can be built from this config (diffusers' ``compatibles``)."""
        return [c for c in ConfigProtocol._registry if c is not type(self)]

    @staticmethod
    def _reject_public_kwargs(cls_name: str, extra: dict) -> None:
        """diffusers' ``__init__`` drops private keys ("_class_name", ...) and rejects any other unknown one."""
        public = sorted(k for k in extra if not k.startswith("_"))
        if public:
            raise TypeError(f"{cls_name}.__init__() got an unexpected keyword argument {public[0]!r}")

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """Build from a config dict (a plain dict, a fastdiff or a diffusers scheduler's ``.config``).

        As diffusers: ``kwargs`` override config values; keys listed in ``_use_default_values`` take this class's
        defaults; private keys and keys of the other scheduler classes are dropped quietly, other unknown keys
        with a warning; keys not used by ``__init__`` stay in the new ``.config``, so a round trip through
        another class keeps them. ``return_unused_kwargs=True`` returns ``(scheduler, unused)``.
        """
        if config is None:
            raise ValueError(f"{cls.__name__}.from_config: pass a config dict as the first argument")
        if not isinstance(config, Mapping):
            raise TypeError(f"{cls.__name__}.from_config expects a config dict, got {type(config).__name__}; "
                            "for a folder use from_pretrained")
        defaulted = set(config.get("_use_default_values", ()))
        given = {k: v for k, v in config.items() if k not in defaulted and k != "_use_default_values"}
        expected = cls._init_keys()
        siblings = {k for c in ConfigProtocol._registry for k in c._init_keys()} - set(expected)
        remaining = {k: v for k, v in given.items() if not k.startswith("_") and k not in siblings}
        init = {}
        for key in expected:
            if key in kwargs:
                init[key] = kwargs.pop(key)
                remaining.pop(key, None)
            elif key in remaining:
                init[key] = remaining.pop(key)
        if "backend" in kwargs:
            init["backend"] = kwargs.pop("backend")
        if remaining:
            log.warning("The config attributes %s were passed to %s, but are not expected and will be ignored.",
                        remaining, cls.__name__)
        scheduler = cls(**init)
        hidden = {k: v for k, v in given.items() if k not in init}
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.__name__
        if hidden:
            scheduler.config = SchedulerConfig({**scheduler.config, **hidden})
        if return_unused_kwargs:
            return scheduler, {**remaining, **kwargs, **hidden}
        return scheduler

    def save_config(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """Write ``scheduler_config.json`` into ``save_directory`` (diffusers reads it back with from_pretrained)."""
        if push_to_hub:
            raise ValueError("fastdiff does not upload to the Hub; save locally and push with huggingface_hub")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_config: {save_directory} is a file; pass a folder")
        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, self.config_name), self.to_json_string())

    save_pretrained = save_config

    def to_json_string(self) -> str:
        from fastdiff import __version__

        data = {"_class_name": type(self).__name__, **self.config, "_fastdiff_version": __version__}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None,
                        return_unused_kwargs: bool = False, **kwargs):
        """Load ``scheduler_config.json`` from a local folder (``subfolder="scheduler"`` for a pipeline folder).

        Hub ids are not fetched: download with ``huggingface_hub.snapshot_download`` first, or load diffusers'
        scheduler and pass its ``.config`` to ``from_config``.
        """
        path = os.fspath(pretrained_model_name_or_path)
        if subfolder:
            path = os.path.join(path, subfolder)
        file = path if os.path.isfile(path) else os.path.join(path, cls.config_name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{cls.__name__}.from_pretrained: no {cls.config_name} at {path} (fastdiff reads "
                                    "local folders; download a Hub repository with huggingface_hub first)")
        try:
            with open(file) as f:
                config = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{file} is not valid JSON: {exc}") from None
        hub_options = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision",
                       "output_loading_info", "return_commit_hash")
        for name in hub_options:  # diffusers' download options mean nothing for a local folder
            kwargs.pop(name, None)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_diffusers_config(cls, config: dict, backend=None):
        """``from_config(config, backend=backend)``: build from a diffusers scheduler config dict."""
        return cls.from_config(config, backend=backend)

    def to_diffusers_config(self) -> dict:
        """This configuration as a plain diffusers scheduler config dict (``_class_name`` included)."""
        return {**self.config, "_class_name": self.diffusers_class_name}

    def __repr__(self) -> str:
        steps = f", {self.num_inference_steps} steps" if self.num_inference_steps else ""
        return f"{type(self).__name__}({dict(self.config)}{steps})"
