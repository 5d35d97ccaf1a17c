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

# The tests also run the Segment Anything presets against the official generators: the sam and
# sam2 extras. sam2 is a source distribution whose build imports torch, so it builds without
# isolation, against the torch installed here (and without its optional CUDA extension).
install-test: $(VENV)/bin/activate
	$(PIP) install -q -c constraints.txt -e ".[test,sam]"
	$(PIP) install -q -c constraints.txt wheel setuptools
	SAM2_BUILD_CUDA=0 $(PIP) install -q -c constraints.txt --no-build-isolation -e ".[test,sam,sam2]"

demo: install
	$(VENV)/bin/segdist demo

# pytest exits 5 when it collected no tests: not a failure of the code. Two test processes
# (pytest-xdist, a test file per process at a time: module fixtures are made once): much of the
# suite waits on Ray, servers and subprocesses, so two share 2 cores well (tests/conftest.py gives
# each one torch thread). TEST_PROCS=0 runs in one process.
TEST_PROCS ?= 2
test: install-test
	$(PY) -m pytest -q -n $(TEST_PROCS) --dist loadfile tests; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) build *.egg-info
