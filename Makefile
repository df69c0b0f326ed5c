# Two set-up commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates or reuses .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.coupled_ds-installed

.PHONY: demo test bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: on these machines 2.13.0 is a local CPU build; an unpinned torch
	# would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[deepspeed,megatron,test,plot]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/step_bench.py
	$(PY) bench/fsdp2_bench.py

clean-venv:
	rm -rf $(VENV)
