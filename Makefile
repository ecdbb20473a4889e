# Two entry points do all set-up on a fresh machine (each creates or refreshes .venv):
#   make demo   compile the reference model for the host and run + verify every task
#   make test   lint and run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= m3vit-tiny
BUNDLE ?= out/$(MODEL)

.PHONY: demo test lint venv bench clean

venv: $(STAMP)

# Refresh when the project metadata changes; torch==2.13.0 is pinned (CPU build).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=23" "setuptools>=77"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Image models run on a held-out procedural scene and write input/<task>/ground-truth PNGs to $(BUNDLE)-demo/.
demo: venv
	$(BIN)/edgemoe compile $(MODEL) --device host --target onnx -o $(BUNDLE)
	$(BIN)/edgemoe verify $(BUNDLE)
	@img=$$($(BIN)/python -c "import json; m=json.load(open('$(BUNDLE)/manifest.json')); print('y' if (m['input'].get('preprocess') or {}).get('kind') == 'image' else '')"); \
	if [ -n "$$img" ]; then $(BIN)/python -m edgemoe.models.m3vit.scenes --png $(BUNDLE)-demo/scene.png \
		--labels-png $(BUNDLE)-demo/truth-semseg.png --depth-png $(BUNDLE)-demo/truth-depth.png || exit $$?; fi; \
	for t in $$($(BIN)/python -c "import json,sys; print(' '.join(json.load(open('$(BUNDLE)/manifest.json'))['tasks']))"); do \
		echo; $(BIN)/edgemoe run $(BUNDLE) --task $$t --repeat 5 --output $(BUNDLE)-$$t.npy \
		$${img:+--input $(BUNDLE)-demo/scene.png --png $(BUNDLE)-demo} || exit $$?; done

lint: venv
	$(BIN)/ruff check .

# pytest exits 5 when it collected nothing: turn that into a failure so it cannot hide.
test: venv lint
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: venv
	$(BIN)/python benchmarks/bench_expert_kernel.py
	$(BIN)/python benchmarks/bench_runtime.py

clean:
	rm -rf out .pytest_cache .ruff_cache build *.egg-info
