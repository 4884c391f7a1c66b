# The two commands of the README. Each creates the repo-local venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Pinned torch for this project's machines; pyproject.toml asks only for a range.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: quickstart test venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# make quickstart COMPARE=1 also trains dense and SMoE backbones at matched FLOPs
quickstart: $(STAMP)
	$(PY) scripts/quickstart.py $(if $(filter-out 0,$(COMPARE)),--compare,) $(QUICKSTART_ARGS)

clean:
	rm -rf $(VENV) runs
