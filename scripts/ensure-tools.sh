#!/usr/bin/env bash
# Installs what `make test` needs beyond the Rust toolchain, only where missing:
# promtool, kubectl and socat (Debian packages), kubernetes-validate (PyPI, offline
# schemas) and cargo-nextest (crates.io). Does nothing where all are present.
set -euo pipefail

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v kubectl >/dev/null 2>&1 || missing+=(kubectl)
# The TLS tests put socat in front of RabbitMQ.
command -v socat >/dev/null 2>&1 || missing+=(socat)
if [ ${#missing[@]} -gt 0 ]; then
    echo "ensure-tools: installing ${missing[*]}"
    # Only the tools are wanted: keep the packages' services from starting (their
    # ports, 9090 and others, must stay free).
    added_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        added_policy=1
    fi
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    if [ -n "$added_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
if ! python3 -c 'import kubernetes_validate, yaml' >/dev/null 2>&1; then
    echo "ensure-tools: installing kubernetes-validate"
    python3 -m pip install --quiet 'kubernetes-validate==1.37.0' pyyaml
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "ensure-tools: installing cargo-nextest"
    cargo install --locked cargo-nextest
fi
