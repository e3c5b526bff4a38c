# samba-bids: the two commands a newcomer runs on a fresh clone.
#   make demo   install everything, generate the demo dataset, run participant + group levels
#   make test   install everything and run the test suite
# Every install uses constraints.txt (the tested versions; torch==2.13.0 CPU build).

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
DEMO   ?= demo

.PHONY: install demo test benchmark clean-demo lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] >= (3, 11), "Python 3.11 or newer is required"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[test]"
	touch $@

demo: install
	$(BIN)/samba-bids-demo $(DEMO)/bids --subjects 2 --minutes 5 --overwrite
	$(BIN)/samba-bids $(DEMO)/bids $(DEMO)/out participant -w $(DEMO)/work \
		--config-file $(DEMO)/bids_groundtruth/samba-bids-demo.toml
	$(BIN)/samba-bids $(DEMO)/bids $(DEMO)/out group -w $(DEMO)/work \
		--config-file $(DEMO)/bids_groundtruth/samba-bids-demo.toml
	@echo "Demo outputs: $(DEMO)/out (ground truth: $(DEMO)/bids_groundtruth)"

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

benchmark: install
	$(BIN)/python benchmarks/participant_speed.py

lint: install
	$(BIN)/python -m ruff check samba_pipeline workflows tests benchmarks

clean-demo:
	rm -rf $(DEMO)
