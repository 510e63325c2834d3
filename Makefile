# The two commands of the README. Each sets up .venv itself when it is missing or stale.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch/torchvision pinned for the install (they resolve from local disk here); the package's
# own requirement ranges in pyproject.toml stay loose.
TORCH   := torch==2.14.1 torchvision==0.29.1
# the tests compare `pneumomap score` with the MIDRC organisers' scorer, which pins scikit-learn 1.5.1
SCORER  := scikit-learn==1.5.1
DEMO_OUT ?= runs/demo

.PHONY: demo test venv clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH) $(SCORER) -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/pneumomap demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs
