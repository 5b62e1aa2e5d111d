# Two commands do everything on a fresh machine: `make train` (set up, then train the embedded default) and
# `make test`. Every target sets up the virtual environment on first use. `make lint` runs the static checks
# (ruff, mypy on the typed packages, import-linter's layer contracts) that CI runs before the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
BENCH ?=
PYTEST_ARGS ?=
LOCAL_TORCH ?= 2.13.0

.PHONY: setup browser train test test-fast lint bench clean-outputs

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	@# Prefer the CPU build of torch from a local wheel folder (pip's find-links) where there is one: --no-index
	@# --no-deps succeeds only then, and the next install adds torch's own dependencies from the index.
	@# Elsewhere pip resolves torch within pyproject's open range.
	$(PY) -m pip install --quiet --no-index --no-deps "torch==$(LOCAL_TORCH)" 2>/dev/null \
		|| echo "no local torch $(LOCAL_TORCH) wheel: torch comes from the index"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP) browser

# The demo's browser test drives Debian's Chromium through Playwright (never `playwright install`): install it
# when it is missing and apt-get can (as root, non-interactive); elsewhere that test says why it skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
		&& DEBIAN_FRONTEND=noninteractive apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
		|| echo "chromium is not installed and cannot be here (needs root and apt-get): the browser test will skip"

train: setup
	$(VENV)/bin/affordvla-train $(ARGS)

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

# mypy's packages and the tools' caches (under outputs/, like every generated file) come from pyproject.toml;
# each check runs even when an earlier one fails, so one run lists every finding, and lint fails if any did.
lint: setup
	@status=0; \
	$(VENV)/bin/ruff check . || status=1; \
	$(VENV)/bin/mypy || status=1; \
	$(VENV)/bin/lint-imports --cache-dir outputs/cache/import-linter || status=1; \
	exit $$status

bench: setup
	$(PY) -m affordvla.bench $(if $(BENCH),--only $(BENCH))

clean-outputs:
	rm -rf outputs
