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

.PHONY: install system-tools demo test serve bench clean loadtest lock

$(INSTALLED): pyproject.toml requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -r requirements.txt -e '.[builder,serve,test]'
	touch $@

install: $(INSTALLED)

# constraints.txt anew: the newest releases that pyproject.toml allows (torch and torchvision as requirements.txt
# pins them), resolved in a scratch environment.
# Run `make test` before committing the new file.
LOCK_VENV := .cache/lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt -e '.[builder,serve,test]'
	{ grep '^#' constraints.txt; $(LOCK_VENV)/bin/pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

# Optional validators for the deployment files (docker-compose config, promtool), from Debian's packages.
# `make test` never installs system packages: without these, the tests that need them skip and say why.
system-tools:
	@if ! command -v docker-compose >/dev/null || ! command -v promtool >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      docker-compose prometheus >/dev/null) || echo "system-tools: could not install docker-compose/promtool"; \
	  fi; \
	fi

demo: install
	$(VENV)/bin/builder train --dataset digits --epochs $(EPOCHS) --out $(RUN)
	$(VENV)/bin/builder export --checkpoint $(RUN)/best.pt
	$(VENV)/bin/builder publish --onnx $(RUN)/model.onnx --name $(MODEL) --repository $(REPOSITORY)
	$(PY) -m stack.demo --model $(MODEL) --repository $(REPOSITORY)

# Two processes: the real-stack tests in one, in order, the rest beside them (tests/conftest.py says why).
# The slowest tests are listed at the end of every run: where the suite's time goes.
PYTEST_ARGS ?= -n 2 --dist loadgroup --durations=25

# Lint, format and type checks first (seconds), then the tests.
test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest $(PYTEST_ARGS)

# More options: BENCH_ARGS='--model near-free --workers 1 2 --concurrency 8 32' (one gateway per worker count).
bench: install
	$(PY) -m benchmarks.gateway --duration $(or $(BENCH_SECONDS),6) --rounds $(or $(BENCH_ROUNDS),3) $(BENCH_ARGS)

# Triton and the gateway on 127.0.0.1; GATEWAY_HOST=0.0.0.0 with GATEWAY_API_KEYS to serve other hosts.
serve: install
	$(PY) -m stack --repository $(REPOSITORY)

clean:
	rm -rf .cache runs .pytest_cache

# Headless locust against the running stack (or one started for the run), report in loadtests/reports/<timestamp>/.
# More options (thresholds, the saturation ramp): LOADTEST_ARGS='--max-p99-ms 300 --fail-ratio 0.001' or '--ramp'.
USERS ?= 8
SPAWN_RATE ?= 4
DURATION ?= 30s
TARGET ?= gateway
loadtest: install
	$(PY) -m loadtests.run --users $(USERS) --spawn-rate $(SPAWN_RATE) --duration $(DURATION) --target $(TARGET) \
	  --model $(MODEL) --repository $(REPOSITORY) $(LOADTEST_ARGS)

# Faults under steady load against a stack of its own (README, "Benchmarks and load tests"); exit 1 when an
# invariant breaks. Report in loadtests/reports/<timestamp>/chaos.md. More options: CHAOS_ARGS='--duration 10'.
.PHONY: chaos
chaos: install
	$(PY) -m loadtests.chaos $(CHAOS_ARGS)

# Leak hunt against a stack of its own: 20,000 mixed requests (some bad) after a warm-up, the gateway's RSS, fds,
# threads and shared-memory slots sampled; exit 1 when they do not come back. Report in loadtests/reports/<timestamp>/
# soak.md. More options: SOAK_ARGS='--requests 50000 --max-rss-growth 0.05'.
.PHONY: soak
soak: install
	$(PY) -m loadtests.soak $(SOAK_ARGS)

# The GPU acceptance kit (README, "GPU check"): every GPU path on this machine's GPU, one table. No install
# step: it runs from a bare copy of the source tree with the venv's Python where there is one, else $(PYTHON).
.PHONY: gpu-check
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m builder.gpu_check
