# Conveyor developer entry points. `make run` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
PROTO_FILES = $(shell find protos -name '*.proto' | sort)
SERVICE_PROTO_FILES = $(shell grep -l '^service ' $(PROTO_FILES))

.PHONY: install run test lint typecheck protos check-protos buf-lint buf-breaking unit clean \
	settings-doc

## install: create .venv (if missing) and install Conveyor with every extra and dev tool
install: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

$(BUF):
	npm install --prefix .tools --no-audit --no-fund --loglevel=error @bufbuild/buf@$(BUF_VERSION)

## run: start every service on localhost with embedded defaults, run a model's
## lifecycle through them (once per data directory), keep serving until Ctrl-C
run: install
	$(BIN)/conveyor up --lifecycle

## test: lint, type checks, contract checks and the whole test suite
test: install lint typecheck buf-lint check-protos
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check services shared tests bench setup.py
	$(BIN)/ruff format --check services shared tests bench setup.py

# mypy cannot see through the editable install's package-dir mapping, so it reads
# a link tree that lays out the `conveyor` package as installed (.typecheck/).
typecheck: install
	@rm -rf .typecheck && mkdir -p .typecheck/conveyor
	@for entry in protos/conveyor/*; do ln -s "$(CURDIR)/$$entry" .typecheck/conveyor/; done
	@ln -s "$(CURDIR)/shared" .typecheck/conveyor/shared
	@ln -s "$(CURDIR)/services" .typecheck/conveyor/services
	MYPYPATH=.typecheck $(BIN)/mypy -p conveyor.shared -p conveyor.services

buf-lint: $(BUF)
	$(BUF) lint
	$(BUF) format --diff --exit-code

## buf-breaking: compare the contracts with main (AGAINST=<git ref> to choose)
AGAINST ?= main
buf-breaking: $(BUF)
	$(BUF) breaking --against '.git#ref=$(AGAINST)'

## protos: regenerate _pb2.py, _pb2_grpc.py and .pyi stubs beside each .proto
protos: install
	@$(MAKE) --no-print-directory _generate OUT=protos
	@find protos/conveyor -name '*_pb2.py' -printf '%h\n' | sort -u | while read -r d; do \
	  while [ "$$d" != protos ]; do touch "$$d/__init__.py"; d=$$(dirname "$$d"); done; done

# Messages for every file; gRPC stubs only for the files that declare a service.
_generate:
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I protos \
	  --python_out=$(OUT) --mypy_out=quiet:$(OUT) $(PROTO_FILES)
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I protos \
	  --grpc_python_out=$(OUT) --mypy_grpc_out=quiet:$(OUT) $(SERVICE_PROTO_FILES)

## check-protos: fail when the committed generated code is not what the protos give
check-protos: install
	@tmp=$$(mktemp -d) && $(MAKE) --no-print-directory _generate OUT=$$tmp >/dev/null && \
	  diff -r -q -x '__init__.py' -x 'py.typed' -x '*.proto' -x '__pycache__' -x 'README.md' \
	    $$tmp/conveyor protos/conveyor && rm -rf $$tmp && echo "generated code is fresh" || \
	  { echo "generated code is stale: run 'make protos' and commit"; rm -rf $$tmp; exit 1; }

## settings-doc: regenerate README's configuration reference from the settings classes
settings-doc: install
	$(BIN)/python -m conveyor.services.settings_reference README.md

clean:
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache build *.egg-info
