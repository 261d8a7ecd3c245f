# The two commands of the README. Each creates .venv on first use and installs fedseg into it,
# with torch pinned to 2.13.0 (constraints.txt) so that no CUDA build is ever downloaded.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
STAMP  := $(VENV)/.installed-stamp
OUT    ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install demo test test-fast test-faults clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade "pip>=24" -c constraints.txt
	$(VENV)/bin/python -m pip install -q -c constraints.txt torch==2.13.0
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedseg demo --out $(OUT)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not faults" $(PYTEST_ARGS)

# the POC fault deployments: the study's fault matrix and a site's crash, kill and refusal (about 11 min;
# docs/testing.md); CI runs it after `make test`
test-faults: $(STAMP)
	$(VENV)/bin/python -m pytest -m faults $(PYTEST_ARGS)

# the fast tier for iteration: everything but the tests that start NVFlare (simulator, POC, kits)
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not e2e and not faults" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
