# Two commands on a fresh machine with Python 3.11:
#   make start   install (into .venv) and start the gateway with an embedded Ray cluster
#   make test    install (into .venv) and run the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: start status test test-fast install install-dev install-local install-gpu install-browser bench clean

# (gunicorn then says each step: the metrics directory, "starting the embedded Ray head", and once every
# worker is connected, "ready: the gateway serves http://..." and the dashboard's URL and how to log in)
start: install
	@echo "starting the gateway: gunicorn, which starts the embedded Ray head (unless RAY_ADDRESS is set)..."
	exec $(BIN)/gunicorn -c gunicorn.conf.py app:app

# is a gateway running here (or the cluster at RAY_ADDRESS), and what runs on it: nodes; endpoints, their
# replicas and health. Within seconds; exit 3 when nothing runs there, 4 when it cannot be read.
# (ARGS=--json for JSON)
status: install
	@$(BIN)/python -m gateway status $(ARGS)

test: install-dev install-browser
	$(BIN)/python -m pytest

# the web console's test (tests/test_ui.py) drives Debian's chromium through Playwright, which downloads
# nothing; installed here when missing (as root, or with sudo -n); when it cannot be, that test skips and
# says why (under CI, with CI set, it fails instead)
install-browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; \
	  else echo "chromium is missing and neither root nor sudo is here: tests/test_ui.py will skip"; exit 0; fi; \
	  if ! command -v apt-get >/dev/null 2>&1; then echo "chromium is missing and there is no apt-get: tests/test_ui.py will skip"; exit 0; fi; \
	  echo "installing chromium (Debian's package) for the console's browser test..."; \
	  ($$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 \
	    install -y -qq chromium >/dev/null) \
	    || echo "could not install chromium: tests/test_ui.py will skip"; }

# the pure tests only (tests/fast: no Ray, seconds); make test runs them too
test-fast: install-dev
	$(BIN)/python -m pytest -m fast

bench: install-dev
	$(BIN)/python -m bench run

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
# local models: transformers on CPU (make install-local), vLLM on GPU nodes (make install-gpu)
install-local: $(VENV)/.installed-local
install-gpu: $(VENV)/.installed
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-gpu.txt

$(VENV)/bin/python:
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required (Ray and the cluster must match); set PYTHON=/path/to/python3.11"'
	@echo "creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements.txt $(VENV)/bin/python
	@echo "installing requirements into $(VENV) (first run: a few minutes)..."
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

$(VENV)/.installed-local: requirements-local.txt $(VENV)/.installed
	@echo "installing the local-model engine (CPU torch + transformers) into $(VENV) (first run: a few minutes)..."
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-local.txt
	touch $@

$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed-local
	@echo "installing the test requirements into $(VENV)..."
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $@

clean:
	rm -rf $(VENV)
