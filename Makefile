# `make run` serves the embedded default model on port 5001; `make test` runs every check.
# Both create the virtual environment in .venv and install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install run test lint clean

install: $(INSTALLED)

$(INSTALLED): requirements.txt requirements-dev.txt
	@$(PYTHON) -m venv $(VENV) || { echo "Cannot create a virtual environment: apt-get install python3-venv"; exit 1; }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

run: install
	$(BIN)/gunicorn -c gunicorn.conf.py 'main:create_app()'

lint: install
	$(BIN)/flake8

test: lint
	$(BIN)/pytest --cov=. --cov-report=term --cov-report=html $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) htmlcov .coverage .pytest_cache
