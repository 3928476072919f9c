# The two commands of the README: `make demo` and `make test`. Both install what they need first.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all setup build demo demo-process demo-store test lint fuzz bench clean

all: build

setup:
	bash scripts/setup

build: setup
	$(CARGO) build --release -p ferry -p ferryd

# The main job: Redis in a Podman container, under a checking client, moved live between two
# lab nodes (each with its own Podman).
demo: build
	bash scripts/demo-migrate

# The same with Redis as a plain process tree.
demo-process: build
	RUNTIME=pid bash scripts/demo-migrate

# The secure store on one node: checkpoint, inspect, verify, restore.
demo-store: build
	bash scripts/demo

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Every test, privileged ones included (they need root and CRIU; under CI=true a missing
# prerequisite fails them instead of skipping).
test: setup
	bash scripts/test

# A short run of every fuzz target (FUZZ_SECONDS each, default 20).
fuzz: setup
	bash scripts/fuzz

bench: build
	bench/run

clean:
	$(CARGO) clean
