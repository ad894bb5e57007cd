"""README.md's Python examples run as written (on the CPU here), with fewer steps where a line is marked."""

import os
import re

import pytest
import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
# exact README line -> what the test runs instead (sizes only; the code itself runs unchanged)
SMALLER = {"steps = 50  # DDIM steps": "steps = 3  # DDIM steps (3 in the test)"}


def python_blocks() -> list[str]:
    with open(README) as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.DOTALL | re.MULTILINE)


def test_readme_python_examples_run(tmp_path, monkeypatch):
    pytest.importorskip("diffusers", reason="diffusers missing: README's drop-in example needs it")
    blocks = python_blocks()
    assert blocks, "README.md has no ```python block"
    for old in SMALLER:
        assert any(old in block for block in blocks), f"README no longer has the line {old!r}"
    monkeypatch.chdir(tmp_path)
    namespaces = []
    for number, block in enumerate(blocks):
        code = block
        for old, new in SMALLER.items():
            code = code.replace(old, new)
        namespace = {"__name__": f"readme_block_{number}"}
        exec(compile(code, f"README.md python block {number}", "exec"), namespace)
        namespaces.append(namespace)
    # what "Use it from diffusers" promises: the pipeline accelerated in place, its images
    accelerated = [ns for ns in namespaces if "digits" in ns]
    assert len(accelerated) == 1, "README's diffusers example (fastdiff.accelerate) is missing"
    assert accelerated[0]["digits"].shape == (4, 16, 16, 1) and hasattr(accelerated[0]["pipe"], "_fastdiff")
    # what the first block promises
    namespace = namespaces[0]
    images, variations, x = namespace["images"], namespace["variations"], namespace["x"]
    assert images.shape[0] == 3 and variations.shape[0] == 2 and torch.isfinite(images).all()
    assert x.shape[1:] == images.shape[1:] and torch.isfinite(x).all()
    assert len(namespace["result"].written) == 4
    assert sorted(os.listdir(tmp_path / "samples-python")) == [f"{i:06d}.png" for i in range(4)] + ["grid.png",
                                                                                                    "run.json"]
    assert isinstance(namespace["model"], namespace["fastdiff"].UNet)
