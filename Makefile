# fhirmesh — one command per task. `make help` lists them.
CARGO ?= cargo

.PHONY: help run build test lint fmt bench bench-micro gen-fhir-data

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

run: ## run the embedded server on 127.0.0.1:8080, data under ./data
	$(CARGO) run --release -p fhirmesh -- serve

build: ## build the release binary (target/release/fhirmesh)
	$(CARGO) build --release -p fhirmesh

test: ## run every test (unit, HTTP, process, spec examples)
	$(CARGO) test --workspace --locked

lint: ## formatting and clippy, warnings are errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

bench: ## the standard benchmark suite against a fresh embedded server (≈5 min) → bench-results/
	bash tools/bench/standard.sh

bench-micro: ## criterion micro-benchmarks of the hot paths (validation, extraction, query parsing, SQLite writes)
	$(CARGO) bench -p fhirmesh-fhir -p fhirmesh-store-sqlite --locked

fmt: ## format the code
	$(CARGO) fmt --all

gen-fhir-data: ## regenerate crates/fhir/data from the pinned npm packages (needs npm)
	python3 tools/gen-fhir-data/gen_fhir_data.py
