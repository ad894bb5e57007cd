"""Shared benchmark machinery: timing, limits measured in the same run, provenance and report files.

Conventions of every report this package writes:

* A figure that was not measured is ``null`` with a sibling ``<name>_reason`` string. Nothing is estimated.
* Every ratio is computed from numbers stored in the same report (``tests/test_bench.py`` recomputes them).
* Times are medians of repeats after warm-up; raw samples are kept. CUDA timing uses CUDA events around each
  call with the L2 cache flushed before it; CPU timing uses ``time.perf_counter``. Calls rotate over several
  freshly randomised input sets so that small shapes do not run from a warm cache.
"""

from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from fastdiff.devices import resolve_device  # noqa: F401  (re-exported for the bench scripts)
from fastdiff.fileio import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------- small helpers
def experiment_options(parser, batch_size: int, resumable: bool = True) -> None:
    """The options every quality experiment (bench/experiment_*.py) takes: seed, batch size, CPU threads, output
    folder, and for the resumable ones --resume and --no-progress."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=str(REPO_ROOT / "docs"))
    if resumable:
        parser.add_argument("--resume", action="store_true", help="keep the rows already in the output JSON")
        parser.add_argument("--no-progress", action="store_true")


def parse_experiment_args(parser, argv):
    """``parser.parse_args(argv)``, with torch's CPU threads set from --threads."""
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtypes(text: str) -> list[torch.dtype]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in DTYPES]
    if bad or not names:
        raise ValueError(f"--dtypes: unknown dtype(s) {bad or text!r}; choose from {', '.join(DTYPES)}")
    return [DTYPES[n] for n in names]


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{what}: expected positive integers, got {text!r}")
    return values


class cpu_threads:
    """Context manager: torch's CPU thread count set to ``n`` (None: unchanged), restored afterwards."""

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        self.saved = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def default_threads(device: torch.device, quick: bool, requested: int | None) -> int | None:
    """--threads, else 1 for --quick CPU runs (small ops gain nothing from more threads, and on a shared
    machine multi-threaded timings of small ops are erratic), else torch's default (None)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        return requested
    return 1 if quick and device.type == "cpu" else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def put(record: dict, key: str, value, reason: str | None = None) -> None:
    """``record[key] = value``; a missing value (None) must come with ``record[key + '_reason']``."""
    if value is not None and isinstance(value, float) and not math.isfinite(value):
        reason = f"not measured: the computation gave {value}"
        value = None
    record[key] = value
    record.pop(key + "_reason", None)
    if value is None:
        if not reason:
            raise ValueError(f"{key} is not measured but no reason was given")
        record[key + "_reason"] = reason


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is missing or den is zero."""
    if num is None or den is None or den == 0:
        return None
    return num / den


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


# ----------------------------------------------------------------------------------------- optional packages
# Import name -> distribution name of every optional dependency the benchmarks, the GPU check or the tests use.
# The lent GPU image has no diffusers and no xformers; a lean CPU environment may lack any of these.
OPTIONAL_PACKAGES = {"diffusers": "diffusers", "xformers": "xformers", "matplotlib": "matplotlib",
                     "pynvml": "nvidia-ml-py", "xdist": "pytest-xdist", "scipy": "scipy", "PIL": "Pillow",
                     "tqdm": "tqdm", "safetensors": "safetensors"}
CHART_HINT = "pip install fastdiff[bench]"


def missing(module: str) -> str | None:
    """None when ``module`` imports, else "<distribution> missing" (or why it failed to import)."""
    dist = OPTIONAL_PACKAGES.get(module, module)
    try:
        importlib.import_module(module)
    except ImportError:
        return f"{dist} missing"
    except Exception as exc:  # installed but broken (a mismatched torch, say): reported, never raised
        return f"{dist} unusable ({short_error(exc)})"
    return None


def optional_packages() -> dict:
    """{distribution: version, or None with "<distribution>_reason"} for every optional package."""
    out = {}
    for module, dist in OPTIONAL_PACKAGES.items():
        problem = missing(module)
        if problem:
            put(out, dist, None, f"not available: {problem}")
        else:
            put(out, dist, _dist_version(dist, module))
    return out


def _dist_version(dist: str, module: str) -> str:
    try:
        from importlib import metadata

        return metadata.version(dist)
    except Exception:
        return str(getattr(sys.modules.get(module), "__version__", "unknown"))


def chart_problem() -> str | None:
    """Why no PNG chart can be drawn here (matplotlib missing), or None."""
    problem = missing("matplotlib")
    return f"not drawn: {problem} ({CHART_HINT} for the chart)" if problem else None


# ----------------------------------------------------------------------------------------- timing
def cache_bytes(device: torch.device) -> int:
    """Size of the last-level cache the rotation must defeat (GPU L2, CPU L3; 32 MiB if unknown)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20)
    for index in (3, 2):
        path = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size")
        try:
            text = path.read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            return int(text.rstrip("KMG")) * scale
        except ValueError:
            continue
    return 32 * 2**20


def rotation_sets(set_bytes: int, device: torch.device, *, max_sets: int | None = None,
                  budget_bytes: int | None = None) -> int:
    """How many input sets to rotate: enough to hold 4x the last-level cache, 2 to ``max_sets``, within budget.

    On CUDA the L2 cache is also flushed before each timed call, so 8 sets suffice; the CPU has no flush and
    rotates up to 32.
    """
    if max_sets is None:
        max_sets = 8 if device.type == "cuda" else 32
    if budget_bytes is None:
        budget_bytes = (4 if device.type == "cuda" else 1) * 2**30
    want = math.ceil(4 * cache_bytes(device) / max(set_bytes, 1))
    n = max(2, min(max_sets, want))
    while n > 1 and n * set_bytes > budget_bytes:
        n -= 1
    return n


class _L2Flush:
    """A buffer larger than the L2 cache, zeroed before each timed CUDA call (as triton.testing.do_bench)."""

    _buffers: dict = {}

    @classmethod
    def run(cls, device: torch.device) -> None:
        buf = cls._buffers.get(device)
        if buf is None:
            size = max(256 * 2**20, 2 * cache_bytes(device))
            buf = cls._buffers[device] = torch.empty(size, dtype=torch.int8, device=device)
        buf.zero_()


def time_calls(fn, arg_sets: list[tuple], device: torch.device, *, target_s: float = 0.25, min_reps: int = 5,
               max_reps: int = 200, warmup_s: float = 0.05, min_warmup: int = 2) -> dict:
    """Median time of ``fn(*arg_sets[i % len(arg_sets)])`` over repeats, after warm-up.

    The repeat count aims at ``target_s`` of timed calls (within [min_reps, max_reps]), from the warm-up's
    per-call time. Returns ``median_s``, ``samples_s`` (every repeat), ``repeats``, ``warmup_calls``,
    ``input_sets`` and ``timer``.
    """
    k = len(arg_sets)
    calls = 0
    sync(device)
    start = time.perf_counter()
    while calls < min_warmup or (time.perf_counter() - start < warmup_s and calls < 50):
        fn(*arg_sets[calls % k])
        calls += 1
        sync(device)
    per_call = (time.perf_counter() - start) / calls
    reps = int(min(max_reps, max(min_reps, target_s / max(per_call, 1e-7))))
    samples = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            _L2Flush.run(device)
            starts[i].record()
            fn(*arg_sets[i % k])
            ends[i].record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
        timer = "CUDA events per call, L2 flushed before each call"
    else:
        for i in range(reps):
            args = arg_sets[i % k]
            t0 = time.perf_counter()
            fn(*args)
            samples.append(time.perf_counter() - t0)
        timer = "time.perf_counter per call"
    return {"median_s": statistics.median(samples), "samples_s": samples, "repeats": reps,
            "warmup_calls": calls, "input_sets": k, "timer": timer}


def time_run(fn, device: torch.device):
    """(seconds, result) of one long call (a sampling run), synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


# ----------------------------------------------------------------------------------------- limits
def measure_copy_bandwidth(device: torch.device, quick: bool = False, nbytes: int | None = None,
                           target_s: float | None = None) -> dict:
    """Device-to-device (CPU: memory-to-memory) copy bandwidth, counting bytes read plus bytes written.

    ``nbytes``: the buffer size (default: a large buffer, the device's peak). A kernel is compared with the copy
    that moves as many bytes as its floor (``nbytes`` = floor / 2), so launch overhead and cache effects weigh
    the same on both; on CUDA the L2 cache is flushed before each timed call either way.
    """
    if nbytes is None:
        nbytes = (1 * 2**30 if not quick else 256 * 2**20) if device.type == "cuda" else (64 if quick else 128) * 2**20
    nbytes = max(4, nbytes // 4 * 4)
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    timing = time_calls(lambda s, d: d.copy_(s), [(src, dst)], device,
                        target_s=target_s if target_s is not None else (0.2 if quick else 0.5), min_reps=5, max_reps=50)
    moved = 2 * nbytes
    return {"what": "copy of a float32 buffer (dst.copy_(src)), bytes read + bytes written",
            "buffer_bytes": nbytes, "bytes_moved": moved, **timing, "gbps": moved / timing["median_s"] / 1e9}


def measure_matmul(device: torch.device, dtype: torch.dtype, quick: bool = False) -> dict:
    """Rate of a large square matrix product on random data (TFLOP/s, 2 n^3 flops)."""
    if device.type == "cuda":
        n = 4096 if quick else 8192
    else:
        n = 512 if quick else 1024
        if dtype != torch.float32:
            return {"n": n, "dtype": dtype_name(dtype), "tflops": None,
                    "tflops_reason": "not measured: the CPU runs use float32 only"}
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = time_calls(torch.matmul, [(a, b)], device, target_s=0.2 if quick else 0.5, min_reps=3, max_reps=50)
    flops = 2 * n**3
    out = {"what": f"torch.matmul of two random {n}x{n} {dtype_name(dtype)} matrices", "n": n,
           "dtype": dtype_name(dtype), "flops": flops, **timing, "tflops": flops / timing["median_s"] / 1e12}
    if device.type == "cuda" and dtype == torch.float32:
        out["allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return out


# ----------------------------------------------------------------------------------------- NVML
class GpuMonitor:
    """Power, energy and clocks of the GPU behind a torch device, through nvidia-ml-py.

    ``problem`` says why nothing can be measured (no GPU, no library, no driver); then every reading is None.
    """

    def __init__(self, device: torch.device):
        self.handle = None
        self.nvml = None
        self.problem = None
        if device.type != "cuda":
            self.problem = "not measured: no NVIDIA GPU (CPU run)"
            return
        problem = missing("pynvml")
        if problem:
            self.problem = f"not measured: {problem}"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # no driver: recorded, never fatal
            self.problem = f"not measured: nvidia-ml-py unavailable ({short_error(exc)})"
            return
        self.nvml = pynvml
        try:
            props = torch.cuda.get_device_properties(device)
            bus = getattr(props, "pci_bus_id", None)
            if bus is not None:
                domain, dev = getattr(props, "pci_domain_id", 0), getattr(props, "pci_device_id", 0)
                bus_id = f"{domain:08x}:{bus:02x}:{dev:02x}.0"
                self.handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
        except Exception:
            self.handle = None
        if self.handle is None:
            try:
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            except Exception as exc:
                self.problem = f"not measured: NVML has no handle for {device} ({short_error(exc)})"
        self._samples: list = []
        self._stop = threading.Event()

    def _try(self, name, *args):
        try:
            return getattr(self.nvml, name)(self.handle, *args)
        except Exception:
            return None

    def info(self) -> dict:
        if self.problem:
            return {"measured": False, "reason": self.problem}
        n = self.nvml
        name = self._try("nvmlDeviceGetName")
        try:
            driver = n.nvmlSystemGetDriverVersion()
        except Exception:
            driver = None
        power_limit = self._try("nvmlDeviceGetEnforcedPowerLimit")
        return {"measured": True, "name": name.decode() if isinstance(name, bytes) else name,
                "driver": driver.decode() if isinstance(driver, bytes) else driver,
                "sm_clock_max_mhz": self._try("nvmlDeviceGetMaxClockInfo", n.NVML_CLOCK_SM),
                "mem_clock_max_mhz": self._try("nvmlDeviceGetMaxClockInfo", n.NVML_CLOCK_MEM),
                "power_limit_w": power_limit / 1e3 if power_limit else None}

    def _sample_loop(self):
        n = self.nvml
        while not self._stop.is_set():
            self._samples.append((self._try("nvmlDeviceGetPowerUsage"),
                                  self._try("nvmlDeviceGetClockInfo", n.NVML_CLOCK_SM),
                                  self._try("nvmlDeviceGetClockInfo", n.NVML_CLOCK_MEM)))
            self._stop.wait(0.02)

    def begin(self) -> None:
        if self.problem:
            return
        self._samples = []
        self._stop.clear()
        self._energy0 = self._try("nvmlDeviceGetTotalEnergyConsumption")
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._sample_loop, daemon=True)
        self._thread.start()

    def end(self) -> dict:
        """Readings over the window since ``begin``: energy (counter), average power, mean clocks."""
        keys = ("energy_j", "avg_power_w", "sm_clock_mhz", "mem_clock_mhz")
        if self.problem:
            return {k: None for k in keys} | {k + "_reason": self.problem for k in keys}
        energy1 = self._try("nvmlDeviceGetTotalEnergyConsumption")
        window = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        out = {"window_s": window, "nvml_samples": len(self._samples)}
        energy = (energy1 - self._energy0) / 1e3 if energy1 is not None and self._energy0 is not None else None
        put(out, "energy_j", energy, "not measured: NVML has no total-energy counter for this GPU")
        put(out, "avg_power_w", ratio(energy, window), "not measured: no energy reading")
        for i, key in ((1, "sm_clock_mhz"), (2, "mem_clock_mhz")):
            vals = [s[i] for s in self._samples if s[i] is not None]
            put(out, key, statistics.mean(vals) if vals else None, "not measured: NVML returned no clock samples")
        return out


# ----------------------------------------------------------------------------------------- provenance
def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as exc:  # absent optional package: recorded, not an error
        return f"not installed ({type(exc).__name__})"
    return str(getattr(mod, "__version__", "unknown"))


def git_commit() -> dict:
    """fastdiff's commit (``git rev-parse HEAD``) and whether tracked files differ from it; read-only."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # never write the index
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, env=env)
        if head.returncode != 0:
            return {"commit": "unknown", "dirty": None, "dirty_reason": "not a git checkout"}
        status = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, env=env)
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError) as exc:
        return {"commit": "unknown", "dirty": None, "dirty_reason": f"git failed: {short_error(exc)}"}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def provenance(device: torch.device, argv: list[str] | None, command: str) -> dict:
    """Where and with what a report was measured."""
    import fastdiff

    info = {
        "command": command,
        "argv": list(sys.argv if argv is None else argv),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "xformers": _version("xformers"),
        "diffusers": _version("diffusers"),
        "fastdiff": fastdiff.__version__,
        **{f"fastdiff_{k}": v for k, v in git_commit().items()},
        "optional_packages": optional_packages(),
        "env": {k: os.environ[k] for k in ("TRITON_INTERPRET", "FASTDIFF_BACKEND", "CUDA_VISIBLE_DEVICES")
                if k in os.environ},
    }
    if info["cuda"] is None:
        info["cuda_reason"] = "this torch build has no CUDA"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_multiprocessors=props.multi_processor_count,
                    gpu_l2_bytes=getattr(props, "L2_cache_size", None), gpu_capability=f"{props.major}.{props.minor}")
        nvml = GpuMonitor(device).info()
        info["driver"] = nvml.get("driver")
        if info["driver"] is None:
            info["driver_reason"] = nvml.get("reason", "not measured: NVML gave no driver version")
        info["nvml"] = nvml
    else:
        info["gpu"] = None
        info["gpu_reason"] = "CPU run: no GPU used"
        info["driver"] = None
        info["driver_reason"] = "CPU run: no GPU driver used"
    return info


# ----------------------------------------------------------------------------------------- report files
def default_out_dir(device: torch.device) -> Path:
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return REPO_ROOT / "bench" / "results" / f"{device.type}-{today}"


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place (no half-written reports)."""
    text = json.dumps(obj, indent=1, allow_nan=False) + "\n"  # raises before anything is written
    write_text_atomic(path, text)


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def fmt(value, spec: str = ".3g", missing: str = "n/m") -> str:
    """A number for a table; missing figures print as ``n/m`` (not measured)."""
    if value is None:
        return missing
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance_markdown(prov: dict) -> str:
    where = prov["gpu"] if prov.get("gpu") else f"CPU: {prov['cpu']} ({prov['cpu_threads']} threads)"
    driver = f", driver {prov['driver']}" if prov.get("driver") else ""
    return (f"Measured on **{where}**{driver}; torch {prov['torch']} (CUDA {prov['cuda']}), Triton {prov['triton']}, "
            f"diffusers {prov['diffusers']}, xformers {prov['xformers']}; fastdiff {prov['fastdiff']} at commit "
            f"`{prov['fastdiff_commit'][:12]}`{' (modified tree)' if prov.get('fastdiff_dirty') else ''}; "
            f"{prov['date_utc']} on host `{prov['host']}`.\n\nCommand: `{prov['command']}`")


def save_png(fig, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plain_log_axis(axis, formatter=None, subs=(1.0, 2.0, 3.0, 5.0, 7.0)) -> None:
    """Log-scale ticks at ``subs`` x 10^k labelled as plain numbers (or with ``formatter``), no minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(formatter or FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt
