"""Every Triton kernel variant fastdiff launches compiles for sm_80 and sm_90 (no GPU needed) without spills.

Compilation runs in worker processes without TRITON_INTERPRET; Triton's on-disk cache makes reruns fast.
The quick test compiles one variant per kernel; the full sweep (about 160 compilations, 1-3 minutes cold on
2 cores) is marked slow.
"""

import json

import pytest

from fastdiff.kernels import compile_check

TARGETS = (80, 90)


def assert_rows_ok(rows):
    failed = [f"{r['kernel']} [{r['variant']}] {r['target']}: {r['error']}" for r in rows if r["error"]]
    assert not failed, "compile failures:\n" + "\n".join(failed)
    spilled = [f"{r['kernel']} [{r['variant']}] {r['target']}: {r['spills']} bytes" for r in rows if r["spills"]]
    assert not spilled, "register spills:\n" + "\n".join(spilled)
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["shared"] >= 0


def test_variant_list_covers_the_engine():
    variants = compile_check.all_variants()
    names = {v.kernel for v in variants}
    assert names == {"_gn_single_kernel", "_gn_stats_kernel", "_gn_combine_kernel", "_gn_apply_kernel",
                     "_update_step_kernel", "_update_step_cl_philox_kernel", "_gaussian_noise_kernel",
                     "_dpm_step_kernel"}
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


def test_main_writes_json_and_returns_zero(tmp_path, capsys):
    path = tmp_path / "kernels.json"
    status = compile_check.main(["--target", "sm_90", "--kernels", "_gn_combine_kernel", "--json", str(path)])
    assert status == 0
    rows = json.loads(path.read_text())
    assert rows and all(r["target"] == "sm_90" and r["kernel"] == "_gn_combine_kernel" for r in rows)
    assert "_gn_combine_kernel" in capsys.readouterr().out


@pytest.mark.slow
def test_every_variant_compiles_without_spills():
    rows = compile_check.compile_variants(TARGETS)
    assert len(rows) == len(compile_check.all_variants()) * len(TARGETS)
    assert_rows_ok(rows)
