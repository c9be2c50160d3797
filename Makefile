# aimx developer entry points. Everything installs into .venv inside the checkout.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test run lint bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,dev]' --config-settings editable_mode=compat
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

run: install
	$(BIN)/python -m aimx.devrun

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .dev .pytest_cache
