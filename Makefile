# Quick start: `make demo` and `make test` on a fresh clone, offline, CPU only.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := build/demo

.PHONY: setup demo test lint clean

# The serving tests drive the web page in Debian's Chromium (a browser download does not work here).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# torch is installed first and pinned to the CPU wheel: left to the resolver, a dependency asking
# for plain `torch` would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	rm -rf $(DEMO)
	$(BIN)/aotdiffusion tiny sd $(DEMO)/tiny-sd
	$(BIN)/aotdiffusion export --model $(DEMO)/tiny-sd --task stable-diffusion --batch-size 1 \
	  --height 64 --width 64 --num-images-per-prompt 1 --auto-cast matmul $(DEMO)/tiny-sd-aot
	HF_HUB_OFFLINE=1 $(BIN)/aotdiffusion generate $(DEMO)/tiny-sd-aot "a photo of an astronaut riding a horse on mars" \
	  --steps 20 --guidance-scale 7.5 --seed 0 --output $(DEMO)/images

$(CHROMIUM):
	$(SUDO) apt-get install -y -q chromium || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium)

test: setup $(CHROMIUM)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=40 -n 2 --dist loadfile tests

lint: setup
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

clean:
	rm -rf build $(VENV)
