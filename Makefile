# aimx developer entry points. Everything installs into .venv inside the checkout.
#
# The development venv installs exactly what requirements.lock pins (with hashes), so
# every machine tests the same versions; setup.cfg keeps the ranges a user's
# `pip install aimx` resolves, and `make test-latest` runs the suite on the newest
# releases inside those ranges. docs/development.md says how to update the lock.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
LOCK   := requirements.lock
# Build tools pinned alongside the runtime: the editable install builds without isolation.
BUILD_REQUIREMENTS := 'pip>=23.1' 'setuptools>=68' 'wheel>=0.41'

.PHONY: install system-deps test test-latest test-lowest lock run lint bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Re-resolve the pins from setup.cfg (newest versions in its ranges) and rewrite the lock.
lock: install
	printf '%s\n' $(BUILD_REQUIREMENTS) | $(BIN)/uv pip compile -q setup.cfg - \
	  --extra test --extra dev --generate-hashes --universal --python-version 3.11 \
	  --custom-compile-command "make lock" -o $(LOCK)

# Real peers for the interop and DKIM tests (root only; tests skip with a reason without them).
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    ! { command -v opendkim-testmsg && command -v postfix; } >/dev/null 2>&1; then \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null; \
	  for attempt in 1 2; do \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	      opendkim-tools postfix >/dev/null 2>&1 && break; \
	    apt-get update -q >/dev/null 2>&1; \
	  done; \
	  command -v opendkim-testmsg >/dev/null || echo "note: opendkim-tools/postfix unavailable; those checks will skip"; \
	fi

test: install system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The suite on the newest releases setup.cfg allows, as `pip install aimx` gets them
# today: a fresh venv, the lock ignored.
test-latest: system-deps
	rm -rf $(VENV)-latest
	$(PYTHON) -m venv $(VENV)-latest
	$(VENV)-latest/bin/python -m pip install -q --upgrade $(BUILD_REQUIREMENTS)
	$(VENV)-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager \
	  --no-build-isolation -e '.[test,dev]'
	$(VENV)-latest/bin/python -m pip list --format=freeze --exclude-editable > $(VENV)-latest/resolved.txt
	$(VENV)-latest/bin/python -m pytest $(PYTEST_ARGS)

# The suite on the lowest versions setup.cfg allows for our direct dependencies: the
# lower bounds there are ones this has passed with.
test-lowest: install system-deps
	rm -rf $(VENV)-lowest
	$(PYTHON) -m venv $(VENV)-lowest
	printf '%s\n' $(BUILD_REQUIREMENTS) | $(BIN)/uv pip compile -q setup.cfg - \
	  --extra test --extra dev --resolution lowest-direct --python-version 3.11 \
	  -o $(VENV)-lowest/requirements.txt
	$(VENV)-lowest/bin/python -m pip install -q -r $(VENV)-lowest/requirements.txt
	$(VENV)-lowest/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	$(VENV)-lowest/bin/python -m pytest $(PYTEST_ARGS)

run: install
	$(BIN)/python -m aimx.ops.devrun

# Style, then the layering: an import that runs upward fails (pyproject.toml [tool.importlinter]).
lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(VENV)-latest $(VENV)-lowest .dev .pytest_cache
