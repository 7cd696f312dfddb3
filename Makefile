# The two Quickstart commands. Each creates .venv when missing and reuses it when present.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: demo test

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@rm -f $(VENV)/.installed-*; touch $@

demo: $(STAMP)
	$(VENV)/bin/python scripts/demo.py

# pytest exits 5 when it collects no test, so an empty run fails here too.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
