# The two set-up commands of the README. Each creates the virtual environment if it is missing.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.ditlab-installed

.PHONY: quickstart test test-fast lint pipeline clean-runs

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[dev]'
	touch $(STAMP)

## quickstart: train, sample and evaluate the quickstart spec on the embedded digits data
quickstart: $(STAMP)
	$(VENV)/bin/ditlab run experiments/quickstart.yaml

## pipeline: the DVC pipeline (dvc.yaml) on params.yaml; stages call `ditlab`, so the venv goes first on PATH
pipeline: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

## test: the whole test suite (unit tests, then end-to-end with Ray and an MLflow server)
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=15

## test-fast: the tests without Ray, DVC pipelines, MLflow servers or Inception passes over more than 20 images
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not e2e" --durations=10

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean-runs:
	rm -rf runs mlflow.db mlartifacts
