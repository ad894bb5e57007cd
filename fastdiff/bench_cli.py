"""``fastdiff bench kernels ...`` / ``fastdiff bench sampling ...``: dispatch to the repository's ``bench/``.

The benchmarks live in ``bench/`` beside ``fastdiff/`` in the source tree and are not installed with the
package, so this module finds that folder next to the package it was imported from.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import os
import sys

COMMANDS = {"kernels": "fused ops vs torch eager and torch.compile",
            "sampling": "end-to-end sampling vs diffusers and torch.compile"}
USAGE = ("usage: fastdiff bench {kernels,sampling} [options]   (fastdiff bench kernels --help for the options)\n"
         + "\n".join(f"  {name:<9} {text}" for name, text in COMMANDS.items()))


def bench_dir() -> str:
    """The source tree's ``bench/`` folder (beside the ``fastdiff`` package)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def load_bench_package():
    """Import the repository's ``bench`` package; FileNotFoundError when fastdiff was installed without it."""
    folder = bench_dir()
    init = os.path.join(folder, "__init__.py")
    loaded = sys.modules.get("bench")
    if loaded is not None and os.path.abspath(os.path.dirname(getattr(loaded, "__file__", "") or "")) == folder:
        return loaded
    if not os.path.isfile(init):
        raise FileNotFoundError(
            f"the benchmarks are not installed: {folder} does not exist. They live in the source repository; "
            f"run them from a checkout (pip install -e . or PYTHONPATH=<checkout>)")
    spec = importlib.util.spec_from_file_location("bench", init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise ValueError(f"unknown bench command {command!r}; choose kernels or sampling")
    load_bench_package()
    module = importlib.import_module(f"bench.{command}")
    return int(module.main(with_default_out(rest)) or 0)


def with_default_out(rest: list[str]) -> list[str]:
    """Without --out, results go to ./bench-results/<device>-<date>/ under the current folder, not the source tree."""
    if any(a in ("-h", "--help", "--out") or a.startswith("--out=") for a in rest):
        return rest
    device = next((v for a, v in zip(rest, rest[1:]) if a == "--device"),
                  next((a.split("=", 1)[1] for a in rest if a.startswith("--device=")), "auto"))
    try:
        from .devices import resolve_device

        kind = resolve_device(device).type
    except (ValueError, RuntimeError):  # the benchmark reports a bad --device itself
        return rest
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return [*rest, "--out", os.path.join(os.getcwd(), "bench-results", f"{kind}-{today}")]


if __name__ == "__main__":
    sys.exit(main())
