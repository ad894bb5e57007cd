"""The benchmark harness: `fastdiff bench kernels|sampling --device cpu --quick` write valid, self-consistent reports.

Every ratio in a report is recomputed here from the numbers measured in that run, every figure that was not
measured must be null with a reason, and the byte floors and FLOP counts are recomputed independently.
"""

import json
import math
import statistics
import struct
import sys
import time

import pytest
import torch

from fastdiff import cli
from fastdiff.bench_cli import load_bench_package

load_bench_package()  # the checkout's bench/ folder, as `fastdiff bench` finds it

from bench import common, gpu_check  # noqa: E402

PROVENANCE_KEYS = ("command", "argv", "date_utc", "host", "platform", "python", "cpu", "cpu_threads", "device",
                   "torch", "cuda", "triton", "xformers", "diffusers", "fastdiff", "fastdiff_commit", "gpu", "driver")


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def nulls_without_reason(obj, path="") -> list[str]:
    """Paths of null figures that lack a sibling '<key>_reason' string (model configs echoed as given are exempt)."""
    bad = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "diffusers_config":
                continue
            if value is None and not (isinstance(obj.get(f"{key}_reason"), str) and obj[f"{key}_reason"]):
                bad.append(f"{path}.{key}")
            bad += nulls_without_reason(value, f"{path}.{key}")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            bad += nulls_without_reason(value, f"{path}[{i}]")
    return bad


def check_common(report: dict, out, stem: str) -> None:
    assert nulls_without_reason(report) == []
    prov = report["provenance"]
    for key in PROVENANCE_KEYS:
        assert key in prov, f"provenance lacks {key}"
    assert prov["gpu"] is None and "CPU" in prov["gpu_reason"]
    assert prov["device"] == "cpu" and report["settings"]["device"] == "cpu"
    assert prov["fastdiff_commit"] == "unknown" or len(prov["fastdiff_commit"]) == 40
    copy = report["limits"]["copy"]
    assert copy["median_s"] == statistics.median(copy["samples_s"])
    assert close(copy["gbps"], copy["bytes_moved"] / copy["median_s"] / 1e9)
    assert copy["bytes_moved"] == 2 * copy["buffer_bytes"]
    md = (out / f"{stem}.md").read_text()
    assert "CPU" in md.splitlines()[0] and "|---|" in md
    packages = {k for k in prov["optional_packages"] if not k.endswith("_reason")}
    assert packages == set(common.OPTIONAL_PACKAGES.values())
    if common.missing("matplotlib"):  # no chart, and the report says how to get one
        assert report["chart"] is None and "pip install fastdiff[bench]" in report["chart_reason"]
        assert not (out / f"{stem}.png").exists()
        return
    assert report["chart"] == f"{stem}.png"
    png = (out / f"{stem}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 100 and height > 100


def expected_floor(op: str, shape, elem: int) -> dict:
    n, c, h, w = shape
    numel = n * c * h * w
    if op.startswith("group_norm"):
        b = 2 * numel * elem + 2 * c * elem + (n * c * elem if op == "group_norm_temb_silu" else 0)
        return {"fastdiff": b, "eager": b, "compile": b}
    if op == "ddpm_step":  # the peers read a noise tensor; fastdiff draws its noise in the kernel
        return {"fastdiff": 3 * numel * elem, "eager": 4 * numel * elem, "compile": 4 * numel * elem}
    if op == "dpm_step":  # x, model output, previous data prediction read; x_{t-1} and the new one written
        return {k: 5 * numel * elem for k in ("fastdiff", "eager", "compile")}
    return {k: 3 * numel * elem for k in ("fastdiff", "eager", "compile")}


@pytest.mark.slow
def test_bench_kernels_cpu_quick(tmp_path):
    assert cli.main(["bench", "kernels", "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "kernels.json").read_text())
    assert report["schema"] == "fastdiff-bench-kernels/1"
    check_common(report, tmp_path, "kernels")
    copy_gbps = report["limits"]["copy"]["gbps"]
    cases = report["cases"]
    assert {c["op"] for c in cases} == {"group_norm_silu", "group_norm_temb_silu", "group_norm", "ddpm_step",
                                        "ddim_step", "dpm_step"}
    steps = [c["op"] in ("ddpm_step", "ddim_step", "dpm_step") for c in cases]
    assert steps == sorted(steps, reverse=True), "update steps run before group norms"
    compiled = 0
    for c in cases:
        assert c["dtype"] in ("float32", "float16", "bfloat16") and c["layout"] in ("nchw", "channels_last")
        assert c["input_sets"] >= 2, "inputs must rotate over several sets"
        floors = expected_floor(c["op"], c["shape"], c["elem_bytes"])
        impls = c["impls"]
        assert set(impls) == {"fastdiff", "eager", "compile"}
        # no CUDA: the Triton kernel is not timed, and says why
        assert impls["fastdiff"]["median_s"] is None and "CUDA" in impls["fastdiff"]["median_s_reason"]
        assert impls["eager"]["status"] == "ok"
        for name, r in impls.items():
            assert r["floor_bytes"] == floors[name]
            if r["median_s"] is None:
                assert r["gbps"] is None and r["fraction_of_copy"] is None
                continue
            compiled += name == "compile"
            assert len(r["samples_s"]) == r["repeats"] >= 5 and min(r["samples_s"]) > 0
            assert r["median_s"] == statistics.median(r["samples_s"])
            assert close(r["gbps"], r["floor_bytes"] / r["median_s"] / 1e9)
            same = r["copy_same_bytes"]  # the copy moving the same bytes, timed in this run
            assert abs(same["bytes_moved"] - r["floor_bytes"]) <= 8 and same["bytes_moved"] == 2 * same["buffer_bytes"]
            assert close(same["gbps"], same["bytes_moved"] / same["median_s"] / 1e9)
            assert close(r["fraction_of_copy"], r["gbps"] / same["gbps"])
            assert close(r["fraction_of_peak_copy"], r["gbps"] / copy_gbps)
            assert r["rel_error_vs_reference"] <= r["tolerance"], f"{c['op']} {name} computes something else"
        med = {k: v["median_s"] for k, v in impls.items()}
        for key, num, den in (("speedup_vs_eager", "eager", "fastdiff"), ("speedup_vs_compile", "compile", "fastdiff"),
                              ("compile_speedup_vs_eager", "eager", "compile")):
            if med[num] is None or med[den] is None:
                assert c[key] is None
            else:
                assert close(c[key], med[num] / med[den])
    assert compiled >= 1 or all("compile" in c["impls"]["compile"]["median_s_reason"] for c in cases)
    headlines = gpu_check.kernel_headlines(tmp_path / "kernels.json")
    assert headlines["cases"] == len(cases) and headlines["ddpm_step"]["median_speedup_vs_eager"] is None
    assert headlines["ddpm_step"]["large_cases"] == []  # the quick preset's cases are small


@pytest.mark.slow
def test_bench_sampling_cpu_quick(tmp_path):
    from fastdiff.shapes import flops_per_image
    from fastdiff.unet import UNetConfig

    from bench.sampling import MODEL_CONFIGS

    assert cli.main(["bench", "sampling", "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "sampling.json").read_text())
    assert report["schema"] == "fastdiff-bench-sampling/1"
    check_common(report, tmp_path, "sampling")
    matmul = report["limits"]["matmul"]
    assert matmul["median_s"] == statistics.median(matmul["samples_s"])
    assert close(matmul["tflops"], 2 * matmul["n"] ** 3 / matmul["median_s"] / 1e12)
    assert report["gpu"]["measured"] is False
    no_diffusers = common.missing("diffusers")  # the peer is then "not measured: diffusers missing"
    for name, m in report["models"].items():
        cfg = UNetConfig.from_diffusers_config(MODEL_CONFIGS[name])
        assert m["flops"]["fastdiff"] == flops_per_image(cfg) > 0
        if no_diffusers:
            assert m["params_diffusers"] is None and "diffusers missing" in m["params_diffusers_reason"]
            continue
        assert m["flops"]["diffusers"] == m["flops"]["fastdiff"], "the two UNets must be the same network"
        assert m["params"] == m["params_diffusers"] > 0
    runs = report["runs"]
    modes = {r["mode"] for r in runs}
    assert modes == {"reference", "triton", "triton+graphs", "diffusers", "compile", "pipeline", "pipeline+accelerate"}
    groups = {}
    for r in runs:
        groups.setdefault((r["model"], r["scheduler"], r["steps"], r["batch"]), {})[r["mode"]] = r
    for (model, sched, steps, batch), by_mode in groups.items():
        assert by_mode["reference"]["status"] == "ok", by_mode["reference"].get("reason")
        for mode in ("diffusers", "pipeline", "pipeline+accelerate"):
            if no_diffusers:
                assert by_mode[mode]["median_s"] is None
                assert by_mode[mode]["reason"] == "not measured: diffusers missing"
            else:
                assert by_mode[mode]["status"] == "ok", by_mode[mode].get("reason")
        for mode in ("triton", "triton+graphs"):
            assert by_mode[mode]["median_s"] is None and "CUDA" in by_mode[mode]["median_s_reason"]
        for mode, r in by_mode.items():
            for key in ("speedup_vs_diffusers", "speedup_vs_reference", "speedup_vs_compile"):
                peer = by_mode[key.removeprefix("speedup_vs_")]
                if r["median_s"] is None or peer["median_s"] is None:
                    assert r[key] is None
                else:
                    assert close(r[key], peer["median_s"] / r["median_s"])
            if r["median_s"] is None:
                assert r["images_per_s"] is None and r["tflops"] is None and r["energy_per_image_j"] is None
                continue
            assert len(r["samples_s"]) == r["repeats"] >= 1 and r["median_s"] == statistics.median(r["samples_s"])
            assert close(r["images_per_s"], batch / r["median_s"])
            assert close(r["step_latency_s"], r["median_s"] / steps)
            flops = report["models"][model]["flops"]["diffusers" if mode in ("diffusers", "pipeline",
                                                                            "pipeline+accelerate") else "fastdiff"]
            assert r["flops_per_image_step"] == flops
            assert close(r["tflops"], flops * batch * steps / r["median_s"] / 1e12)
            assert close(r["fraction_of_matmul"], r["tflops"] / matmul["tflops"])
            # not measurable on the CPU: null with a reason (checked by nulls_without_reason above)
            assert r["peak_memory_bytes"] is None and r["energy_per_image_j"] is None and r["avg_power_w"] is None
        # same weights, same input: diffusers' UNet computes what fastdiff's reference UNet computes
        assert by_mode["reference"]["forward_rel_error_vs_reference"] == 0.0
        if not no_diffusers:
            assert by_mode["diffusers"]["forward_rel_error_vs_reference"] < 1e-5
            # the accelerated pipeline's UNet (patched in place onto fastdiff's ops) computes the same network
            assert by_mode["pipeline+accelerate"]["forward_rel_error_vs_reference"] < 1e-5
            assert "ResnetBlock2D on fastdiff" in by_mode["pipeline+accelerate"]["accelerate"]
    if not no_diffusers:  # the Stable-Diffusion-shaped rows (tiny on the CPU) need diffusers and transformers
        sd = report["stable_diffusion"]
        assert sd["config"] == "tiny" and {(r["what"], r["mode"]) for r in sd["runs"]} == {
            (w, m) for w in ("step", "decode") for m in ("diffusers", "diffusers+accelerate", "compile")}
        for r in sd["runs"]:
            if r["mode"] == "compile":
                assert r["status"] == "skipped"
                continue
            assert r["status"] == "ok" and r["median_s"] > 0, r
            assert r["rel_error_vs_diffusers"] < 1e-5, r  # the accelerated UNet step and VAE decode equal diffusers'
    headlines = gpu_check.sampling_headlines(tmp_path / "sampling.json")
    assert len(headlines) == len(groups)


# ----------------------------------------------------------------------------------------- helpers and errors
def test_put_requires_a_reason_for_missing_figures():
    rec = {}
    common.put(rec, "gbps", None, "not measured: no CUDA")
    assert rec == {"gbps": None, "gbps_reason": "not measured: no CUDA"}
    common.put(rec, "gbps", 2.5)
    assert rec == {"gbps": 2.5}, "a stale reason must go once the figure is measured"
    with pytest.raises(ValueError, match="no reason"):
        common.put(rec, "tflops", None)
    common.put(rec, "ratio", float("nan"))
    assert rec["ratio"] is None and "nan" in rec["ratio_reason"]
    assert common.ratio(3.0, 2.0) == 1.5 and common.ratio(None, 2.0) is None and common.ratio(1.0, 0.0) is None


def test_json_is_written_atomically_and_rejects_nan(tmp_path):
    path = tmp_path / "r.json"
    common.write_json_atomic(path, {"a": 1.5})
    with pytest.raises(ValueError):
        common.write_json_atomic(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1.5}, "a failed write must leave the previous report intact"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"], "no temporary file may be left behind"


def test_time_calls_rotates_inputs_and_reports_the_median():
    seen = []
    sets = [(torch.randn(8),) for _ in range(3)]
    timing = common.time_calls(lambda x: seen.append(id(x)), sets, torch.device("cpu"), target_s=0.001,
                               min_reps=7, max_reps=7)
    assert timing["repeats"] == 7 == len(timing["samples_s"]) and timing["input_sets"] == 3
    assert timing["median_s"] == statistics.median(timing["samples_s"])
    assert len(set(seen[-7:])) == 3, "timed calls must cycle through every input set"


def test_timings_are_measured_known_durations():
    """The timing path measures: callables that sleep a known time are reported at least that long (sleep never
    returns early) and not far above it, in the ratio of their durations. A constant would fail one or the other."""
    cpu = torch.device("cpu")

    def nap(seconds):
        time.sleep(seconds)

    short = common.time_calls(nap, [(0.01,)], cpu, target_s=0.0, min_reps=5, max_reps=5, warmup_s=0.0)
    long = common.time_calls(nap, [(0.04,)], cpu, target_s=0.0, min_reps=5, max_reps=5, warmup_s=0.0)
    assert all(s >= 0.01 for s in short["samples_s"]) and all(s >= 0.04 for s in long["samples_s"])
    # the medians: up to 25 ms late (a busy machine), which still keeps 10 ms and 40 ms apart
    assert short["median_s"] < 0.035 and long["median_s"] < 0.065, (short["median_s"], long["median_s"])
    seconds, out = common.time_run(lambda: nap(0.03) or "done", cpu)
    assert out == "done" and 0.03 <= seconds < 0.3, seconds


def test_bench_cli_errors(monkeypatch, tmp_path, capsys):
    from fastdiff import bench_cli

    assert cli.main(["bench", "nonsense"]) == 2
    assert "unknown bench command" in capsys.readouterr().err
    assert cli.main(["bench", "kernels", "--device", "cpu", "--dtypes", "float64"]) == 2
    assert "--dtypes" in capsys.readouterr().err
    monkeypatch.setattr(bench_cli, "bench_dir", lambda: str(tmp_path / "missing"))
    monkeypatch.delitem(sys.modules, "bench", raising=False)
    with pytest.raises(FileNotFoundError, match="benchmarks are not installed"):
        bench_cli.load_bench_package()


def test_bench_cuda_without_gpu_is_a_one_line_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    assert cli.main(["bench", "sampling", "--device", "cuda", "--quick"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_bench_kernels_without_matplotlib_writes_json_and_markdown(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert common.missing("matplotlib") == "matplotlib missing"
    assert cli.main(["bench", "kernels", "--device", "cpu", "--quick", "--ops", "ddim_step", "--target-time", "0.01",
                     "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "kernels.json").read_text())
    assert report["chart"] is None and "matplotlib missing" in report["chart_reason"]
    assert report["provenance"]["optional_packages"]["matplotlib"] is None
    assert (tmp_path / "kernels.md").read_text().startswith("# fastdiff kernel benchmark")
    assert not (tmp_path / "kernels.png").exists()
    assert "pip install fastdiff[bench]" in capsys.readouterr().err


def test_missing_optional_package_is_named():
    assert common.missing("json") is None
    assert common.missing("fastdiff_no_such_module") == "fastdiff_no_such_module missing"
    packages = common.optional_packages()
    for dist in common.OPTIONAL_PACKAGES.values():
        assert packages[dist] is not None or packages[f"{dist}_reason"] == f"not available: {dist} missing"


def test_gpu_check_without_cuda_writes_its_summary(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the check would run for real")
    assert gpu_check.main([str(tmp_path / "out")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert summary["mode"] == "no-cuda" and summary["passed"] is False and summary["parts"] == []
    assert "nothing was run" in summary["reason"] and summary["environment"]["cuda_available"] is False
    assert set(summary["environment"]["optional_packages"]) >= set(common.OPTIONAL_PACKAGES.values())


def _fake_parts(parts):
    return lambda mode, target, out, scratch: parts


def test_gpu_check_rehearsal_reports_every_part(tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the rehearsal is for machines without one")
    py = sys.executable
    monkeypatch.setattr(gpu_check, "plan_parts", _fake_parts([
        ("bench kernels", [py, "-c", "print('fine')"], 20),
        ("bench sampling", [py, "-c", "import sys; print('broken'); sys.exit(3)"], 20),
        ("gpu-marked tests", [py, "-c", "import time; print('slow', flush=True); time.sleep(60)"], 2),
    ]))
    out = tmp_path / "out"
    assert gpu_check.main([str(out), "--cpu-rehearsal"]) == 1
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["mode"] == "cpu-rehearsal" and summary["passed"] is False
    by = {p["name"]: p for p in summary["parts"]}
    assert by["bench kernels"]["passed"] and by["bench kernels"]["output_tail"] == ["fine"]
    assert by["bench sampling"]["returncode"] == 3 and not by["bench sampling"]["passed"]
    assert by["gpu-marked tests"]["timed_out"] and by["gpu-marked tests"]["seconds"] < 30
    assert summary["headlines"]["kernels"] is None  # nothing wrote kernels.json
    log = (out / "gpu_check.log").read_text()
    assert "broken" in log and "slow" in log
    err = capsys.readouterr().err
    assert "gpu-marked tests: TIMED OUT" in err and "bench sampling: FAILED" in err


def test_gpu_check_total_limit_caps_the_parts(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the rehearsal is for machines without one")
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(gpu_check, "plan_parts", _fake_parts([("first", sleeper, 100), ("second", sleeper, 100)]))
    out = tmp_path / "out"
    t0 = __import__("time").monotonic()
    assert gpu_check.main([str(out), "--cpu-rehearsal", "--total-limit", "30"]) == 1
    assert __import__("time").monotonic() - t0 < 45
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert parts[0]["timed_out"] and parts[0]["limit_s"] <= 30 - gpu_check.SUMMARY_RESERVE_S
    assert parts[1]["passed"] is None and "used up" in parts[1]["reason"]


def test_gpu_check_writes_its_summary_when_it_breaks(tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the rehearsal is for machines without one")

    def broken(*args):
        raise RuntimeError("planning failed")

    monkeypatch.setattr(gpu_check, "plan_parts", broken)
    out = tmp_path / "out"
    assert gpu_check.main([str(out), "--cpu-rehearsal"]) == 1
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["error"] == "RuntimeError: planning failed" and summary["passed"] is False
    assert "planning failed" in (out / "gpu_check.log").read_text()
    assert "the check broke" in capsys.readouterr().err


def test_gpu_check_puts_carried_wheels_on_every_parts_path(tmp_path, monkeypatch):
    """A pure-Python wheel in --wheels DIR becomes importable in the check and in the parts it starts."""
    import zipfile

    monkeypatch.setattr(gpu_check, "EXTRA_PATHS", [])
    monkeypatch.setattr(sys, "path", list(sys.path))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    name = "fastdiff_wheel_probe"
    with zipfile.ZipFile(wheels / f"{name}-1.0-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{name}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{name}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                   "Tag: py3-none-any\n")
        z.writestr(f"{name}-1.0.dist-info/RECORD", "")
    info = gpu_check.add_wheels(str(wheels), str(tmp_path / "scratch"))
    assert info["error"] is None and info["wheels"] == [f"{name}-1.0-py3-none-any.whl"]
    assert gpu_check.EXTRA_PATHS == [info["site"]]
    with open(tmp_path / "log", "w") as log:
        part = gpu_check.run_part("probe", [sys.executable, "-c", f"import {name}; print({name}.VALUE)"], 60, log)
    assert part["passed"] and part["output_tail"] == ["42"]
    assert gpu_check.add_wheels(str(tmp_path / "none"), str(tmp_path / "s2"))["error"].endswith("no such folder")


def test_gpu_check_part_timeout_kills_the_part(tmp_path):
    with open(tmp_path / "log", "w") as log:
        result = gpu_check.run_part("sleeper", [sys.executable, "-c", "print('started', flush=True); "
                                                "import time; time.sleep(60)"], 2, log)
    assert result["timed_out"] and not result["passed"] and result["seconds"] < 30
    assert "started" in (tmp_path / "log").read_text()


def test_output_bench_report(tmp_path):
    """`fastdiff bench output` at a micro size: every mode measured, ratios recomputed from the report."""
    assert cli.main(["bench", "output", "--device", "cpu", "--quick", "--batch", "4", "--batches", "2", "--steps", "1",
                     "--repeats", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "output.json").read_text())
    assert nulls_without_reason(report) == []
    runs = {r["mode"]: r for r in report["runs"]}
    assert set(runs) == {"sampling", "png_inline", "png_background", "npz_background", "generate", "writes_alone"}
    for r in runs.values():
        assert r["median_s"] == statistics.median(r["samples_s"]) and r["images"] == 8
        assert close(r["images_per_second"], 8 / r["median_s"])
        assert close(r["fraction_of_sampling_alone"], r["images_per_second"] / runs["sampling"]["images_per_second"])
    assert report["ranks_scaling"] is None and "Predicted" in report["ranks_scaling_reason"]
    assert "| png_background |" in (tmp_path / "output.md").read_text()
