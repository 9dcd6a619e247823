# The README's commands. `make demo` and `make test` are the whole set-up.
CARGO ?= cargo
BIN := target/debug/voip-push-worker

.PHONY: demo test test-faults tools lint check-ops fmt build run migrate apns-sim services bench

## The main job end to end on this machine: migrate, simulator, device, call, result, metrics.
demo: services
	$(CARGO) build --quiet
	$(BIN) demo

## The whole suite: formatting, lints, ops checks, unit and integration tests
## (real RabbitMQ, Postgres, TLS/HTTP/2), then the fault-injection tests.
test: services tools lint check-ops
	@$(CARGO) nextest --version >/dev/null 2>&1 || { echo "make test needs cargo-nextest: cargo install --locked cargo-nextest" >&2; exit 2; }
	$(CARGO) nextest run --no-fail-fast
	$(MAKE) --no-print-directory test-faults

## Fault injection (kill -9, broker connections closed, Postgres restart, black-holed
## APNs path, duplicates, fuzz): restarts shared services, so runs alone, serially.
test-faults: services
	$(CARGO) nextest run --profile faults --no-fail-fast

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

## Alert rules (promtool), Kubernetes manifests (kustomize + schemas), compose file.
check-ops:
	scripts/check-ops.sh

fmt:
	$(CARGO) fmt

build:
	$(CARGO) build --release

## End-to-end benchmark on this machine (README, "Benchmark"): release build, the APNs
## simulator, real RabbitMQ and Postgres, worker processes. Table on stdout, JSON in
## target/bench/report.json; a few minutes, stops by itself.
bench: services
	$(CARGO) build --release --bins
	target/release/voip-push-bench

run:
	$(CARGO) run --release -- run

migrate:
	$(CARGO) run --quiet -- migrate

apns-sim:
	$(CARGO) run --quiet -- apns-sim --ca-out target/apns-sim-ca.pem

## Installs promtool, kubectl, kubernetes-validate and cargo-nextest where missing.
tools:
	@scripts/ensure-tools.sh

## Starts PostgreSQL and RabbitMQ if this machine has them installed but stopped.
services:
	@scripts/ensure-services.sh
