# Two commands from a fresh clone:
#   make repro   create .venv if missing, then run the whole pipeline (dvc repro)
#   make test    create .venv if missing, then run the test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# Stage commands in dvc.yaml call `python`: make it the environment's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: venv repro test clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check --no-cache-dir -e '.[dev]'
	touch $@

repro: venv
	dvc repro

test: venv
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

clean:
	rm -rf data/prepared models results checkpoints reports/figures reports/report.md reports/report.html
