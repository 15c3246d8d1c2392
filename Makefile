# `make run` serves the embedded default model on port 5001; `make test` runs every check.
# Both create the virtual environment in .venv and install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# Where `make run` bakes and exports the model (the image uses /models).
MODELS_DIR ?= models

.PHONY: install run test lint unit browser container-check benchmark soak clean

install: $(INSTALLED)

$(INSTALLED): requirements-serve.txt requirements.txt requirements-dev.txt
	@$(PYTHON) -m venv $(VENV) || { echo "Cannot create a virtual environment: apt-get install python3-venv"; exit 1; }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

# Bake and export the configured model first (once: later runs check the export and keep it).
run: install
	MODELS_DIR=$(MODELS_DIR) $(BIN)/python download_models.py --no-download
	MODELS_DIR=$(MODELS_DIR) $(BIN)/gunicorn -c gunicorn.conf.py 'main:create_app()'

# Everything CI runs: lint, the unit, HTTP, fuzz and browser tests, then the container checks.
test: lint browser unit container-check

lint: install
	$(BIN)/flake8

# Debian's chromium for the /docs browser test (skipped, with the reason, when it cannot be installed).
browser:
	bash scripts/install_browser.sh || echo "chromium not installed: the /docs browser test will be skipped"

unit: install
	$(BIN)/pytest --cov=. --cov-report=term --cov-report=html $(PYTEST_ARGS)

# hadolint, the workflow schema, the manifests, then the real image built and run with podman,
# and the Kubernetes Deployment played on it with podman kube play.
container-check: install
	VENV=$(VENV) bash scripts/ci_container.sh

benchmark: install
	$(BIN)/python benchmark_embeddings.py --plot benchmark.png

soak: install
	$(BIN)/python soak_embeddings.py --minutes 10

clean:
	rm -rf $(VENV) htmlcov .coverage .pytest_cache $(MODELS_DIR)
