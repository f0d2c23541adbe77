# Jarvis: `make demo` runs the assistant on the bundled defaults, `make test` runs the
# suite. Both set everything up first when needed (scripts/setup.sh).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.jarvis-setup

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	@touch $(STAMP)

demo: setup
	$(PY) -m jarvis demo

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) scripts/test_latency.py --iterations 5
	$(PY) scripts/test_latency.py --concurrent --iterations 5
	$(PY) bench/cache_bench.py
	$(PY) bench/cache_bench.py --think-time 1
	$(PY) bench/attention_bench.py
	$(PY) bench/speech_bench.py
	$(PY) bench/voice_bench.py --compare-endpoint
	$(PY) bench/mqtt_bench.py
	$(PY) bench/dialogue_bench.py
	$(PY) bench/wakeword_bench.py
	$(PY) bench/echo_bench.py
	$(PY) bench/barge_in_bench.py
	$(PY) bench/build_bench.py
	$(PY) bench/batch_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
