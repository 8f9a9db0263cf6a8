# Two entry points for a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALL := $(BIN)/pip install -q -e '.[dev]'
# Debian packages the tests drive for real (installed when root; tests skip without them)
DEBS := gcc xinetd sendmail-bin prometheus haproxy socat iperf3 iproute2 util-linux systemd dnsmasq-base \
        libidn12 libicu72 chromium stress-ng

# exit 0 when the relay core could be built (Python.h is here) but was not
export CORE_MISSING := import importlib.util as u, os, sys, sysconfig; \
  h = os.path.join(sysconfig.get_paths()['include'], 'Python.h'); \
  sys.exit(0 if os.path.exists(h) and u.find_spec('forwarder.traffic._core') is None else 1)

.PHONY: run test lint bench screenshot debs venv clean

$(BIN)/forwarder: pyproject.toml forwarder/traffic/_core.c
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(INSTALL)
	@touch $@

venv: $(BIN)/forwarder
	@# a compiler that arrived after the venv was made (`make run`, then `make test` as root)
	@if command -v gcc >/dev/null && $(BIN)/python -c "$$CORE_MISSING"; then \
	  echo "building the relay core (gcc is here now)"; $(INSTALL); fi

## run the forwarder on the example config: 127.0.0.1:2525 -> 127.0.0.1:8025 (smtp probe)
run: venv
	$(BIN)/forwarder run --config deploy/examples/example.toml

## install everything, then lint, type-check and run the whole test suite
test: debs venv lint
	$(BIN)/pytest -q -ra

lint: venv
	$(BIN)/ruff check forwarder tests
	$(BIN)/mypy

## the side-by-side benchmark (not part of `make test`; a smoke run of it is): --quick for ~2 min
bench: debs venv
	$(BIN)/python -m tests.perf.bench --markdown $(BENCH_ARGS)

## the README's picture of the status page (docs/status-page.png); needs chromium
screenshot: debs venv
	$(BIN)/python dashboards/screenshot.py

debs:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:" $$missing; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	else echo "not root: skipping Debian packages (tests that need them will skip)"; fi

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
