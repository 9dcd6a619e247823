#!/usr/bin/env python3
"""Validates the output of `kubectl kustomize` for the worker's manifests.

usage: validate-manifests.py --kubernetes-version 1.30 [--secrets-external] BUILD.yaml

- Built-in kinds are validated by kubernetes-validate against its bundled (offline)
  OpenAPI schemas for that Kubernetes version, in strict mode (unknown fields fail).
- The custom resources we use (ServiceMonitor, PrometheusRule, ScaledObject,
  TriggerAuthentication) are checked against the schemas below, which describe
  the fields of their CRDs that we use and refuse any other field.
- Then the objects are checked against each other and against the worker: names
  that are referenced exist, selectors select, probes hit /healthz and /readyz on
  the metrics port, the grace period outlasts the drain, the key file named in
  config.toml is in the mounted Secret, the containers run locked down.
With --secrets-external (the base, whose Secrets an overlay provides) Secrets that
are referenced need not be in the build.
"""
import argparse
import json
import sys
import tomllib

import jsonschema
import kubernetes_validate
import yaml

STR = {"type": "string"}
INT = {"type": "integer"}
LABELS = {"type": "object", "additionalProperties": STR}


def obj(required, **props):
    return {"type": "object", "required": required, "properties": props, "additionalProperties": False}


METADATA = obj(["name"], name=STR, namespace=STR, labels=LABELS, annotations=LABELS)
SELECTOR = obj(["matchLabels"], matchLabels=LABELS)
DURATION = {"type": "string", "pattern": r"^(\d+(ms|s|m|h|d|w|y))+$"}

CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): obj(
        ["apiVersion", "kind", "metadata", "spec"],
        apiVersion=STR, kind=STR, metadata=METADATA,
        spec=obj(
            ["selector", "endpoints"],
            selector=SELECTOR,
            jobLabel=STR,
            namespaceSelector=obj([], matchNames={"type": "array", "items": STR}, any={"type": "boolean"}),
            endpoints={"type": "array", "minItems": 1, "items": obj(
                ["port"], port=STR, path=STR, scheme={"enum": ["http", "https"]},
                interval=DURATION, scrapeTimeout=DURATION, honorLabels={"type": "boolean"})},
        ),
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): obj(
        ["apiVersion", "kind", "metadata", "spec"],
        apiVersion=STR, kind=STR, metadata=METADATA,
        spec=obj(["groups"], groups={"type": "array", "minItems": 1, "items": obj(
            ["name", "rules"], name=STR, interval=DURATION,
            rules={"type": "array", "minItems": 1, "items": {
                "type": "object",
                "required": ["expr"],
                "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                "properties": {
                    "alert": STR, "record": STR, "expr": STR, "for": DURATION,
                    "labels": LABELS, "annotations": LABELS,
                },
                "additionalProperties": False,
            }})}),
    ),
    ("keda.sh/v1alpha1", "ScaledObject"): obj(
        ["apiVersion", "kind", "metadata", "spec"],
        apiVersion=STR, kind=STR, metadata=METADATA,
        spec=obj(
            ["scaleTargetRef", "triggers"],
            scaleTargetRef=obj(["name"], name=STR, apiVersion=STR, kind=STR),
            minReplicaCount={"type": "integer", "minimum": 0},
            maxReplicaCount={"type": "integer", "minimum": 1},
            pollingInterval=INT, cooldownPeriod=INT,
            advanced=obj([], horizontalPodAutoscalerConfig=obj(
                [], name=STR, behavior={"type": "object"})),
            triggers={"type": "array", "minItems": 1, "items": obj(
                ["type", "metadata"], type=STR, name=STR,
                # KEDA takes trigger metadata as strings only.
                metadata={"type": "object", "additionalProperties": STR},
                authenticationRef=obj(["name"], name=STR, kind={"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}))},
        ),
    ),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): obj(
        ["apiVersion", "kind", "metadata", "spec"],
        apiVersion=STR, kind=STR, metadata=METADATA,
        spec=obj(["secretTargetRef"], secretTargetRef={"type": "array", "minItems": 1, "items": obj(
            ["parameter", "name", "key"], parameter=STR, name=STR, key=STR)}),
    ),
}

RABBITMQ_TRIGGER_KEYS = {"protocol", "queueName", "mode", "value", "activationValue", "vhostName"}

errors = []


def fail(what, msg):
    errors.append(f"{what}: {msg}")


def name_of(doc):
    return f"{doc['kind']}/{doc['metadata']['name']}"


def validate_schemas(docs, version):
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in CRD_SCHEMAS:
            try:
                jsonschema.validate(doc, CRD_SCHEMAS[key])
            except jsonschema.ValidationError as e:
                fail(name_of(doc), f"{'.'.join(map(str, e.absolute_path))}: {e.message}")
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.utils.ValidationError as e:
            fail(name_of(doc), f"{'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.utils.SchemaNotFoundError as e:
            fail(name_of(doc), e.message)


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def need_mounted_secret_file(who, var, path, mounts, need_secret):
    directory, _, key = path.rpartition("/")
    vol = mounts.get(directory)
    if vol is None or "secret" not in vol:
        fail(who, f"{var}={path} is not in a mounted Secret")
    else:
        need_secret(who, vol["secret"]["secretName"], key)


def check_references(docs, secrets_external):
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    deployments = by_kind.get("Deployment", {})
    configmaps = by_kind.get("ConfigMap", {})
    secrets = by_kind.get("Secret", {})
    worker = deployments.get("voip-push-worker")
    if worker is None:
        fail("Deployment/voip-push-worker", "missing")
        return

    def need_secret(who, name, key=None):
        if name in secrets:
            if key is not None and key not in secrets[name].get("data", {}) | secrets[name].get("stringData", {}):
                fail(who, f"Secret {name} has no key {key}")
        elif not secrets_external:
            fail(who, f"Secret {name} is not in the build")

    # Pods: referenced objects, security, resources, configuration.
    for kind in ("Deployment", "Job"):
        for name, doc in by_kind.get(kind, {}).items():
            who = f"{kind}/{name}"
            pod = doc["spec"]["template"]["spec"]
            psc = pod.get("securityContext", {})
            if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                fail(who, "pod securityContext.seccompProfile.type must be RuntimeDefault")
            if not psc.get("runAsNonRoot"):
                fail(who, "pod securityContext.runAsNonRoot must be true")
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for v in volumes.values():
                if "configMap" in v and v["configMap"]["name"] not in configmaps:
                    fail(who, f"ConfigMap {v['configMap']['name']} is not in the build")
                if "secret" in v:
                    need_secret(who, v["secret"]["secretName"])
            for c in pod["containers"]:
                csc = c.get("securityContext", {})
                if not (csc.get("readOnlyRootFilesystem") and csc.get("allowPrivilegeEscalation") is False
                        and csc.get("capabilities", {}).get("drop") == ["ALL"]):
                    fail(who, f"container {c['name']}: needs readOnlyRootFilesystem, no privilege escalation, drop ALL")
                res = c.get("resources", {})
                if not (res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory")
                        and res.get("requests", {}).get("cpu")):
                    fail(who, f"container {c['name']}: needs cpu/memory requests and a memory limit")
                for ef in c.get("envFrom", []):
                    if "secretRef" in ef:
                        need_secret(who, ef["secretRef"]["name"])
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                mounts = {m["mountPath"]: volumes.get(m["name"]) for m in c.get("volumeMounts", [])}
                for m in c.get("volumeMounts", []):
                    if m["name"] not in volumes:
                        fail(who, f"volumeMount {m['name']} has no volume")
                # Secrets from files: each VPW__..._FILE names a key of a mounted Secret.
                for var, path in env.items():
                    if var.startswith("VPW__") and var.endswith("_FILE") and path:
                        need_mounted_secret_file(who, var, path, mounts, need_secret)
                cfg_path = env.get("VPW_CONFIG")
                if not cfg_path:
                    fail(who, f"container {c['name']}: VPW_CONFIG is not set")
                    continue
                check_config(who, cfg_path, mounts, configmaps, secrets, secrets_external, doc if kind == "Deployment" else None)

    # Service → worker pods, ServiceMonitor → Service, PDB → worker pods.
    pod_labels = worker["spec"]["template"]["metadata"]["labels"]
    container = worker["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    if ports.get("http-metrics") != 9464:
        fail("Deployment/voip-push-worker", "container port http-metrics must be 9464 (VPW__HTTP__LISTEN)")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") not in ("http-metrics", 9464):
            fail("Deployment/voip-push-worker", f"{probe} must GET {path} on port 9464")
    services = by_kind.get("Service", {})
    for name, svc in services.items():
        if not matches(svc["spec"]["selector"], pod_labels):
            fail(f"Service/{name}", "selector does not select the worker's pods")
        for p in svc["spec"]["ports"]:
            if p.get("targetPort") not in ports and p.get("targetPort") not in ports.values():
                fail(f"Service/{name}", f"targetPort {p.get('targetPort')} is not a container port")
    for name, sm in by_kind.get("ServiceMonitor", {}).items():
        selected = [s for s in services.values() if matches(sm["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
        if not selected:
            fail(f"ServiceMonitor/{name}", "selects no Service")
        for ep in sm["spec"]["endpoints"]:
            if not any(ep["port"] == p.get("name") for s in selected for p in s["spec"]["ports"]):
                fail(f"ServiceMonitor/{name}", f"port {ep['port']} is no port of the selected Service")
    for name, pdb in by_kind.get("PodDisruptionBudget", {}).items():
        if not matches(pdb["spec"]["selector"]["matchLabels"], pod_labels):
            fail(f"PodDisruptionBudget/{name}", "does not select the worker's pods")

    # Autoscaling: exactly one of KEDA or an HPA, aimed at the worker, never below 2.
    scaled = by_kind.get("ScaledObject", {})
    hpas = by_kind.get("HorizontalPodAutoscaler", {})
    if len(scaled) + len(hpas) != 1:
        fail("autoscaling", f"expected one ScaledObject or one HPA, found {len(scaled)} and {len(hpas)}")
    for name, so in scaled.items():
        who = f"ScaledObject/{name}"
        if so["spec"]["scaleTargetRef"]["name"] not in deployments:
            fail(who, "scaleTargetRef is not a Deployment of the build")
        if so["spec"].get("minReplicaCount", 0) < 2:
            fail(who, "minReplicaCount must be at least 2")
        for t in so["spec"]["triggers"]:
            if t["type"] != "rabbitmq":
                continue
            unknown = set(t["metadata"]) - RABBITMQ_TRIGGER_KEYS
            if unknown:
                fail(who, f"unknown rabbitmq trigger metadata {sorted(unknown)}")
            if t["metadata"].get("queueName") != "voip-push.calls":
                fail(who, "the rabbitmq trigger must watch the work queue voip-push.calls")
            ref = t.get("authenticationRef", {}).get("name")
            auth = by_kind.get("TriggerAuthentication", {}).get(ref)
            if auth is None:
                fail(who, f"TriggerAuthentication {ref} is not in the build")
            else:
                for s in auth["spec"]["secretTargetRef"]:
                    need_secret(f"TriggerAuthentication/{ref}", s["name"], s["key"])
    for name, hpa in hpas.items():
        if hpa["spec"]["scaleTargetRef"]["name"] not in deployments or hpa["spec"].get("minReplicas", 1) < 2:
            fail(f"HorizontalPodAutoscaler/{name}", "must target the worker Deployment with minReplicas >= 2")

    for name, cm in configmaps.items():
        for key, text in cm.get("data", {}).items():
            if key.endswith(".json"):
                try:
                    json.loads(text)
                except ValueError as e:
                    fail(f"ConfigMap/{name}", f"{key} is not JSON: {e}")


def check_config(who, cfg_path, mounts, configmaps, secrets, secrets_external, deployment):
    directory, _, filename = cfg_path.rpartition("/")
    vol = mounts.get(directory)
    if vol is None or "configMap" not in vol:
        fail(who, f"VPW_CONFIG {cfg_path} is not in a mounted ConfigMap")
        return
    cm = configmaps.get(vol["configMap"]["name"])
    if cm is None:
        return
    text = cm.get("data", {}).get(filename)
    if text is None:
        fail(who, f"ConfigMap {cm['metadata']['name']} has no key {filename}")
        return
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        fail(who, f"{filename} is not TOML: {e}")
        return
    apns = cfg.get("apns", {})
    apps = list(apns.get("apps", []))
    if apns.get("key_file"):
        apps.append({"key_file": apns["key_file"]})
    if not apps:
        fail(who, f"{filename} configures no APNs app")
    for app in apps:
        key_dir, _, key_name = app.get("key_file", "").rpartition("/")
        kvol = mounts.get(key_dir)
        if kvol is None or "secret" not in kvol:
            fail(who, f"key_file {app.get('key_file')} is not in a mounted Secret")
            continue
        secret = secrets.get(kvol["secret"]["secretName"])
        if secret is not None and key_name not in secret.get("data", {}):
            fail(who, f"Secret {secret['metadata']['name']} has no key {key_name}")
        elif secret is None and not secrets_external:
            fail(who, f"Secret {kvol['secret']['secretName']} is not in the build")
    if deployment is not None:
        worker = cfg.get("worker", {})
        drain = worker.get("drain_timeout_secs", 15)
        request = apns.get("request_timeout_ms", 10_000) / 1000
        grace = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        if grace <= drain + request:
            fail(who, f"terminationGracePeriodSeconds {grace} must exceed the drain ({drain} s) plus an APNs request ({request:g} s)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kubernetes-version", required=True)
    parser.add_argument("--secrets-external", action="store_true")
    parser.add_argument("build")
    args = parser.parse_args()
    with open(args.build) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    validate_schemas(docs, args.kubernetes_version)
    check_references(docs, args.secrets_external)
    for e in errors:
        print(f"  ✗ {e}", file=sys.stderr)
    if errors:
        return 1
    kinds = sorted({d["kind"] for d in docs})
    print(f"  {len(docs)} objects valid for Kubernetes {args.kubernetes_version}: {', '.join(kinds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
