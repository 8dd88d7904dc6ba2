# Two commands do all set-up on a fresh machine (Python 3.11+ and make):
#   make run    create .venv, install, start the demo (built-in broker, stations, stand-in ERP)
#   make test   create .venv, install with test extras, ensure mosquitto, run the whole suite

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: run test soak faults lint bench schema lock clean help

help:
	@echo "make run     start the demo gateway (Ctrl-C to stop)"
	@echo "make test    run the test suite (short soak form; EDGE_SOAK=1 for the long one)"
	@echo "make soak    run only the long soak tests"
	@echo "make faults  run the long fault campaign (500 kill -9 cycles and the long forms of every fault, ~1.5 h)"
	@echo "make lint    ruff + mypy"
	@echo "make bench   run the benchmarks and regenerate BENCHMARKS.md's tables (BENCH_QUICK=1: smoke run)"
	@echo "make schema  regenerate config/edge.schema.json"
	@echo "make lock    re-resolve the arm64 image's dependency locks (requirements/; LOCK_FLAGS=--upgrade)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[demo]'
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,demo]'
	@touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(BIN)/pip install --quiet -e '.[test,demo,bench]'
	@touch $@

# the demo takes its stand-in ERP down for 20 s after 20 s, so the backlog grows and drains;
# `make run DEMO_ARGS=` runs it without the outage
DEMO_ARGS ?= --outage 20 --outage-at 20

run: $(VENV)/.installed-run
	$(BIN)/edge demo $(DEMO_ARGS)

.PHONY: mosquitto
mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then :; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing mosquitto (needed by the MQTT tests)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto; \
	else \
		echo "mosquitto is needed by the MQTT tests and is not installed."; \
		echo "Install it with: sudo apt-get install mosquitto   (or your distribution's package)"; \
		exit 1; \
	fi

# nats-server: tests that must stop a JetStream server start a private one on a free port
.PHONY: nats-server
nats-server:
	@if command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; then :; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing nats-server (needed by the JetStream tests)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server; \
	else \
		echo "nats-server is needed by the JetStream tests and is not installed."; \
		echo "Install it with: sudo apt-get install nats-server   (or your distribution's package)"; \
		exit 1; \
	fi

.PHONY: faketime
faketime:
	@if [ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || \
	    [ -e /usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1 ]; then :; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing faketime (needed by the clock-step fault tests)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime; \
	else \
		echo "faketime is not installed: the clock-step fault tests will be skipped."; \
		echo "Install it with: sudo apt-get install faketime"; \
	fi

# chromium: the status page is tested in a real headless browser
.PHONY: chromium
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (needed by the status page's browser tests)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
		echo "chromium is not installed: the status page's browser tests will be skipped."; \
		echo "Install it with: sudo apt-get install chromium"; \
	fi

test: $(VENV)/.installed-test mosquitto nats-server faketime chromium
	$(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS)

soak: $(VENV)/.installed-test mosquitto
	EDGE_SOAK=1 $(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# the long fault campaign (tests/faults/README.md); the JSON summary goes to
# EDGE_FAULT_REPORT (default fault-report.json), the seed is printed and can be replayed
# with EDGE_FAULT_SEED
EDGE_FAULT_CYCLES ?= 500
EDGE_FAULT_REPORT ?= fault-report.json
faults: $(VENV)/.installed-test mosquitto faketime
	EDGE_FAULT_CYCLES=$(EDGE_FAULT_CYCLES) EDGE_FAULT_REPORT=$(EDGE_FAULT_REPORT) \
		$(BIN)/python -m pytest -q -s --timeout 0 tests/faults $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check edge tests plugins bench
	$(BIN)/mypy edge

# every benchmark, then bench.report re-renders the generated tables of BENCHMARKS.md from
# bench/results/*.json (~45 min; BENCHMARKS.md "How to rerun" has the full forms).
# BENCH_QUICK=1: small sizes for a smoke run (a few minutes); its results and a rendered copy
# of BENCHMARKS.md go to build/bench-quick/, so smoke figures never replace the real ones.
BENCH_QUICK ?=
ifeq ($(BENCH_QUICK),1)
BENCH_RESULTS ?= build/bench-quick/results
BENCH_REPORT_ARGS = --results $(BENCH_RESULTS) --output build/bench-quick/BENCHMARKS.md
BENCH_ENQUEUE_ARGS = --events 10000 --single-commit-events 500
BENCH_DRAIN_ARGS = --events 10000 --batch-max 100 --per-event-events 1000
BENCH_RESTART_ARGS = --events 20000 --rounds 1
BENCH_INGEST_ARGS = --messages 5000 --rounds 1
BENCH_LATENCY_ARGS = --seconds 5
BENCH_OPCUA_ARGS = --items 200 --seconds 5 --warmup 2
BENCH_NATS_ARGS = --events 2000
BENCH_RELAY_ARGS = --events 2000
BENCH_BLIP_ARGS = --rounds 1
BENCH_HOLD_ARGS = --failures 30
BENCH_CPU_ARGS = --quick
BENCH_SOAK_ARGS = --minutes 1
BENCH_OTHER_ARGS = --quick
else
BENCH_RESULTS ?= bench/results
BENCH_REPORT_ARGS = --results $(BENCH_RESULTS)
BENCH_ENQUEUE_ARGS = --events 100000
# the pre-filled 1M backlog takes minutes to build: kept between runs (per schema version)
BENCH_DRAIN_ARGS = --events 100000,1000000 --cache build/bench-cache
BENCH_RESTART_ARGS = --events 1000000 --cache build/bench-cache
BENCH_INGEST_ARGS = --messages 30000
BENCH_LATENCY_ARGS =
BENCH_OPCUA_ARGS = --items 1000
BENCH_NATS_ARGS = --events 20000
BENCH_RELAY_ARGS = --events 20000
BENCH_BLIP_ARGS = --rounds 3
BENCH_HOLD_ARGS =
BENCH_CPU_ARGS = --seconds 60
BENCH_SOAK_ARGS = --minutes 10
BENCH_OTHER_ARGS =
endif

bench: export EDGE_BENCH_RESULTS = $(abspath $(BENCH_RESULTS))
bench: $(VENV)/.installed-bench mosquitto
	$(BIN)/python -m bench.bench_outbox_enqueue $(BENCH_ENQUEUE_ARGS)
	$(BIN)/python -m bench.bench_drain $(BENCH_DRAIN_ARGS)
	$(BIN)/python -m bench.bench_restart $(BENCH_RESTART_ARGS)
	$(BIN)/python -m bench.bench_mqtt_ingest $(BENCH_INGEST_ARGS)
	$(BIN)/python -m bench.bench_latency $(BENCH_LATENCY_ARGS)
	$(BIN)/python -m bench.bench_opcua $(BENCH_OPCUA_ARGS)
	$(BIN)/python -m bench.bench_nats_sink $(BENCH_NATS_ARGS)
	$(BIN)/python -m bench.bench_relay $(BENCH_RELAY_ARGS)
	$(BIN)/python -m bench.bench_opcua_blip $(BENCH_BLIP_ARGS)
	$(BIN)/python -m bench.bench_local_hold $(BENCH_HOLD_ARGS)
	$(BIN)/python -m bench.bench_http_clients $(BENCH_OTHER_ARGS)
	$(BIN)/python -m bench.bench_adaptive $(BENCH_OTHER_ARGS)
	$(BIN)/python -m bench.bench_cpu $(BENCH_CPU_ARGS)
	$(BIN)/python -m bench.bench_soak $(BENCH_SOAK_ARGS)
	$(if $(filter 1,$(BENCH_QUICK)),mkdir -p build/bench-quick && cp BENCHMARKS.md build/bench-quick/)
	$(BIN)/python -m bench.report $(BENCH_REPORT_ARGS)

schema: $(VENV)/.installed-run
	$(BIN)/edge print-schema > config/edge.schema.json

# The arm64 image's dependency locks (docs/container.md, "Dependency lock"): pyproject's
# runtime dependencies and its build requirements, resolved for CPython 3.11 on linux
# aarch64 with every file's hash, by uv in a throwaway venv (not a project dependency).
# Existing pins are kept where pyproject still allows them; LOCK_FLAGS=--upgrade takes the
# newest allowed versions.
LOCK_FLAGS ?=
LOCK_ARGS = --quiet --python-version 3.11 --python-platform aarch64-manylinux2014 \
	--generate-hashes --custom-compile-command "make lock" $(LOCK_FLAGS)
lock:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv "$$tmp" && "$$tmp/bin/pip" install --quiet 'uv>=0.5' && \
	"$$tmp/bin/uv" pip compile pyproject.toml $(LOCK_ARGS) -o requirements/linux-aarch64.lock && \
	$(PYTHON) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
	| "$$tmp/bin/uv" pip compile - $(LOCK_ARGS) -o requirements/build.lock

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
