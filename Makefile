# Two commands do everything on a fresh machine: `make run` and `make test`.
# Each creates .venv and installs the project when pyproject.toml changed (silent otherwise).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test chaos lint bench check clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed; set PYTHON=/path/to/python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing dependencies into $(VENV) (first run only)..."
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	@$(PY) -m rehearsal run

# Two workers: the tests wait on real sockets and processes, and the machine has two cores.
test: $(STAMP)
	@$(PY) -m pytest -q -n 3

# The chaos scenarios (each under 2 minutes), then a 2,000-message load run under the default
# error mix; `python -m rehearsal simulate` exits 1 if a message was lost or answered twice, or the
# resilience score is under 85.
chaos: $(STAMP)
	@$(PY) -m pytest -q -m chaos --durations=0
	@$(PY) -m rehearsal simulate --messages 2000

lint: $(STAMP)
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/mypy resilience services bot sandbox rehearsal

bench: $(STAMP)
	@$(PY) -m bench

check: $(STAMP)
	@$(PY) -m bot check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
