# make setup | test | demo | lint | bench  (see README.md)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts libportaudio2 \
	cmake g++ libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev zlib1g-dev libbz2-dev liblzma-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup apt test demo lint bench clean

setup: $(STAMP) apt $(VENV)/bin/lmplz

# KenLM's lmplz and build_binary, for `asr lm` (built from source: they are not on PyPI).
$(VENV)/bin/lmplz: | $(STAMP) apt
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/build_kenlm.sh $(VENV)/bin

# Re-installs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing apt packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

# one pytest worker a core, at most 8 (pytest-xdist): 3.5 min against 5.4 serially on 2 cores
test: setup
	$(PY) -m pytest -q -n auto --maxprocesses 8

demo: setup
	bash scripts/demo.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) bench/transcribe_cpu.py

clean:
	rm -rf build .pytest_cache .ruff_cache
