# The two Quickstart commands. Each creates .venv when missing and reuses it when present.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: demo test bench

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@rm -f $(VENV)/.installed-*; touch $@

demo: $(STAMP)
	$(VENV)/bin/python scripts/demo.py

# pytest exits 5 when it collects no test, so an empty run fails here too.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# Not a Quickstart command: the speed benchmark against diffusers (README, Speed). Its reference packages live
# in a second environment, .venv-ref, so that .venv never holds them. BENCH_ARGS adds flags, e.g.
# BENCH_ARGS="--parts unet --rounds 1" for a two-minute run.
REF := .venv-ref
REF_STAMP := $(REF)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

$(REF_STAMP): pyproject.toml
	@test -x $(REF)/bin/python || $(PYTHON) -m venv $(REF)
	$(REF)/bin/python -m pip install -q --disable-pip-version-check -e '.[test,ref]'
	@rm -f $(REF)/.installed-*; touch $@

bench: $(REF_STAMP)
	$(REF)/bin/python scripts/bench.py --device cpu $(BENCH_ARGS)
