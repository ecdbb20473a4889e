# Two entry points do all set-up on a fresh machine (each creates or refreshes .venv):
#   make demo   compile the reference model for the host and run + verify every task
#   make test   lint and run the test suite (what CI runs)
# and one for the edit-test loop:
#   make check  lint and the tests not marked slow (under 2 minutes on 2 cores)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= m3vit-tiny
BUNDLE ?= out/$(MODEL)

.PHONY: demo test check lint venv bench clean native native-aarch64

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
# edgemoe-rt is built for the host and for aarch64 first, so its tests (qemu-user included) run, not skip.
test: venv lint native native-aarch64
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The fast tier: no native build, no test marked slow (see pyproject's markers).
check: venv lint
	@$(BIN)/python -m pytest -q -m "not slow"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make check: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: venv
	$(BIN)/python benchmarks/bench_expert_kernel.py
	$(BIN)/python benchmarks/bench_runtime.py

clean:
	rm -rf out .pytest_cache .ruff_cache build *.egg-info

# edgemoe-rt, the native runtime of TVM bundles (targets/tvm/native): C++17 + CMake against the TVM
# runtime libraries and headers of the apache-tvm / apache-tvm-ffi wheels in .venv (no Python at run time).
NATIVE_BUILD ?= build/native
TVM_SITE = $(shell $(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

native: venv
	@missing=""; command -v cmake >/dev/null || missing="cmake"; command -v c++ >/dev/null || missing="$$missing g++"; \
	if [ -n "$$missing" ]; then echo "make native: installing $$missing (Debian packages)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing || exit 1; fi
	cmake -S targets/tvm/native -B $(NATIVE_BUILD) -DCMAKE_BUILD_TYPE=Release -DTVM_SITE=$(TVM_SITE) >/dev/null
	cmake --build $(NATIVE_BUILD) -j2
	@echo "built $(NATIVE_BUILD)/edgemoe-rt"

# The same for aarch64 (Raspberry Pi 5, Jetson CPUs): Debian's cross g++ (and qemu-user to run it
# here: qemu-aarch64 -L /usr/aarch64-linux-gnu build/native-aarch64/edgemoe-rt ...), linked against
# the TVM runtime of the apache-tvm / apache-tvm-ffi manylinux aarch64 wheels (downloaded with pip).
NATIVE_ARM_BUILD ?= build/native-aarch64
TVM_ARM_SITE := $(NATIVE_ARM_BUILD)/site
TVM_WHEEL_PINS = $(shell $(BIN)/python -c "from importlib.metadata import version as v; print(f'apache-tvm=={v(\"apache-tvm\")} apache-tvm-ffi=={v(\"apache-tvm-ffi\")}')")
VENV_PYVER = $(shell $(BIN)/python -c "import sys; print('%d.%d' % sys.version_info[:2])")

native-aarch64: venv
	@missing=""; command -v cmake >/dev/null || missing="cmake"; \
	command -v aarch64-linux-gnu-g++ >/dev/null || missing="$$missing g++-aarch64-linux-gnu"; \
	command -v qemu-aarch64 >/dev/null || missing="$$missing qemu-user"; \
	if [ -n "$$missing" ]; then echo "make native-aarch64: installing $$missing (Debian packages)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing || exit 1; fi
	@if [ ! -f $(TVM_ARM_SITE)/.unpacked ]; then \
		rm -rf $(NATIVE_ARM_BUILD)/wheels $(TVM_ARM_SITE) && mkdir -p $(NATIVE_ARM_BUILD)/wheels $(TVM_ARM_SITE) && \
		$(BIN)/python -m pip download -q --no-cache-dir --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
			--python-version $(VENV_PYVER) -d $(NATIVE_ARM_BUILD)/wheels $(TVM_WHEEL_PINS) && \
		$(BIN)/python targets/tvm/native/unpack_wheels.py $(TVM_ARM_SITE) $(NATIVE_ARM_BUILD)/wheels/*.whl && \
		rm -rf $(NATIVE_ARM_BUILD)/wheels && touch $(TVM_ARM_SITE)/.unpacked; fi
	cmake -S targets/tvm/native -B $(NATIVE_ARM_BUILD) -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_TOOLCHAIN_FILE=$(CURDIR)/targets/tvm/native/aarch64-linux-gnu.cmake -DTVM_SITE=$(CURDIR)/$(TVM_ARM_SITE) >/dev/null
	cmake --build $(NATIVE_ARM_BUILD) -j2
	@echo "built $(NATIVE_ARM_BUILD)/edgemoe-rt (aarch64)"
