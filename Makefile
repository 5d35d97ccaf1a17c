# The two commands of the README:
#   make demo   installs everything into .venv and runs the main job on the embedded default
#   make test   installs what the tests need into .venv and runs the whole suite
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python

.PHONY: install install-test demo test clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# constraints.txt pins every dependency to a set that was resolved and tested together: installs
# are reproducible and skip pip's slow backtracking (boto3 vs aiobotocore's botocore pin).
install: $(VENV)/bin/activate
	$(PIP) install -q -c constraints.txt -e .

install-test: $(VENV)/bin/activate
	$(PIP) install -q -c constraints.txt -e ".[test]"

demo: install
	$(VENV)/bin/segdist demo

# pytest exits 5 when it collected no tests: not a failure of the code.
test: install-test
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) build *.egg-info
