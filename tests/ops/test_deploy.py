"""deploy/, Dockerfile, docker-compose.yml: the validators the tools were made for (promtool,
hadolint, docker-compose, kubernetes-validate; `make tools` installs them, so a missing one
fails here), plus the links between the files that no validator sees: metric names, probes
and drain timing, selectors, and flags.

kubernetes-validate has no schema for custom resources (ServiceMonitor, PrometheusRule) or
for kustomization.yaml: it warns and passes them. The test allows exactly those kinds to go
unvalidated and checks what matters in them itself (the ServiceMonitor selects one Service and
a port it has; the PrometheusRule holds the same groups as alerts.yml).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import yaml
from ops_helpers import ROOT, defined_series, tool, undefined_metrics

from adapters_store.blobs import parse_s3_url
from server.config import add_serve_arguments, parse_bytes

PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
K8S = ROOT / "deploy" / "k8s"
SCHEMALESS = {"ServiceMonitor", "PrometheusRule", "Kustomization"}


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)


def k8s_docs() -> list[tuple[str, dict]]:
    return [
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def one(kind: str, name: str | None = None) -> dict:
    found = [
        d for _, d in k8s_docs() if d["kind"] == kind and name in (None, d["metadata"]["name"])
    ]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def serve_env_vars() -> set[str]:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    flags = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
    return {"PREFIX_SERVE_" + f[2:].upper().replace("-", "_") for f in flags - {"--help"}}


# Prometheus ----------------------------------------------------------------------------------
def test_promtool_accepts_the_config_and_the_rules() -> None:
    promtool = tool("promtool")
    config = run(promtool, "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS: 1 rule files found" in config.stdout + config.stderr
    rules = run(promtool, "check", "rules", "alerts.yml", cwd=PROMETHEUS)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 6 rules found" in rules.stdout + rules.stderr


def test_alerts_fire_on_their_unit_test_series() -> None:
    """alerts.test.yml: down, queue growing, server-side error rate (client errors alone stay
    quiet), KV cache nearly full, preempting, adapter storage full: each fires with the exact
    labels and text."""
    result = run(tool("promtool"), "test", "rules", "alerts.test.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_kubernetes_rule_holds_the_same_alerts() -> None:
    alerts = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    assert one("PrometheusRule")["spec"]["groups"] == alerts


def promql_expressions() -> dict[str, str]:
    """Every PromQL expression shipped: alert rules, dashboard targets and variables, the
    Prometheus adapter's series query."""
    exprs: dict[str, str] = {}
    for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            exprs[f"alert {rule['alert']}"] = rule["expr"]
    dashboard = json.loads((GRAFANA / "dashboards" / "prefix-serve.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs[f"panel {panel['title']} {target['refId']}"] = target["expr"]
    for var in dashboard["templating"]["list"]:
        exprs[f"variable {var['name']}"] = var["query"]["query"]
    adapter = yaml.safe_load(one("ConfigMap", "prometheus-adapter")["data"]["config.yaml"])
    for i, rule in enumerate(adapter["rules"]):
        exprs[f"adapter rule {i}"] = rule["seriesQuery"] + " " + rule["name"]["as"]
    return exprs


def test_every_promql_expression_uses_only_defined_metrics() -> None:
    exprs = promql_expressions()
    assert len(exprs) >= 30
    bad = {where: undefined_metrics(e) for where, e in exprs.items() if undefined_metrics(e)}
    assert bad == {}
    assert "vllm" not in json.dumps(exprs)
    # The checker itself catches a misspelt name.
    assert undefined_metrics("rate(prefix_serve_generated_tokens_total[1m])") == {
        "prefix_serve_generated_tokens_total"
    }


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    source = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    uid = source["datasources"][0]["uid"]
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/prefix-serve.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((GRAFANA / "dashboards" / "prefix-serve.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert {p["datasource"]["uid"] for p in panels} == {uid}
    titles = {p["title"] for p in panels}
    assert {"Tokens / s", "Time to first token", "Requests running / waiting", "KV cache"} <= titles
    assert {"Prefix cache hit rate", "Tier hit rate", "Resident adapters"} <= titles


# Docker --------------------------------------------------------------------------------------
def test_hadolint_passes_the_dockerfile() -> None:
    result = run(tool("hadolint"), "Dockerfile")
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_dockerfile_is_multi_stage_non_root_with_healthcheck_and_baked_model() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) == 2
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.M)
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in text
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert "resolve_model_dir('default', '/var/lib/prefix-serve')" in text
    assert "PREFIX_SERVE_DATA_DIR=/var/lib/prefix-serve" in text
    assert re.search(r"^HEALTHCHECK .*\n.*healthcheck\.py", text, re.M)
    check = (ROOT / "deploy/docker/healthcheck.py").read_text()
    assert 'f"http://127.0.0.1:{port}/health"' in check


def test_docker_compose_config_is_valid_and_wires_the_stack() -> None:
    compose = tool("docker-compose")
    quiet = run(compose, "-f", "docker-compose.yml", "config", "-q")
    assert (quiet.returncode, quiet.stderr) == (0, "")
    resolved = yaml.safe_load(run(compose, "-f", "docker-compose.yml", "config").stdout)
    services = resolved["services"]
    assert set(services) == {
        "prefix-serve",
        "redis",
        "prometheus",
        "grafana",
        "prefix-serve-s3",
        "minio",
        "minio-init",
        "prefix-serve-1",
        "prefix-serve-2",
        "prefix-serve-3",
        "nginx",
    }
    assert {name for name, s in services.items() if s.get("profiles")} == {
        "prefix-serve-s3",
        "minio",
        "minio-init",
        "prefix-serve-1",
        "prefix-serve-2",
        "prefix-serve-3",
        "nginx",
    }
    server = services["prefix-serve"]
    assert set(server["environment"]) <= serve_env_vars()
    assert server["environment"]["PREFIX_SERVE_REDIS_URL"] == "redis://redis:6379/0"
    assert server["depends_on"]["redis"]["condition"] == "service_healthy"
    redis = services["redis"]
    assert redis["command"][:3] == ["redis-server", "--appendonly", "yes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    mounts = {v.split(":")[1] for v in services["grafana"]["volumes"]}
    assert {"/etc/grafana/provisioning", "/var/lib/grafana/dashboards"} <= mounts
    prometheus = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    job = prometheus["scrape_configs"][0]
    assert job["static_configs"][0]["targets"] == ["prefix-serve:8000"]


def test_docker_compose_s3_profile_runs_the_server_on_minio() -> None:
    """`docker-compose --profile s3 up`: MinIO, a job that makes the bucket, and a server whose
    --blob-url names that bucket, with MinIO's keys, started only once the bucket exists."""
    compose = tool("docker-compose")
    resolved = run(compose, "-f", "docker-compose.yml", "--profile", "s3", "config")
    assert resolved.returncode == 0, resolved.stderr
    services = yaml.safe_load(resolved.stdout)["services"]
    server, minio, init = services["prefix-serve-s3"], services["minio"], services["minio-init"]
    assert {s["profiles"][0] for s in (server, minio, init)} == {"s3"}
    env = server["environment"]
    assert {k for k in env if not k.startswith("AWS_")} <= serve_env_vars()
    bucket, prefix, _ = parse_s3_url(env["PREFIX_SERVE_BLOB_URL"])
    assert (bucket, prefix) == ("prefix-serve-adapters", "adapters")
    assert env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert env["AWS_REGION"] == "us-east-1"
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        minio["environment"]["MINIO_ROOT_USER"],
        minio["environment"]["MINIO_ROOT_PASSWORD"],
    )
    # Its own registry: the file-store server's adapters have no blobs in the bucket.
    assert env["PREFIX_SERVE_REDIS_URL"] == "redis://redis:6379/1"
    assert services["prefix-serve"]["environment"]["PREFIX_SERVE_REDIS_URL"].endswith("/0")
    assert "volumes" not in server
    assert server["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert server["depends_on"]["redis"]["condition"] == "service_healthy"
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert f"mc mb --ignore-existing local/{bucket}" in init["command"][0]
    assert minio["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    assert [p["target"] for p in server["ports"]] == [8000]


def test_docker_compose_replicas_profile_puts_nginx_in_front_of_three_replicas() -> None:
    """`docker-compose --profile replicas up`: three replicas sharing one registry and one
    bucket, behind nginx running the very routing file tests/scaleout runs, whose upstreams
    name exactly those replicas."""
    compose = tool("docker-compose")
    resolved = run(compose, "-f", "docker-compose.yml", "--profile", "replicas", "config")
    assert resolved.returncode == 0, resolved.stderr
    services = yaml.safe_load(resolved.stdout)["services"]
    replicas = [services[f"prefix-serve-{i}"] for i in (1, 2, 3)]
    envs = [r["environment"] for r in replicas]
    assert envs[0] == envs[1] == envs[2]
    assert {k for k in envs[0] if not k.startswith("AWS_")} <= serve_env_vars()
    assert envs[0]["PREFIX_SERVE_REDIS_URL"] == "redis://redis:6379/2"
    assert parse_s3_url(envs[0]["PREFIX_SERVE_BLOB_URL"])[:2] == (
        "prefix-serve-adapters",
        "replicas",
    )
    assert all("ports" not in r for r in replicas)  # reached through nginx only
    nginx = services["nginx"]
    conf = "./deploy/nginx/prefix-serve.conf"
    mount = next(v for v in nginx["volumes"] if "/etc/nginx/conf.d/" in str(v))
    source = mount["source"] if isinstance(mount, dict) else mount.split(":")[0]
    assert Path(source).resolve() == (ROOT / conf).resolve()
    text = (ROOT / conf).read_text()
    assert "hash $http_x_adapter consistent;" in text
    upstream = {  # the upstreams' `server host:port ...;` lines (not the `server {` block)
        line.split()[1] for line in text.splitlines() if re.match(r"\s+server \S+:\d+", line)
    }
    assert upstream == {f"prefix-serve-{i}:8000" for i in (1, 2, 3)}
    assert set(nginx["depends_on"]) == {f"prefix-serve-{i}" for i in (1, 2, 3)}
    assert services["minio-init"]["profiles"] == ["s3", "replicas"]


# Kubernetes ----------------------------------------------------------------------------------
def test_kubernetes_validate_passes_every_manifest() -> None:
    files = sorted(p.name for p in K8S.glob("*.yaml"))
    result = run(tool("kubernetes-validate"), "--strict", *files, cwd=K8S)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    unvalidated = set(re.findall(r"Couldn't find schema for kind (\w+)", out))
    assert unvalidated == SCHEMALESS
    schemaless = sum(1 for _, d in k8s_docs() if d["kind"] in SCHEMALESS)
    passed = len(re.findall(r"^INFO .* passed for resource", out, re.M))
    assert passed == len(k8s_docs()) - schemaless >= 14
    assert "ERROR" not in out


def test_deployment_probes_and_drain_timing() -> None:
    deployment = one("Deployment", "prefix-serve")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= serve_env_vars()
    assert env["PREFIX_SERVE_REDIS_URL"] == "redis://redis:6379/0"
    assert env["PREFIX_SERVE_BLOB_URL"] == "file:///blobs"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # preStop, then the drain, then 2 s for aborted handlers to answer, all within the grace.
    assert pod["terminationGracePeriodSeconds"] >= (
        int(pre_stop[1]) + float(env["PREFIX_SERVE_DRAIN_TIMEOUT"]) + 2
    )
    assert pod["securityContext"]["runAsNonRoot"] is True
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["blobs"] == "/blobs"
    claim = one("PersistentVolumeClaim", volumes["blobs"]["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "replicas" not in deployment["spec"]  # the HPA owns it


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_scaling_and_routing_fit_together() -> None:
    pod_labels = one("Deployment", "prefix-serve")["spec"]["template"]["metadata"]["labels"]
    services = {d["metadata"]["name"]: d for _, d in k8s_docs() if d["kind"] == "Service"}
    assert matches(services["prefix-serve"]["spec"]["selector"], pod_labels)
    assert matches(services["prefix-serve-affinity"]["spec"]["selector"], pod_labels)
    assert matches(one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    # The ServiceMonitor scrapes each pod once: through exactly one Service, on a named port.
    monitor = one("ServiceMonitor")
    scraped = [
        s
        for s in services.values()
        if matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in scraped] == ["prefix-serve"]
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
        p["name"] for p in scraped[0]["spec"]["ports"]
    }
    # The HPA scales the Deployment on a metric the adapter serves and the server exposes.
    hpa = one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "prefix-serve"
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name == "prefix_serve_requests_waiting" and name in defined_series()
    adapter = yaml.safe_load(one("ConfigMap", "prometheus-adapter")["data"]["config.yaml"])
    assert [r["name"]["as"] for r in adapter["rules"]] == [name]
    # Requests naming an adapter are hashed on X-Adapter by ingress-nginx; others round robin.
    main, canary = one("Ingress", "prefix-serve"), one("Ingress", "prefix-serve-affinity")
    notes = canary["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/canary"] == "true"
    assert notes["nginx.ingress.kubernetes.io/canary-by-header"] == "X-Adapter"
    assert notes["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_x_adapter"
    assert "nginx.ingress.kubernetes.io/upstream-hash-by" not in main["metadata"]["annotations"]

    def backend(ingress: dict) -> str:
        return ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"]

    assert (backend(main), backend(canary)) == ("prefix-serve", "prefix-serve-affinity")
    # Redis keeps an append-only file on its own volume.
    redis = one("StatefulSet", "redis")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


K8S_S3 = ROOT / "deploy" / "k8s-s3"


def merge(base: object, patch: object, keys: dict[str, str]) -> object:
    """``patch`` applied to ``base`` as kustomize's strategic merge does for what the S3
    overlay uses: maps merged, lists of maps merged by their key (``keys``: list field name ->
    merge key), an entry with ``$patch: delete`` removed."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for field, value in patch.items():
            if field in keys and isinstance(value, list):
                key = keys[field]
                items = {item[key]: item for item in out.get(field, [])}
                for item in value:
                    if item.get("$patch") == "delete":
                        items.pop(item[key], None)
                    else:
                        items[item[key]] = merge(items.get(item[key], {}), item, keys)
                out[field] = list(items.values())
            else:
                out[field] = merge(out.get(field), value, keys)
        return out
    return patch


def s3_overlay() -> list[dict]:
    """deploy/k8s-s3 rendered over deploy/k8s (as `kubectl kustomize deploy/k8s-s3` does)."""
    kustomization = yaml.safe_load((K8S_S3 / "kustomization.yaml").read_text())
    assert kustomization["resources"][0] == "../k8s"
    docs = [d for _, d in k8s_docs() if d["kind"] not in ("Kustomization",)]
    for name in kustomization["resources"][1:]:
        docs.extend(yaml.safe_load_all((K8S_S3 / name).read_text()))
    keys = {"containers": "name", "env": "name", "volumeMounts": "mountPath", "volumes": "name"}
    for entry in kustomization["patches"]:
        patch = yaml.safe_load((K8S_S3 / entry["path"]).read_text())
        ident = (patch["kind"], patch["metadata"]["name"])
        (i,) = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) == ident]
        if patch.get("$patch") == "delete":
            del docs[i]
        else:
            docs[i] = merge(docs[i], patch, keys)
    return docs


def test_kubernetes_s3_overlay_is_valid_and_replaces_the_volume_by_the_bucket(
    tmp_path: Path,
) -> None:
    docs = s3_overlay()
    rendered = tmp_path / "s3.yaml"
    rendered.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] not in SCHEMALESS]))
    result = run(tool("kubernetes-validate"), "--strict", str(rendered))
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "ERROR" not in out, out
    assert len(re.findall(r"^INFO .* passed for resource", out, re.M)) >= 14

    assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert {n for n in env if not n.startswith("AWS_")} <= serve_env_vars()
    assert {n for n in env if n.startswith("AWS_")} == {
        "AWS_ENDPOINT_URL_S3",
        "AWS_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }
    bucket, prefix, cache_bytes = parse_s3_url(env["PREFIX_SERVE_BLOB_URL"]["value"])
    assert (bucket, prefix, cache_bytes) == ("prefix-serve-adapters", "adapters", 4 << 30)
    (secret,) = [
        d
        for d in docs
        if d["kind"] == "Secret" and d["metadata"]["name"] != (one("Secret")["metadata"]["name"])
    ]
    for name, entry in env.items():
        if name.startswith("AWS_"):
            ref = entry["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    # The read-through cache: an emptyDir in the image's data dir (the root file system is
    # read-only), sized above cache_bytes; no blob volume is left.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    data_dir = re.search(r"PREFIX_SERVE_DATA_DIR=(\S+)", (ROOT / "Dockerfile").read_text())
    assert data_dir is not None
    cache = volumes[mounts[f"{data_dir.group(1)}/blob-cache"]]
    assert parse_bytes(cache["emptyDir"]["sizeLimit"].replace("Gi", "GiB")) > cache_bytes
    assert "/blobs" not in mounts and "blobs" not in volumes
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_kustomization_lists_every_manifest_of_the_namespace() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    others = {"kustomization.yaml", "prometheus-adapter.configmap.yaml"}
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name not in others
    )
