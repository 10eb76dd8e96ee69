# Two commands do all the setup from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install jars redis chromium test unit demo bench bench-quick lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

# The Kafka broker jars, fetched through Maven into ~/.cache/refold (outside the repo).
jars: $(STAMP)
	$(BIN)/python -c "from refold.cli.broker import ensure_jars; print('kafka jars:', ensure_jars())"

# The whole suite against a real broker that the test session starts (or REFOLD_BOOTSTRAP_SERVERS).
# The dashboard test renders the page in Debian's Chromium (installed here when missing).
# TEST_PROCS pytest processes (pytest-xdist), each starting a broker of its own; most integration
# tests wait (for a rebalance, a restart, a deadline), so two halve the wall time on 2 cores. A
# module with a costly fixture (a cluster, the wheel) stays in one process: `xdist_group`.
TEST_PROCS ?= 2
test: jars chromium
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_PROCS) --dist loadgroup --durations=25

unit: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

demo: jars
	$(BIN)/refold demo

# Publish, rebuild (with the Faust peer), freshness and queries; then commands (its own report);
# then tasks beside Celery + Redis (needs Debian's redis-server) and a bare share-consumer loop;
# then lookups through a worker that forwards them against the owner asked directly;
# then sagas beside the same transfers sent as plain commands.
bench: jars redis
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.commands
	$(BIN)/python -m bench.tasks
	$(BIN)/python -m bench.routing
	$(BIN)/python -m bench.sagas

bench-quick: jars redis
	$(BIN)/python -m bench.run --quick
	$(BIN)/python -m bench.commands --commands 10000 --accounts 1000 --seconds 8
	$(BIN)/python -m bench.tasks --quick
	$(BIN)/python -m bench.routing --events 20000 --accounts 2000 --seconds 3 --repeats 2
	$(BIN)/python -m bench.sagas --quick

# The Celery peer's broker: Debian's redis-server, installed once when missing (apt, as root).
redis:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }

# Debian's headless Chromium for the dashboard test, installed once when missing (apt, as root);
# where apt cannot, that one test is skipped and says why.
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null; } || echo "chromium not installed: the page test will be skipped"

lint: $(STAMP)
	$(BIN)/ruff check streams projections tests bench
	$(BIN)/ruff format --check streams projections tests bench
	# mypy finds packages by folder name: check a copy installed under build/ (the repo's folders
	# are mapped into `refold` by package-dir, which only the import system understands).
	rm -rf build/typecheck
	$(BIN)/pip install -q --no-deps --target build/typecheck .
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p refold

clean:
	rm -rf $(VENV) .refold build *.egg-info
