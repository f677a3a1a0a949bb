# `make demo` and `make test` each set up what they need first (see tools/setup_env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
SETUP_INPUTS := tools/setup_env.sh setup.py pyproject.toml requirements/detectron2.txt \
	requirements/detectron2-runtime.txt requirements/demo-data.txt $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)
DEMO_CONFIG ?= configs/demo/deformable_detr_mnv2_trees.yaml
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench mutation clean

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	VENV=$(VENV) bash tools/setup_env.sh
	touch $@

demo: setup
	$(PY) tools/run_demo.py --config-file $(DEMO_CONFIG) --output output/demo

test: setup
	$(PY) -m pytest -ra $(PYTEST_ARGS)

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
