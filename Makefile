# Two set-up commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates or reuses .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.coupled_ds-installed
# Second environment for the newest megatron-core (0.19, needs Python 3.12): `make test` runs the
# Megatron tests in it too.
PYTHON312 ?= $(shell for py in "env PYENV_VERSION=3.12.1 python3.12" python3.12; do \
	$$py -c 'import sys; print(sys.executable)' 2>/dev/null && break; done)
VENV312 ?= .venv312
PY312 := $(VENV312)/bin/python
STAMP312 := $(VENV312)/.coupled_ds-installed

.PHONY: demo test test-megatron312 venv312 bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: on these machines 2.13.0 is a local CPU build; an unpinned torch
	# would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[deepspeed,megatron,test,plot]'
	touch $(STAMP)

$(STAMP312): pyproject.toml constraints-py312.txt
	@test -n "$(PYTHON312)" || { echo "make: no Python 3.12 (tried PYENV_VERSION=3.12.1 \
	python3.12 and python3.12); megatron-core 0.19 needs it. Set PYTHON312=/path/to/python3.12" >&2; \
	exit 1; }
	$(PYTHON312) -m venv $(VENV312)
	$(PY312) -m pip install -q torch==2.13.0
	# emerging-optimizers: megatron-core's Muon (tested with muon_scalar_optimizer=coupled_adam)
	$(PY312) -m pip install -q -c constraints-py312.txt -e '.[megatron]' pytest emerging-optimizers
	touch $(STAMP312)

venv312: $(STAMP312)

demo: $(STAMP)
	$(PY) examples/demo.py

# The 3.12 environment installs in the background (mostly download) while the 3.11 suite runs;
# then the Megatron tests run again against megatron-core 0.19. A failed install fails the target.
test: $(STAMP)
	@$(MAKE) --no-print-directory venv312 > $(VENV312)-install.log 2>&1 & env312=$$!; \
	DS_ACCELERATOR=cpu $(PY) -m pytest -q tests; rc=$$?; \
	if ! wait $$env312; then \
		echo "make test: building $(VENV312) (Python 3.12, megatron-core 0.19) failed:" >&2; \
		tail -n 30 $(VENV312)-install.log >&2; exit 1; fi; \
	$(MAKE) --no-print-directory test-megatron312 || rc=1; exit $$rc

test-megatron312: $(STAMP312)
	DS_ACCELERATOR=cpu $(PY312) -m pytest -q tests/test_megatron.py

bench: $(STAMP)
	$(PY) bench/step_bench.py
	$(PY) bench/fsdp2_bench.py

clean-venv:
	rm -rf $(VENV) $(VENV312) $(VENV312)-install.log
