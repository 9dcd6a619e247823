#!/usr/bin/env bash
# Starts the local PostgreSQL and RabbitMQ if they are installed but not running,
# and waits until both answer. Does nothing where they already run.
set -euo pipefail

wait_for() {
    local what=$1; shift
    for _ in $(seq 1 60); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    echo "ensure-services: $what did not come up within 60 s" >&2
    return 1
}

if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
    if command -v pg_ctlcluster >/dev/null 2>&1; then
        echo "ensure-services: starting PostgreSQL"
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    fi
    wait_for PostgreSQL pg_isready -h 127.0.0.1 -p 5432
fi

amqp_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! amqp_up; then
    if command -v rabbitmq-server >/dev/null 2>&1; then
        echo "ensure-services: starting RabbitMQ"
        rabbitmq-server -detached || true
    fi
    wait_for RabbitMQ amqp_up
fi
