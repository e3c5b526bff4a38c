# samba-bids: the two commands a newcomer runs on a fresh clone.
#   make demo   install everything, generate the demo dataset, run participant + group levels
#   make test   install everything and run the test suite
# Every install uses constraints.txt (the tested versions; torch==2.13.0 CPU build).

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
DEMO   ?= demo
# Group-level training of the demo: 3 subjects x 5 min (sub-04 is EEG-only and gets a prediction).
DEMO_TRAIN ?= --epochs 60 --learning-rate 0.003 --mc-dropout 10

.PHONY: install demo test benchmark clean-demo lint slurm-deps report-deps docker apptainer

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] >= (3, 11), "Python 3.11 or newer is required"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[test]"
	touch $@

demo: install
	$(BIN)/samba-bids-demo $(DEMO)/bids --subjects 4 --minutes 5 --eeg-only 04 --overwrite
	$(BIN)/samba-bids $(DEMO)/bids $(DEMO)/out participant -w $(DEMO)/work \
		--config-file $(DEMO)/bids_groundtruth/samba-bids-demo.toml --participant-label 01 02 03
	$(BIN)/samba-bids $(DEMO)/bids $(DEMO)/out group -w $(DEMO)/work \
		--config-file $(DEMO)/bids_groundtruth/samba-bids-demo.toml $(DEMO_TRAIN)
	$(BIN)/samba-bids $(DEMO)/bids $(DEMO)/out participant -w $(DEMO)/work \
		--config-file $(DEMO)/bids_groundtruth/samba-bids-demo.toml --participant-label 04 \
		--model-file $(DEMO)/out/group/model-samba_direction-ephys2fmri_model.json --mc-dropout 10
	$(BIN)/python -m samba_pipeline.simulate.score $(DEMO)/out $(DEMO)/bids_groundtruth
	@echo "Demo outputs: $(DEMO)/out (ground truth: $(DEMO)/bids_groundtruth)"

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

benchmark: install
	$(BIN)/python benchmarks/participant_speed.py

lint: install
	$(BIN)/python -m ruff check samba_pipeline workflows tests benchmarks

clean-demo:
	rm -rf $(DEMO)

# Debian/Ubuntu packages for tests/test_slurm.py (a one-node SLURM cluster on localhost; root).
slurm-deps:
	apt-get update
	apt-get install -y --no-install-recommends slurm-wlm munge

# Headless Chromium for tests/test_reports.py (skipped without it).
report-deps:
	apt-get update
	apt-get install -y --no-install-recommends chromium

# Container images (README.md, section "Running on a cluster").
IMAGE_VERSION = $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' samba_pipeline/__about__.py)
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu

docker:
	docker build -f containers/Dockerfile --build-arg VERSION=$(IMAGE_VERSION) \
		--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL) -t samba-bids:$(IMAGE_VERSION) .

apptainer:
	apptainer build --build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL) \
		samba-bids_$(IMAGE_VERSION).sif containers/samba-bids.def
