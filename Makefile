# Fieldlink: the two commands. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check venv bench clean vendor deb

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/central demo

# The suite runs on TEST_JOBS pytest-xdist workers (many tests wait on timers and processes,
# so more workers than cores pays); tests that share a host resource share an xdist_group.
# `make test TEST_JOBS=0` runs it in one process.
TEST_JOBS ?= 3

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadgroup $(PYTEST_ARGS)

# The gates that run before the tests (.ci/run): ruff and mypy, configured in pyproject.toml
# ([tool.ruff], [tool.mypy]: which files, which rules, the complexity budget).
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/poll.py

# The console's vendored ECharts and Wuhan boundaries (central/static/vendor/README.md); needs npm.
vendor: $(STAMP)
	$(BIN)/python scripts/vendor_assets.py

# Debian packages fieldlink-edge and fieldlink-central into dist/ (packaging/README.md), each
# with its own environment built by the machine's Debian Python.
DEB_PYTHON ?= /usr/bin/python3
deb:
	$(DEB_PYTHON) packaging/build_deb.py --python $(DEB_PYTHON) --out dist

clean:
	rm -rf $(VENV) demo-data .pytest_cache dist
