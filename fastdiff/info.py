"""``fastdiff info``: versions, devices and which accelerated backends are available here."""

from __future__ import annotations

import platform

import torch

from . import __version__


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as exc:  # reported, never raised
        return f"not available ({type(exc).__name__})"
    return getattr(mod, "__version__", "unknown")


# Optional packages (import name -> distribution): what each adds, reported present or missing, never required.
OPTIONAL_PACKAGES = {
    "diffusers": ("diffusers", "the diffusers peer, scheduler and UNet equality tests"),
    "xformers": ("xformers", "the xformers attention backend"),
    "matplotlib": ("matplotlib", "benchmark charts (pip install fastdiff[bench])"),
    "pynvml": ("nvidia-ml-py", "GPU power, energy and clocks in the benchmarks"),
    "xdist": ("pytest-xdist", "parallel tests (-n)"),
    "scipy": ("scipy", "statistical noise tests, FID"),
}


def optional_packages() -> dict:
    """{distribution: version, or "missing (<what it adds>)"}; an installed but broken package says why."""
    from importlib import metadata
    from importlib.util import find_spec

    out = {}
    for module, (dist, adds) in OPTIONAL_PACKAGES.items():
        try:
            found = find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out[dist] = f"missing ({adds})"
            continue
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "installed (version unknown)"
    return out


def gpu_details() -> list[dict]:
    """Name, driver, memory and clocks per GPU through nvidia-ml-py; [] without an NVIDIA GPU or the library."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver: nothing to report
        return []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        rows = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            rows.append({
                "index": i,
                "name": pynvml.nvmlDeviceGetName(h),
                "driver": driver,
                "memory_gib": round(mem.total / 2**30, 1),
                "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                "mem_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM),
            })
        return rows
    finally:
        pynvml.nvmlShutdown()


def collect_info() -> dict:
    from .attention import availability, chosen_backends
    from .ops.backend import fallback_counts, interpreter_enabled, triton_import_error

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    triton_problem = triton_import_error()
    if triton_problem:
        triton_status = triton_problem
    elif cuda:
        triton_status = "available (CUDA)"
    elif interpreter_enabled():
        triton_status = "interpreter only (TRITON_INTERPRET=1, CPU)"
    else:
        triton_status = "installed; no CUDA GPU, so the auto backend uses the reference ops"
    attention = {f"attention {k}": v for k, v in availability(device).items()}
    xformers_version = _version("xformers")
    if xformers_version.startswith("not available"):  # one reason, not "not available" here and "needs CUDA" there
        attention["attention xformers"] = f"xformers {xformers_version}"
    return {
        "fastdiff": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "xformers": xformers_version,
        "diffusers": _version("diffusers"),
        "optional": optional_packages(),
        "cuda_available": cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else ["cpu"],
        "gpus": gpu_details(),
        "backends": {
            "triton kernels": triton_status,
            **attention,
        },
        "auto_choices": chosen_backends(),
        "fallbacks": {f"{op}: {why}": n for (op, why), n in fallback_counts().items()},
    }


def format_info(info: dict) -> str:
    lines = []
    for key in ("fastdiff", "python", "platform", "torch", "torch_cuda", "triton", "xformers", "diffusers"):
        lines.append(f"{key:<12} {info[key]}")
    lines.append(f"{'devices':<12} {', '.join(info['devices'])}")
    for gpu in info["gpus"]:
        lines.append(f"{'gpu ' + str(gpu['index']):<12} {gpu['name']}, driver {gpu['driver']}, "
                     f"{gpu['memory_gib']} GiB, SM {gpu['sm_clock_max_mhz']} MHz max")
    lines.append("optional packages:")
    for name, status in info["optional"].items():
        lines.append(f"  {name:<22} {status}")
    lines.append("backends:")
    for name, status in info["backends"].items():
        lines.append(f"  {name:<22} {status}")
    return "\n".join(lines)
