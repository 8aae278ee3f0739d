# Every target creates .venv when missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Apache Kafka's jars for the tests: resolved by Maven into a cache outside the repository.
KAFKA_POM := tests/kafka/pom.xml
KAFKA_VERSION := $(shell sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' $(KAFKA_POM))
KAFKA_JARS ?= $(HOME)/.cache/online-distill/kafka-$(KAFKA_VERSION)
export KAFKA_JARS
# Where torch comes from: empty for PyPI (the CUDA build), or a PyTorch wheel index.
TORCH_INDEX_URL ?=

.PHONY: install demo test bench lint soak clean kafka-jars

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned first: a range would let pip pick another build. PyPI's 2.13.0 wheel for
	# Linux is the CUDA build (GBs; it runs on the CPU when no GPU is there); TORCH_INDEX_URL
	# picks another index, e.g. https://download.pytorch.org/whl/cpu for the CPU build.
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	# MovieLens-100k ships inside recbole; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps recbole==1.2.1
	# report: matplotlib, for report.png of `distill up` (the worker images go without it).
	$(BIN)/pip install -q -e '.[dev,broker,report]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/distill up --source movielens --report report

$(KAFKA_JARS)/kafka_2.13-$(KAFKA_VERSION).jar: $(KAFKA_POM)
	mvn -B -q -f $(KAFKA_POM) dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(KAFKA_JARS)
	touch $@

kafka-jars: $(KAFKA_JARS)/kafka_2.13-$(KAFKA_VERSION).jar

# Without Java or Maven the Apache Kafka tests skip (and fail when CI=true).
# Two test processes: the suite's 970 CPU seconds took 1,435 s in one (0.7 of 2 cores: it waits on
# brokers, group joins and worker processes) and 856 s in two. loadfile keeps each file, with its
# module fixtures, in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	@$(MAKE) --no-print-directory kafka-jars || echo "warning: no Apache Kafka jars; its tests will be skipped"
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

bench: $(STAMP)
	@$(MAKE) --no-print-directory kafka-jars || echo "warning: no Apache Kafka jars; its benchmark rows will say so"
	$(BIN)/python -m bench

# A few minutes of the whole pipeline at full speed: memory stays bounded, lag returns to zero.
soak: $(STAMP)
	$(BIN)/python -m tests.faults.soak --duration 150 --drain 120 --rate 15000

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

clean:
	rm -rf $(VENV) report .pytest_cache
