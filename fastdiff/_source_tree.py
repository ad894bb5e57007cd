"""Make ``kernels/`` importable as ``fastdiff.kernels`` when running from a source checkout.

Installed (``pip install .`` or ``-e .``), setuptools maps the top-level ``kernels/`` folder to the
subpackage ``fastdiff.kernels``. From a bare checkout (``PYTHONPATH=.``) no such mapping exists, so the
package registers the folder itself, once, on first import; a checkout always takes its own folder.
"""

import importlib.util
import os
import sys


def register_source_kernels() -> None:
    name = "fastdiff.kernels"
    if name in sys.modules:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    init = os.path.join(root, "kernels", "__init__.py")
    # A source checkout (fastdiff/ beside kernels/ and pyproject.toml) always uses its own kernels/, even when an
    # editable install of another checkout maps fastdiff.kernels elsewhere (scripts/mutants.py runs on a copy).
    source_checkout = os.path.isfile(init) and os.path.isfile(os.path.join(root, "pyproject.toml"))
    if not source_checkout:
        return  # installed: setuptools maps fastdiff.kernels (or nothing provides it)
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[os.path.dirname(init)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    setattr(sys.modules["fastdiff"], "kernels", module)
