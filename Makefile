# The two commands a newcomer needs: `make sample` and `make test`. Both set up .venv first (idempotent).
VENV := .venv
FASTDIFF := $(VENV)/bin/fastdiff
PYTEST_ARGS ?=

.PHONY: setup sample test test-quick kernels bench-cpu clean

$(VENV)/.setup-runtime: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

$(VENV)/.setup-test: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh test
	touch $@ $(VENV)/.setup-runtime

setup: $(VENV)/.setup-runtime

# Sample a 64-image grid of digits with the embedded default model (CPU or GPU).
sample: $(VENV)/.setup-runtime
	$(FASTDIFF) sample --out samples

# The whole test suite, as CI runs it.
test: $(VENV)/.setup-test
	$(VENV)/bin/python -m pytest -n 2 -q $(PYTEST_ARGS)

test-quick: $(VENV)/.setup-test
	$(VENV)/bin/python -m pytest -n 2 -q --quick $(PYTEST_ARGS)

kernels: $(VENV)/.setup-runtime
	$(FASTDIFF) kernels --target sm_80,sm_90

clean:
	rm -rf $(VENV) samples build *.egg-info

# CPU smoke runs of both benchmarks (GPU: `fastdiff bench kernels|sampling --device cuda`).
bench-cpu: $(VENV)/.setup-test
	$(FASTDIFF) bench kernels --device cpu --quick
	$(FASTDIFF) bench sampling --device cpu --quick
