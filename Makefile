# `make demo` and `make test` each set up what they need first (see tools/setup_env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
SETUP_INPUTS := tools/setup_env.sh setup.py pyproject.toml requirements/detectron2.txt \
	requirements/detectron2-runtime.txt requirements/demo-data.txt $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)
DEMO_CONFIG ?= configs/demo/deformable_detr_mnv2_trees.yaml
PYTEST_ARGS ?=

.PHONY: setup demo test test-cuda-asan gpu-check lint bench mutation clean

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	VENV=$(VENV) bash tools/setup_env.sh
	touch $@

# `make demo SEED=7` trains with another seed than the config's.
demo: setup
	$(PY) tools/trees_demo.py --config-file $(DEMO_CONFIG) --output output/demo $(if $(SEED),SEED $(SEED))

test: setup
	$(PY) -m pytest -ra $(PYTEST_ARGS)

# The emulated CUDA op and emulator tests under AddressSanitizer + UBSan. The runtime is preloaded
# into Python (with libstdc++, where it finds __cxa_throw); -s, as a report ends the process
# while pytest holds its output. Last result: benchmarks/README.md.
test-cuda-asan: setup
	DEFORMABLE_DETR_CUDA_EMULATOR_SANITIZE=1 ASAN_OPTIONS=detect_leaks=0 \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	$(PY) -m pytest -q -s -p no:cacheprovider tests/test_cuda_emulator.py \
	tests/test_ms_deform_attn_op.py -k "emulated or emulator" $(PYTEST_ARGS)

# Everything a lent GPU can check in one go (tools/gpu_check.py); skips the GPU parts without one.
gpu-check: setup
	$(PY) tools/gpu_check.py

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) benchmarks/ms_deform_attn.py

# Mutation testing of the plumbing (see README, Tests); MUTATION_ARGS e.g. 'deformable_detr.modeling.*'
MUTATION_ARGS ?=
mutation: setup
	$(PY) tools/run_mutation.py $(MUTATION_ARGS)

clean:
	rm -rf build projects/deformable_detr/_C*.so $(STAMP)
