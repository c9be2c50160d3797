# aimx developer entry points. Everything installs into .venv inside the checkout.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install system-deps test run lint bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,dev]' --config-settings editable_mode=compat
	touch $(STAMP)

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

run: install
	$(BIN)/python -m aimx.devrun

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .dev .pytest_cache
