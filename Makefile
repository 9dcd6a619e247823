# The README's commands. `make demo` and `make test` are the whole set-up.
CARGO ?= cargo
BIN := target/debug/voip-push-worker

.PHONY: demo test lint fmt build run migrate apns-sim services

## The main job end to end on this machine: migrate, simulator, device, call, result, metrics.
demo: services
	$(CARGO) build --quiet
	$(BIN) demo

## The whole suite: formatting, lints, unit and integration tests (real RabbitMQ, Postgres, TLS/HTTP/2).
test: services lint
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --no-fail-fast; \
	else \
		$(CARGO) test --no-fail-fast; \
	fi

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

build:
	$(CARGO) build --release

run:
	$(CARGO) run --release -- run

migrate:
	$(CARGO) run --quiet -- migrate

apns-sim:
	$(CARGO) run --quiet -- apns-sim --ca-out target/apns-sim-ca.pem

## Starts PostgreSQL and RabbitMQ if this machine has them installed but stopped.
services:
	@scripts/ensure-services.sh
