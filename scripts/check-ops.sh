#!/usr/bin/env bash
# Checks the operations files without a cluster or Docker engine:
#   1. the PrometheusRule is generated from deploy/monitoring/alerts.rules.yml;
#   2. promtool check rules, then promtool test rules (deploy/monitoring/alerts.test.yml);
#   3. kubectl kustomize builds the base and each overlay, and every object is valid:
#      built-in kinds with kubernetes-validate (offline schemas), our custom
#      resources and the references between objects with scripts/validate-manifests.py;
#   4. docker-compose.yml parses and its mounts and images are the ones we ship.
# The metric names and labels used by the alerts and the dashboard are checked
# against a running worker by the integration test tests/it/ops/.
set -euo pipefail
cd "$(dirname "$0")/.."

# The oldest Kubernetes the manifests must be valid for.
KUBERNETES_VERSION=${KUBERNETES_VERSION:-1.30.0}

for tool in promtool kubectl python3; do
    command -v "$tool" >/dev/null || { echo "check-ops: $tool is missing (make tools installs it)" >&2; exit 1; }
done
python3 -c 'import kubernetes_validate, yaml' 2>/dev/null \
    || { echo "check-ops: python module kubernetes-validate is missing (make tools installs it)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "check-ops: PrometheusRule up to date with alerts.rules.yml"
python3 scripts/gen-prometheusrule.py --check

echo "check-ops: promtool"
promtool check rules deploy/monitoring/alerts.rules.yml
promtool test rules deploy/monitoring/alerts.test.yml

for dir in deploy/base deploy/overlays/example deploy/overlays/example-hpa; do
    echo "check-ops: kubectl kustomize $dir"
    kubectl kustomize "$dir" > "$work/build.yaml"
    flags=()
    [ "$dir" = deploy/base ] && flags+=(--secrets-external)
    python3 scripts/validate-manifests.py --kubernetes-version "$KUBERNETES_VERSION" "${flags[@]}" "$work/build.yaml"
done

echo "check-ops: docker-compose.yml"
python3 - <<'PY'
import json, pathlib, sys, yaml
compose = yaml.safe_load(pathlib.Path("docker-compose.yml").read_text())
services = compose["services"]
errors = []
for want in ("rabbitmq", "postgres", "migrate", "apns-sim", "worker", "prometheus", "grafana"):
    if want not in services:
        errors.append(f"service {want} is missing")
for name, svc in services.items():
    for vol in svc.get("volumes", []):
        src = vol.split(":")[0]
        if src.startswith("./") and src != "./secrets" and not pathlib.Path(src).exists():
            errors.append(f"{name}: mounts {src}, which does not exist")
        elif not src.startswith(("./", "/")) and src not in (compose.get("volumes") or {}):
            errors.append(f"{name}: named volume {src} is not declared")
    for dep in svc.get("depends_on", {}):
        if dep not in services:
            errors.append(f"{name}: depends on unknown service {dep}")
worker = services.get("worker", {})
if worker.get("command") != ["run"] or services.get("migrate", {}).get("command") != ["migrate"]:
    errors.append("worker must run `run` and migrate `migrate`")
env = worker.get("environment", {})
if env.get("VPW__APNS__PRODUCTION_URL") != "https://apns-sim:2197" or not env.get("VPW__APNS__CA_FILE"):
    errors.append("the worker must point at the simulator and trust its CA")
prom = yaml.safe_load(pathlib.Path("deploy/compose/prometheus.yml").read_text())
if not any(j["job_name"] == "voip-push-worker" for j in prom["scrape_configs"]):
    errors.append("compose Prometheus must scrape job voip-push-worker (the alerts use it)")
json.loads(pathlib.Path("deploy/monitoring/grafana-dashboard.json").read_text())
for e in errors:
    print(f"  ✗ {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY

echo "check-ops: all passed"
