# make test   - create .venv if missing, install lab with its test tools, run the whole suite
# make demo   - same setup, then run the local-mode demo on loopback (tools/demo.sh)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: test demo bench clean system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { tools/system-deps.sh venv && $(PYTHON) -m venv $(VENV); }

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

system-deps:
	tools/system-deps.sh test

TOOLS  ?= $(HOME)/.cache/lab-test-tools
TOOL_ENV = $(if $(wildcard $(TOOLS)/bin/sushy-emulator),SUSHY_EMULATOR=$(TOOLS)/bin/sushy-emulator) \
           $(if $(wildcard $(TOOLS)/bin/ksvalidator),KSVALIDATOR=$(TOOLS)/bin/ksvalidator)

test: $(VENV)/.installed system-deps
	$(TOOL_ENV) $(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" tools/demo.sh

bench: $(VENV)/.installed
	$(BIN)/python -m tests.bench $(BENCH)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
