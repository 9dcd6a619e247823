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

# The fault-injection suite raises a memory alarm by setting a tiny watermark and
# puts it back when it ends; a run killed in between would leave every publisher
# blocked. Undo only that (a watermark below 1%), never a deliberate setting.
if command -v rabbitmqctl >/dev/null 2>&1; then
    mark=$(rabbitmqctl environment 2>/dev/null | sed -n 's/.*{vm_memory_high_watermark,\([0-9.e-]*\)}.*/\1/p' | head -n1)
    if [ -n "$mark" ] && python3 -c "import sys; sys.exit(0 if float('$mark') < 0.01 else 1)" 2>/dev/null; then
        echo "ensure-services: RabbitMQ memory watermark was left at $mark; restoring 0.4"
        rabbitmqctl set_vm_memory_high_watermark 0.4 >/dev/null
    fi
fi
