# Everything a fresh machine needs: python3, pip and make. The venv lives in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train daily example test lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default data: generate (first run) -> train -> checkpoint ->
# posterior summary -> score every row -> HTML report. Rerunning resumes from the last
# checkpoint and skips finished score parts. Overrides: make train ARGS="train.steps=5000"
RUN_DIR ?= runs/default
# Batches of 65,536 on the 1M default rows: minibatch noise biases hierarchical scales low (at
# the config's 4,096 the user scale settles 5% under exact inference's, at 65,536 1.5%), and the
# run converges by ~1,200 steps (benchmarks/results/main_job_convergence.md). The config keeps
# 4,096, which any dataset of more rows than that can run.
MAIN_JOB ?= data.batch_size=65536 train.steps=1500
train: $(STAMP)
	$(BIN)/blayers-train run_dir=$(RUN_DIR) $(MAIN_JOB) $(ARGS)
	$(BIN)/blayers-summary run_dir=$(RUN_DIR)
	$(BIN)/blayers-score run_dir=$(RUN_DIR)
	$(BIN)/blayers-report $(RUN_DIR)
	@echo "results in $(RUN_DIR): checkpoints/ metrics.jsonl summary.csv scores/ report.html"

# Three days of drifting data with new users each day, trained day by day (init_from), against
# a model frozen on day 1 (train/daily.py); runs in runs/daily
daily: $(STAMP)
	$(BIN)/python -m train.daily

example: $(STAMP)
	$(BIN)/python -m blayers.examples.regression

# One worker per core (at most 4); a file's tests stay on one worker, so its module-scoped fits
# are made once.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 --dist loadfile --durations=25 tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache
