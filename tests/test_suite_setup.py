"""The suite's own set-up (tests/conftest.py): order-independent Triton mode, missing dependencies in and out of CI.

Each test runs pytest in a fresh process (started without TRITON_INTERPRET, as CI starts it) on a few cheap
tests, so what it checks is the start-up itself.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Collected first, this module imports diffusers, which imports Triton.
DIFFUSERS_FIRST = "tests/test_unet.py::test_from_dict_rejects_unknown_fields"
# Two interpreted kernel tests (single and split GroupNorm) that failed after it, before conftest set the mode.
KERNEL_TESTS = ["tests/test_kernel_group_norm.py::test_single_path_c96_3groups_7x5[nchw-f32]",
                "tests/test_kernel_group_norm.py::test_batch_one[split]"]


def run_pytest(args, env_update=None, extra_path=None):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CI", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, ROOT) if p)
    env.update(env_update or {})
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:xdist", "-p", "no:cacheprovider", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_kernel_tests_pass_after_a_module_that_imports_diffusers():
    """Collection order used to matter: diffusers imported Triton before TRITON_INTERPRET was set, and every
    interpreted kernel calling a Triton helper failed ("Cannot call @triton.jit'd outside of the scope of a
    kernel"). conftest now settles the mode before anything is collected."""
    pytest.importorskip("diffusers", reason="diffusers missing: the ordering it tests needs a module that imports it")
    rc, out = run_pytest([DIFFUSERS_FIRST, *KERNEL_TESTS])
    assert rc == 0 and "3 passed" in out, out


def _block_diffusers(tmp_path):
    """A plugin (loaded with -p before conftest) that makes diffusers unimportable, as in an image without it."""
    (tmp_path / "no_diffusers.py").write_text("import sys\nsys.modules['diffusers'] = None  # import fails\n")
    return str(tmp_path)


@pytest.mark.slow  # pytest's own importorskip behaviour; the CI case below is the one that guards a regression
def test_missing_diffusers_skips_with_its_name_outside_ci(tmp_path):
    rc, out = run_pytest(["-p", "no_diffusers", "tests/test_unet.py"], extra_path=_block_diffusers(tmp_path))
    # exit status 5: no test ran (the whole module skipped at collection), which is not an error
    assert rc == 5 and "1 skipped" in out and "could not import 'diffusers'" in out, out


def test_missing_diffusers_is_an_error_in_ci(tmp_path):
    rc, out = run_pytest(["-p", "no_diffusers", "--collect-only", DIFFUSERS_FIRST], env_update={"CI": "true"},
                         extra_path=_block_diffusers(tmp_path))
    assert rc != 0 and "test dependencies are missing: diffusers" in out, out


def test_dependency_table_matches_the_test_extra():
    """conftest's TEST_DEPENDENCIES lists pyproject.toml's [test] extra (pytest and its plugins aside)."""
    from conftest import TEST_DEPENDENCIES

    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        block = re.search(r"^test = \[(.*?)^\]", f.read(), re.S | re.M).group(1)
    extra = {re.match(r"[A-Za-z0-9_.-]+", name).group(0) for name in re.findall(r'"([^"]+)"', block)}
    assert extra - {"pytest", "pytest-xdist"} == set(TEST_DEPENDENCIES.values())


def test_a_source_checkout_imports_its_own_kernels_even_beside_an_editable_install(tmp_path):
    """scripts/mutants.py plants bugs in a copy of the tree: that copy's kernels/ must be the one imported, not
    the kernels/ an editable install of the original checkout maps fastdiff.kernels to."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    skip = shutil.ignore_patterns("__pycache__", "*.safetensors")
    shutil.copytree(root / "fastdiff", tmp_path / "fastdiff", ignore=skip)
    shutil.copytree(root / "kernels", tmp_path / "kernels", ignore=skip)
    shutil.copy(root / "pyproject.toml", tmp_path / "pyproject.toml")
    code = "import fastdiff.kernels as k, fastdiff.kernels.update_step_kernels as u; print(k.__file__); print(u.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    for line in out.stdout.split():
        assert Path(line).resolve().is_relative_to(tmp_path.resolve()), out.stdout
