# Two commands set everything up on a fresh machine: `make features` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?= data/flower_photos
OUT    ?= data/features
LAYER  ?= fc7
WEIGHTS ?= imagenet
FEATURE_ARGS ?=

.PHONY: install features test bench clean

# Reinstalled only when pyproject.toml changes.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

# Install, fetch the flowers when missing, then extract every split (a no-op when nothing changed).
features: $(BIN)/.installed
	test -d $(DATA) || $(BIN)/flowerfeat download --out $(DATA)
	$(BIN)/flowerfeat features --data $(DATA) --out $(OUT) --layer $(LAYER) --weights $(WEIGHTS) $(FEATURE_ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

BENCH_ARGS ?= --data $(DATA) --weights $(WEIGHTS) --layer $(LAYER) --limit 64
bench: $(BIN)/.installed
	$(BIN)/flowerfeat bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
