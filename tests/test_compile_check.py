"""Every Triton kernel variant fastdiff launches compiles for sm_80 and sm_90 (no GPU needed) without spills,
and its sm_90 machine code gives a self-consistent static roofline.

Compilation runs in worker processes without TRITON_INTERPRET; Triton's on-disk cache makes reruns fast.
The quick test compiles one variant per kernel; the full sweep (about 160 compilations, 1-3 minutes cold on
2 cores) is marked slow.
"""

import json
import math

import pytest

from fastdiff.kernels import compile_check

TARGETS = (80, 90)
ROOFLINE_FIELDS = ("kernel", "variant", "target", "registers", "spills", "sass_per_element", "bytes_per_element",
                   "predicted_memory_us", "predicted_issue_us")
H200 = dict(hbm=4.3e12, sms=132, schedulers=4, mufu_lanes=16, clock=1.98e9)  # the model the module documents


def assert_roofline_consistent(row):
    """Every sm_90 row: positive figures, and the predicted times recomputed from the per-element counts."""
    assert row["target"] == "sm_90" and not row["error"], row
    for key in ROOFLINE_FIELDS:
        assert key in row, f"{row['kernel']} [{row['variant']}] lacks {key}"
    n = row["elements"]
    assert n > 0 and row["programs"] > 0 and row["loop_sass"] > 0
    assert row["sass_per_element"] > 0 and row["bytes_per_element"] > 0 and row["mufu_per_element"] >= 0
    assert math.isclose(row["predicted_memory_us"], row["bytes_per_element"] * n / H200["hbm"] * 1e6, rel_tol=1e-9)
    warp_insts = row["sass_per_element"] * n / 32
    issue_rate = H200["sms"] * H200["schedulers"] * H200["clock"]
    assert math.isclose(row["predicted_issue_us"], warp_insts / issue_rate * 1e6, rel_tol=1e-9)
    mufu_rate = H200["sms"] * H200["mufu_lanes"] * H200["clock"]
    assert math.isclose(row["predicted_mufu_us"], row["mufu_per_element"] * n / mufu_rate * 1e6, rel_tol=1e-9)
    times = {"memory": row["predicted_memory_us"], "issue": row["predicted_issue_us"], "mufu": row["predicted_mufu_us"]}
    assert row["predicted_bound"] == max(times, key=times.get)
    assert math.isclose(row["memory_margin"], times["memory"] / max(times["issue"], times["mufu"]) - 1, rel_tol=1e-9)
    assert row["load_bits"] in (16, 32, 64, 128) or row["kernel"] == "_gaussian_noise_kernel"
    assert row["store_bits"] in (16, 32, 64, 128)


def assert_rows_ok(rows):
    failed = [f"{r['kernel']} [{r['variant']}] {r['target']}: {r['error']}" for r in rows if r["error"]]
    assert not failed, "compile failures:\n" + "\n".join(failed)
    spilled = [f"{r['kernel']} [{r['variant']}] {r['target']}: {r['spills']} bytes" for r in rows if r["spills"]]
    assert not spilled, "register spills:\n" + "\n".join(spilled)
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["shared"] >= 0


def launchable_kernels() -> set[str]:
    """Every @triton.jit function named *_kernel in fastdiff's kernel modules."""
    import importlib
    import pkgutil

    import fastdiff.kernels as package

    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"fastdiff.kernels.{info.name}")
        for name, value in vars(module).items():
            # a JITFunction, or under TRITON_INTERPRET an interpreter function: both keep the Python one in .fn
            if name.endswith("_kernel") and getattr(getattr(value, "fn", None), "__module__", None) == module.__name__:
                names.add(name)
    return names


def test_variant_list_covers_the_engine():
    variants = compile_check.all_variants()
    names = {v.kernel for v in variants}
    assert "_update_step_cl_rgb_kernel" in names and len(names) >= 10
    assert names == launchable_kernels(), "a kernel the engine can launch has no compile-check variant"
    labels = {(v.kernel, v.variant) for v in variants}
    assert len(labels) == len(variants), "duplicate variant labels"
    single = [v.variant for v in variants if v.kernel == "_gn_single_kernel"]
    for dtype in ("f32", "f16", "bf16"):
        for layout in ("nchw", "cl"):
            assert f"{dtype} {layout} add silu" in single and f"{dtype} {layout}" in single
    steps = [v.variant for v in variants if v.kernel == "_update_step_kernel"]
    for mode in ("no noise", "noise tensor", "philox"):
        assert any(mode in s for s in steps)


def test_one_variant_per_kernel_compiles_without_spills():
    first = {}
    for v in compile_check.all_variants():
        first.setdefault(v.kernel, v)
    rows = compile_check.compile_variants(TARGETS, variants=list(first.values()))
    assert len(rows) == len(first) * len(TARGETS)
    assert_rows_ok(rows)
    for r in rows:
        if r["target"] == "sm_90":
            assert_roofline_consistent(r)
        else:
            assert r["sass_per_element"] is None and "sm_90" in r["roofline_reason"]


def test_roofline_of_the_update_step_follows_its_block():
    """Loop-free kernel: instructions per element = instructions per thread * threads per program / BLOCK."""
    # imported here, not at collection: tests/kernel_device.py must import the kernel modules first
    from fastdiff.kernels.update_step_kernels import plan_update_step

    variants = [v for v in compile_check.all_variants()
                if v.kernel == "_update_step_kernel" and v.variant in ("f16 nchw no noise step:tensor",
                                                                       "f32 nchw philox step:tensor")]
    assert len(variants) == 2
    for row, v in zip(compile_check.compile_variants((90,), variants=variants), variants):
        assert_roofline_consistent(row)
        plan = plan_update_step(3, 512 * 512, "nchw", "philox" in v.variant)
        assert row["elements"] % plan.block == 0 and row["programs"] * plan.block == row["elements"]
        per_thread_elements = plan.block / (32 * plan.num_warps)
        assert math.isclose(row["sass_per_element"], row["loop_sass"] / per_thread_elements, rel_tol=1e-9)
        elem = 2 if v.variant.startswith("f16") else 4
        assert row["bytes_per_element"] == 3 * elem  # x_t, model output read; x_{t-1} written; Philox is free
        if "philox" in v.variant:  # Box-Muller needs a reciprocal or square root per value, at least
            assert row["mufu_per_element"] >= 0.5


SASS = """
        Function : toy
        /*0000*/                   S2R R0, SR_TID.X ;                       /* 0x0 */
        /*0010*/               @P0 LDG.E.128 R4, desc[UR4][R2.64] ;         /* 0x0 */
        /*0020*/                   FADD R1, R1, R4 ;                        /* 0x0 */
        /*0030*/                   MUFU.EX2 R5, R1 ;                        /* 0x0 */
        /*0040*/               @P1 BRA 0x10 ;                               /* 0x0 */
        /*0050*/                   STG.E.64 desc[UR4][R2.64], R4 ;          /* 0x0 */
        /*0060*/              @!P2 EXIT ;                                   /* 0x0 */
        /*0070*/                   STG.E.U16 desc[UR4][R2.64], R4 ;         /* 0x0 */
        /*0080*/                   EXIT ;                                   /* 0x0 */
        /*0090*/                   MUFU.RCP R5, R1 ;                        /* 0x0 */
        /*00a0*/                   BRA 0x20 ;                               /* 0x0 */
        /*00b0*/                   BRA 0xb0;                                /* 0x0 */
"""


def test_sass_profile_finds_the_loop_and_leaves_out_cold_code():
    p = compile_check.sass_profile(SASS)
    assert p["body"] == 9  # up to the unconditional EXIT; the slow path after it is cold
    assert p["loops"] == [4] and p["loop_mufu"] == [1] and p["mufu"] == 1
    assert p["loads"] == {128: 1} and p["stores"] == {64: 1, 16: 1}
    v = compile_check.Variant("m", "toy", "toy", {}, {}, num_warps=2, fp_fusion=True,
                              roofline=dict(shape="s", elements=64 * 10, bytes=6400, programs=10, loop_trips=[3]))
    r = compile_check.roofline(p, v)
    # per thread: 9 + 4 * (3 - 1) = 17 instructions, 1 + 1 * 2 = 3 MUFU; 640 threads over 640 elements
    assert r["sass_per_element"] == 17 and r["mufu_per_element"] == 3 and r["bytes_per_element"] == 10
    assert r["loop_sass"] == 4 and r["load_bits"] == 128 and r["store_bits"] == 64
    with pytest.raises(RuntimeError, match="expected 2 loop"):
        compile_check.roofline(p, compile_check.Variant("m", "toy", "toy", {}, {}, 2, True,
                                                        roofline=dict(v.roofline, loop_trips=[3, 3])))


DIAMOND_SASS = """
        Function : toy_if_else
        /*0000*/                   S2R R0, SR_TID.X ;                       /* 0x0 */
        /*0010*/               @P0 BRA 0x50 ;                               /* 0x0 */
        /*0020*/                   FMUL R1, R1, R2 ;                        /* 0x0 */
        /*0030*/                   MUFU.RCP R1, R1 ;                        /* 0x0 */
        /*0040*/                   BRA 0x70 ;                               /* 0x0 */
        /*0050*/                   FADD R1, R1, R2 ;                        /* 0x0 */
        /*0060*/                   FADD R1, R1, R2 ;                        /* 0x0 */
        /*0070*/                   STG.E desc[UR4][R2.64], R1 ;             /* 0x0 */
        /*0080*/                   EXIT ;                                   /* 0x0 */
        /*0090*/                   BRA 0x90;                                /* 0x0 */
"""


def test_sass_profile_counts_one_arm_of_an_if_else():
    """The arms of an if/else are alternatives: the executed count is the longer path, not their sum."""
    p = compile_check.sass_profile(DIAMOND_SASS)
    assert p["straight_line"] == 9
    # S2R, BRA, then the longer arm (FMUL, MUFU, BRA: 3, against FADD, FADD: 2), STG, EXIT
    assert p["body"] == 7 and p["mufu"] == 1 and p["loops"] == []
    # the shorter arm made longer: the other path is taken, and its MUFU-free count
    extra = "        /*0068*/                   FADD R1, R1, R2 ;\n        /*0069*/                   FADD R1, R1, R2 ;\n"
    store = "        /*0070*/                   STG"
    longer_else = DIAMOND_SASS.replace(store, extra + store)
    q = compile_check.sass_profile(longer_else)
    assert q["body"] == 8 and q["mufu"] == 0


def test_main_writes_json_and_returns_zero(tmp_path, capsys):
    path = tmp_path / "kernels.json"
    status = compile_check.main(["--target", "sm_90", "--kernels", "_gn_combine_kernel", "--json", str(path)])
    assert status == 0
    rows = json.loads(path.read_text())
    assert rows and all(r["target"] == "sm_90" and r["kernel"] == "_gn_combine_kernel" for r in rows)
    for r in rows:
        assert_roofline_consistent(r)
    out = capsys.readouterr().out
    assert "_gn_combine_kernel" in out and "Static roofline on an H200" in out


@pytest.mark.slow
def test_every_variant_compiles_without_spills():
    rows = compile_check.compile_variants(TARGETS)
    variants = compile_check.all_variants()
    assert len(rows) == len(variants) * len(TARGETS)
    assert_rows_ok(rows)
    sm90 = {(r["kernel"], r["variant"]): r for r in rows if r["target"] == "sm_90"}
    assert set(sm90) == {(v.kernel, v.variant) for v in variants}, "a roofline row for every variant"
    for r in sm90.values():
        assert_roofline_consistent(r)
    split = compile_check.split_path_rows(rows)
    assert len(split) == 3 * 2 * 2 * 2  # dtype x layout x add x silu
    for r in split:
        assert_roofline_consistent(r)
        parts = [sm90[("_gn_stats_kernel", r["variant"].replace(" silu", ""))],
                 sm90[("_gn_combine_kernel", r["variant"].split()[0] + (" add" if " add" in r["variant"] else ""))],
                 sm90[("_gn_apply_kernel", r["variant"].replace(" add", ""))]]
        for key in ("bytes_per_element", "sass_per_element", "predicted_memory_us", "predicted_issue_us"):
            assert math.isclose(r[key], sum(p[key] for p in parts), rel_tol=1e-9)
        elem = 4 if r["variant"].startswith("f32") else 2
        assert r["bytes_per_element"] >= 3 * elem  # x read twice and y written once, without L2 reuse
