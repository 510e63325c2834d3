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

.PHONY: demo test venv clean mutate

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

# Mutation testing (issue 19; not part of `make test`): mutmut mutates the modules whose numbers end up in a
# submission or a score ([tool.mutmut] in pyproject.toml) and runs their fast tests against each mutant, in a
# fresh mutants/ folder; of stages/classifier.py only the output activations. All of it (3,785 mutants) takes
# 45 minutes on an idle 2-core machine, far longer on a shared one; one module: make mutate MUTATE_SELECT='pneumomap.metrics.*'.
# The accepted survivors (message-only, equivalent) are listed in benchmarks/mutation_survivors.md.
MUTATE_SELECT := 'pneumomap.infer.ops.*' 'pneumomap.infer.writers.*' 'pneumomap.metrics.*' \
	'pneumomap.infer.tune.space.*' 'pneumomap.infer.tune.search.*' \
	'pneumomap.labels.*' 'pneumomap.score.*' 'pneumomap.stages.classifier.*ScoreStage*activation__mutmut_*' \
	'pneumomap.stages.classifier.*ScoreStage*ensemble_logits__mutmut_*' \
	'pneumomap.stages.classifier.*Classifier*class_index__mutmut_*' \
	'pneumomap.stages.classifier.*Classifier*probability_of__mutmut_*'

mutate: $(STAMP)
	rm -rf mutants && mkdir mutants
	$(BIN)/mutmut run --max-children 2 $(MUTATE_SELECT) > mutants/run.log 2>&1 || { tail -40 mutants/run.log; exit 1; }
	$(BIN)/mutmut results --all true | $(BIN)/python benchmarks/mutation_score.py \
		--accepted benchmarks/mutation_survivors.md | tee mutants/score.txt

clean:
	rm -rf $(VENV) runs
