# Every target builds what it needs from scratch: nothing is assumed installed beyond Python 3.11+
# and make. The development environment comes from the committed uv.lock, so a fresh clone gets
# exactly the versions the suite last passed with; uv itself is installed from PyPI, pinned.
PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
# One environment per Python: e.g. make test PYTHON=/path/to/python3.12 VENV=.venv-3.12. The stamp
# names the Python's version, so a PYTHON of another version re-syncs VENV rather than reusing it.
VENV ?= .venv
PY := $(VENV)/bin/python
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
STAMP := $(VENV)/.synced-$(PYVER)
LATEST := .venv-latest

# uv uses the Python that runs make (never downloads one) and puts the project in .venv.
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

# The suite in 3 worker processes (pytest-xdist), each given whole files: a module's shared
# fixtures (a multi-process job, a warm child) are then made once. Three even on two cores:
# many tests spend their time waiting (on storage servers, child processes, deadlines), and
# a third worker runs while they wait.
PYTEST := -m pytest -q -n 3 --dist loadfile

.PHONY: setup demo test bench lint lock test-latest clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet uv==$(UV_VERSION)

# Exactly the locked versions (the library editable, with the dev, examples and bench extras).
$(STAMP): $(UV) uv.lock pyproject.toml
	$(UV) sync --locked --all-extras --python $(PYTHON)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) $(PYTEST)

bench: $(STAMP)
	$(PY) benchmarks/bench.py

# ruff over everything; pyright (settings in pyproject.toml) over src/, against VENV's packages.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/pyright --pythonpath $(abspath $(PY))

# Refresh uv.lock to the newest releases that pyproject.toml's ranges allow.
lock: $(UV)
	$(UV) lock --upgrade --python $(PYTHON)

# The suite against the newest releases, ignoring the lock, in an environment of its own: how the
# team sees an upstream break before users do. Not part of CI.
test-latest: $(UV)
	rm -rf $(LATEST)
	$(UV) venv --quiet --python $(PYTHON) $(LATEST)
	$(UV) pip install --quiet --python $(LATEST)/bin/python --upgrade -e '.[dev,bench]'
	$(UV) pip list --python $(LATEST)/bin/python | grep -iE '^(jax|jaxlib|tensorstore|numpy|ml.dtypes|msgpack|flax|optax|orbax-checkpoint) '
	$(LATEST)/bin/python $(PYTEST)

clean:
	rm -rf $(VENV) $(LATEST) $(TOOLS) build src/*.egg-info
