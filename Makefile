# Two commands do all set-up on a fresh machine (Python 3.11):
#   make demo   create/reuse .venv, generate (or take DATA=path) images, convert, inspect, train, evaluate
#   make test   create/reuse .venv and run the test suite (what CI runs)
#   make serve  serve the demo's run (RUN=path for another) on http://127.0.0.1:8080
# GPU box: make venv TF_WHEEL='tensorflow[and-cuda]~=2.21.0'   (see docs/workspace.md for TPU VMs)
# TensorFlow 2.20 (what Cloud TPU VMs get): make venv TF=2.20 VENV=.venv-tf220
# JPEG-LS / JPEG-lossless DICOM: make venv EXTRAS=dev,beam,dicom-jpeg   (GPL-3.0 decoder)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
# Supported: 2.20 and 2.21. tf-keras always takes TensorFlow's minor version.
TF ?= 2.21
TF_WHEEL ?= tensorflow-cpu~=$(TF).0
# pydicom comes with the package itself (setup.cfg install_requires).
EXTRAS ?= dev,beam
STAMP := $(VENV)/.xraytpu-installed

# Demo settings: DATA=path/to/class-per-folder images to use your own data.
DEMO ?= demo
DATA ?=
DEMO_IMAGES := $(if $(DATA),$(DATA),$(DEMO)/images)
# Small and quick on 2 CPU cores (~3 s an epoch): val AUC is ~0.97 after 2 epochs, 1.0 by 10.
DEMO_ARGS ?= --model=xray_cnn --image_size=64 --batch_size=16 --epochs=10 --learning_rate=3e-4

.PHONY: venv demo test clean-demo serve

venv: $(STAMP)

# The light CPU wheel by default. tf-keras declares a dependency on the full
# `tensorflow` wheel, so it is installed with --no-deps after the chosen wheel.
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TF_WHEEL)"
	$(PY) -m pip install -q --no-deps "tf-keras~=$(TF).0"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -c "import tensorflow as tf, tf_keras; print('TensorFlow', tf.__version__, '| tf_keras', tf_keras.__version__)"
	touch $@

demo: $(STAMP)
ifeq ($(DATA),)
	$(PY) -m tfrecord_tools.synthetic --output_dir=$(DEMO)/images --num_images=400 --overwrite
endif
	$(PY) -m tfrecord_tools.convert --input_dir=$(DEMO_IMAGES) --output_dir=$(DEMO)/tfrecords --max_side=256 --overwrite --quiet
	$(PY) -m tfrecord_tools.inspect $(DEMO)/tfrecords --grid=$(DEMO)/sample_grid.png
	$(PY) -m xraytpu.train --data_dir=$(DEMO)/tfrecords --model_dir=$(DEMO)/run $(DEMO_ARGS) --overwrite
	$(PY) -m xraytpu.evaluate --model_dir=$(DEMO)/run --split=test
	@echo; $(PY) -m xraytpu.summary $(DEMO)/run
	@echo
	@echo "Next:"
	@echo "  make serve                          the web page and JSON API on http://127.0.0.1:8080"
	@echo "  $(VENV)/bin/tensorboard --logdir=$(DEMO)/run/logs"
	@echo "  $(PY) -m xraytpu.predict --model_dir=$(DEMO)/run $(DEMO_IMAGES)   (a file or a folder)"
	@echo "  $(PY) -m xraytpu.export --model_dir=$(DEMO)/run                   (a SavedModel for TF Serving)"

# Serves the demo's run (or RUN=path): the web page, /v1/predict and TF Serving's REST API.
RUN ?= $(DEMO)/run
PORT ?= 8080

serve: $(STAMP)
	@test -f $(RUN)/config.json || { echo "no trained run in $(RUN): run make demo first (or make serve RUN=path)"; exit 2; }
	$(PY) -m xraytpu.serve --model_dir=$(RUN) --port=$(PORT)

# The web page's test drives a real headless browser: Debian's chromium (never a
# browser downloaded by a test tool). Installed here when missing (needs root).
CHROMIUM ?= /usr/bin/chromium

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || { echo "could not install chromium with apt-get"; exit 1; }; \
	else echo "the browser test needs Debian's chromium: sudo apt-get install -y chromium"; exit 1; fi

test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -x -q --durations=20

clean-demo:
	rm -rf $(DEMO)
