# Every target creates .venv when missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint soak clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: a range would let pip pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# MovieLens-100k ships inside recbole; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps recbole==1.2.1
	$(BIN)/pip install -q -e '.[dev,broker]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/distill up --source movielens --report report

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m bench

# A few minutes of the whole pipeline at full speed: memory stays bounded, lag returns to zero.
soak: $(STAMP)
	$(BIN)/python -m tests.faults.soak --duration 150 --drain 120 --rate 15000

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) report .pytest_cache
