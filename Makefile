# The two commands a new machine needs: `make demo` and `make test`. Both install everything
# into .venv first (python3 >= 3.11 is the only prerequisite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo up test test-unit test-integration test-e2e test-brokers test-under-load chaos chaos-kafka mutate clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,rocksdb]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/orderpipe demo

up: install
	$(VENV)/bin/orderpipe up

# The unit tier once; the integration and e2e tiers once on each broker (BROKERS=kafka for one).
# Apache Kafka, and the Schema Registry of the login tests, are assembled from Maven Central on
# first use (needs Java 17+ and Maven).
BROKERS ?= embedded kafka
test: install
	$(PY) -m pytest tests/unit
	$(MAKE) --no-print-directory test-brokers

# The passes run side by side, each logging to .test-logs/<pass>.log (the Apache Kafka one in
# two, `kafka` and `kafka-only`, unless TEST_KAFKA_SPLIT=0; TEST_PARALLEL=0: one per broker, one
# after the other, output live);
# see tests/broker_passes.sh.
test-brokers: install
	@bash tests/broker_passes.sh $(PY) $(BROKERS)

# The integration and e2e tiers on each of BROKERS, UNDER_LOAD_RUNS times in a row, while a busy
# loop keeps every core busy (tests/under_load.sh): no test may depend on the machine's speed.
# TEST_PATHS picks files (e.g. TEST_PATHS=tests/integration/test_retries.py).
UNDER_LOAD_RUNS ?= 5
UNDER_LOAD_MAX_SECONDS ?= 14400
test-under-load: install
	@bash tests/under_load.sh $(UNDER_LOAD_RUNS) $(UNDER_LOAD_MAX_SECONDS) bash tests/broker_passes.sh $(PY) $(BROKERS)

test-unit: install
	$(PY) -m pytest tests/unit

test-integration: install
	$(PY) -m pytest tests/integration --broker $(firstword $(BROKERS))

test-e2e: install
	$(PY) -m pytest tests/e2e --broker $(firstword $(BROKERS))

# The crash test (tests/e2e/test_crash.py), longer: more orders, more SIGKILLs per process.
CHAOS_ORDERS ?= 2000
CHAOS_KILLS ?= 8
CHAOS_RATE ?= 20
chaos: install
	ORDERPIPE_CHAOS_ORDERS=$(CHAOS_ORDERS) ORDERPIPE_CHAOS_KILLS=$(CHAOS_KILLS) ORDERPIPE_CHAOS_RATE=$(CHAOS_RATE) \
		$(PY) -m pytest tests/e2e/test_crash.py

# Broker failures (tests/e2e/test_kafka_broker_failures.py), longer: a three-node local Apache
# Kafka whose nodes are SIGKILLed and restarted (CHAOS_KAFKA_KILLS times) and once frozen past the
# broker session timeout while orders flow. A fault takes 20-60 s here (a node restart is most of
# it), so pick kills x ~30 s ~ orders / rate; 1,000 orders and 10 kills took 7 minutes.
CHAOS_KAFKA_ORDERS ?= 1000
CHAOS_KAFKA_KILLS ?= 10
CHAOS_KAFKA_RATE ?= 3.5
chaos-kafka: install
	ORDERPIPE_CHAOS_ORDERS=$(CHAOS_KAFKA_ORDERS) ORDERPIPE_CHAOS_KILLS=$(CHAOS_KAFKA_KILLS) \
		ORDERPIPE_CHAOS_RATE=$(CHAOS_KAFKA_RATE) $(PY) -m pytest tests/e2e/test_kafka_broker_failures.py --broker kafka

# `make mutate`: mutation testing (mutmut) of the guarantee-critical modules with the unit tier,
# then the share killed per module (tests/mutation_report.py; exits 1 below MUTATE_TARGET %).
# Not part of `make test`: ~20 min here. Its own virtualenv: mutmut needs a newer click than
# faust-streaming declares. Configuration: [tool.mutmut] in pyproject.toml.
MUTATE_VENV ?= .venv-mutate
MUTATE_TARGET ?= 90
mutate: $(MUTATE_VENV)/.installed
	rm -rf mutants
	$(MUTATE_VENV)/bin/mutmut run --max-children $$(nproc)
	$(MUTATE_VENV)/bin/python tests/mutation_report.py $(MUTATE_TARGET)

$(MUTATE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(MUTATE_VENV)
	$(MUTATE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(MUTATE_VENV)/bin/python -m pip install --quiet -e '.[test,rocksdb]'
	$(MUTATE_VENV)/bin/python -m pip install --quiet mutmut==3.8.1
	touch $@

clean:
	rm -rf .data build *.egg-info .pytest_cache mutants

# `make bench`: the benchmark on the embedded broker (~20 min; BENCH_ARGS=--quick for ~6,
# BENCH_ARGS='--soak 300' for the 5-minute memory check), BENCH_ARGS='--broker kafka' on a local
# Apache Kafka (Java 17+ and Maven). Writes bench/results/ (latest.json, latest-kafka.json).
.PHONY: bench
bench: install $(VENV)/.bench-installed
	$(PY) -m bench.run $(BENCH_ARGS)

$(VENV)/.bench-installed: pyproject.toml
	$(PY) -m pip install --quiet -e '.[test,rocksdb,bench]'
	touch $@
