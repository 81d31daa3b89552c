# Quick start: `make demo` runs the whole job end to end; `make test` runs the test suite.
# Both create .venv and install everything they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
MODEL ?= digits
REPOSITORY ?= model_repository
RUN ?= runs/demo
EPOCHS ?= 6

.PHONY: install demo test serve bench clean

$(INSTALLED): pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -e '.[builder,serve,test]'
	touch $@

install: $(INSTALLED)

demo: install
	$(VENV)/bin/builder train --dataset digits --epochs $(EPOCHS) --out $(RUN)
	$(VENV)/bin/builder export --checkpoint $(RUN)/best.pt
	$(VENV)/bin/builder publish --onnx $(RUN)/model.onnx --name $(MODEL) --repository $(REPOSITORY)
	$(PY) -m server.demo --model $(MODEL) --repository $(REPOSITORY)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) -m benchmarks.gateway --duration $(or $(BENCH_SECONDS),10)

serve: install
	$(PY) -m server --repository $(REPOSITORY)

clean:
	rm -rf .cache runs .pytest_cache
