"""The Helm chart and the Dockerfile against the service they deploy: both profiles render, every object
validates against the Kubernetes 1.33 schemas, and ports, probes, env names and metric names match the code,
so that they cannot drift apart."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service.app import FINAL_SHUTDOWN_SECONDS
from service.metrics import Metrics
from service.store.log import CLOSE_TIMEOUT_SECONDS
from zephyr.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "zephyr"
HELM = os.environ.get("ZEPHYR_HELM", str(ROOT / ".tools" / "bin" / "helm"))
KUBERNETES = "1.33.0"
# Keys long enough for the chart (ZEPHYR_MIN_API_KEY_CHARS, 16 by default).
K0, K1, K2 = "student:student-key-000000", "student:student-key-000001", "reviewer:reviewer-key-00002"
EVERYTHING_ON = ["--set", f"secrets.apiKeys={K1},ingress.enabled=true,autoscaling.enabled=true,"
                 "autoscaling.minReplicas=2,secrets.dbUrl=postgresql+asyncpg://u:p@db/zephyr,"
                 "metrics.serviceMonitor.enabled=true,metrics.dashboard.enabled=true",
                 "--set", "persistence.accessModes={ReadWriteMany}",
                 "--set", "ingress.tls[0].secretName=tutor-tls,ingress.tls[0].hosts[0]=tutor.example.edu",
                 "--set", "networkPolicy.enabled=true,networkPolicy.egress.restrict=true",
                 "--set-json", 'networkPolicy.egress.rules=[{"to": [{"namespaceSelector": {"matchLabels": '
                 '{"kubernetes.io/metadata.name": "databases"}}}], "ports": [{"port": 5432, "protocol": "TCP"}]}]']
SETTING_NAMES = {f"ZEPHYR_{name.upper()}" for name in Settings.model_fields}


def helm(*args: str) -> subprocess.CompletedProcess:
    if not Path(HELM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"helm not found at {HELM}: `make .tools/bin/helm` fetches it")
        pytest.skip("helm missing: run `make .tools/bin/helm`")
    return subprocess.run([HELM, *args], capture_output=True, text=True)


def render(profile: str, *extra: str) -> dict[str, dict]:
    result = helm("template", "tutor", str(CHART), "-f", str(CHART / f"values-{profile}.yaml"), *EVERYTHING_ON, *extra)
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    # The Grafana dashboard is a second ConfigMap: keyed apart from the settings one.
    return {"Dashboard" if doc["metadata"]["name"].endswith("-dashboard") else doc["kind"]: doc for doc in objects}


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def rendered(request) -> dict[str, dict]:
    return render(request.param)


def test_every_object_is_valid_kubernetes(rendered):
    assert set(rendered) == {"Deployment", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim", "Ingress",
                             "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor", "ServiceAccount",
                             "Dashboard", "NetworkPolicy"}
    for kind, obj in rendered.items():
        if kind == "ServiceMonitor":  # a CRD (prometheus-operator): no upstream schema; checked below
            continue
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_chart_matches_the_service(rendered):
    from service.app import create_app

    deployment = rendered["Deployment"]["spec"]["template"]["spec"]
    container = deployment["containers"][0]
    config = rendered["ConfigMap"]["data"]
    routes = {route.path for route in create_app(Settings()).routes}

    # Ports: the container listens where the settings say and the probes, Service and monitor point there.
    assert config["ZEPHYR_HOST"] == "0.0.0.0"
    assert container["ports"] == [{"name": "http", "containerPort": int(config["ZEPHYR_PORT"]), "protocol": "TCP"}]
    assert rendered["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"} and path in routes
    endpoint = rendered["ServiceMonitor"]["spec"]["endpoints"][0]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics" and "/metrics" in routes

    # Env names: every one the chart sets is a setting the service reads.
    secret_env = {e["name"] for e in container["env"]}
    assert set(config) <= SETTING_NAMES, set(config) - SETTING_NAMES
    assert secret_env <= SETTING_NAMES | {"FORWARDED_ALLOW_IPS"}
    assert set(rendered["Secret"]["stringData"]) <= SETTING_NAMES
    # Replicas share the secret that keys API-key digests and signs review cookies; uvicorn trusts the ingress.
    session = rendered["Secret"]["stringData"]["ZEPHYR_SESSION_SECRET"]
    assert len(session) >= 32 and Settings(session_secret=session).session_secret == session
    env = {e["name"]: e for e in container["env"]}
    assert "optional" not in env["ZEPHYR_SESSION_SECRET"]["valueFrom"]["secretKeyRef"]
    assert env["FORWARDED_ALLOW_IPS"]["value"]
    Settings(**{k.removeprefix("ZEPHYR_").lower(): v for k, v in config.items()})  # and every value parses

    # Shutdown: Kubernetes waits longer than preStop sleep + drain + uvicorn's final wait + the log's last flush.
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert deployment["terminationGracePeriodSeconds"] > (
        pre_stop + int(config["ZEPHYR_DRAIN_SECONDS"]) + FINAL_SHUTDOWN_SECONDS + CLOSE_TIMEOUT_SECONDS)
    # The registry is where the settings look.
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert config["ZEPHYR_HOME"] in mounts
    assert deployment["initContainers"][0]["args"] == ["models", "prepare"]

    # Autoscaling on waiting requests names a metric the service exports.
    metric_names = {m.name for m in Metrics().registry.collect()}
    for metric in rendered["HorizontalPodAutoscaler"]["spec"]["metrics"]:
        if metric["type"] == "Pods":
            assert metric["pods"]["metric"]["name"] in metric_names


INTERNAL_ROUTES = {"/metrics", "/healthz", "/readyz"}


def test_the_ingress_carries_every_public_route_and_no_internal_one(rendered):
    from service.app import create_app

    entries = [p for rule in rendered["Ingress"]["spec"]["rules"] for p in rule["http"]["paths"]]
    assert all(p["pathType"] == "Prefix" for p in entries)
    paths = [p["path"] for p in entries]

    def exposed(route: str) -> bool:  # Kubernetes' Prefix match: whole path elements
        return any(route == path or route.startswith(path.rstrip("/") + "/") for path in paths)

    routes = {route.path for route in create_app(Settings()).routes}
    assert {r for r in routes if not exposed(r)} == INTERNAL_ROUTES


def test_dashboard_queries_name_real_metrics(rendered):
    import json

    dashboard = json.loads(rendered["Dashboard"]["data"]["zephyr.json"])
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    exported = {family.name + suffix for family in Metrics().registry.collect()
                for suffix in suffixes.get(family.type, ("",))}
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            queried |= set(re.findall(r"\b(zephyr_[a-z_]+)\{", target["expr"]))
    assert queried and queried <= exported, queried - exported


def test_security_context_and_resources(rendered):
    pod = rendered["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]["memory"]
    # every emptyDir is capped: a runaway cache is the pod's eviction, not a full node disk
    scratch = [volume for volume in pod["volumes"] if "emptyDir" in volume]
    assert {volume["name"] for volume in scratch} >= {"tmp", "cache", "shm"}
    assert all(volume["emptyDir"].get("sizeLimit") for volume in scratch), scratch


def test_a_pod_without_persistence_caps_its_data_at_the_volumes_size():
    pod = render("cpu", "--set", "persistence.enabled=false,persistence.size=3Gi")["Deployment"]["spec"]["template"]
    [data] = [volume for volume in pod["spec"]["volumes"] if volume["name"] == "data"]
    assert data == {"name": "data", "emptyDir": {"sizeLimit": "3Gi"}}


def test_gpu_profile_asks_for_a_gpu():
    gpu = render("gpu")["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    cpu = render("cpu")["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1 and gpu["image"].endswith("-gpu")
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"] and cpu["image"].endswith("-cpu")


def test_cpu_profile_sizes_the_kv_cache_within_its_memory_limit():
    # On CPU vLLM's memory share is of the node's RAM, so only a fixed KV cache size fits a container limit.
    rendered = render("cpu")
    config = rendered["ConfigMap"]["data"]
    limit = rendered["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    measured_without_kv_gib = 2.8  # server + EngineCore + worker, SmolLM2-135M (docs/operations.md)
    assert float(config["ZEPHYR_KV_CACHE_GIB"]) + measured_without_kv_gib < float(limit.removesuffix("Gi"))


@pytest.mark.parametrize(("values", "named"), [
    ([], "secrets.apiKeys"),
    (["--set", f"secrets.apiKeys={K0},replicaCount=2"], "secrets.dbUrl"),
    # Autoscaling may add replicas too, and an existing Secret does not make a ReadWriteOnce volume shareable.
    (["--set", f"secrets.apiKeys={K0},autoscaling.enabled=true"], "secrets.dbUrl"),
    # An existing Secret is taken to hold no database unless said: two pods would write one SQLite file.
    (["--set", "secrets.existingSecret=s,replicaCount=2", "--set", "persistence.accessModes={ReadWriteMany}"],
     "secrets.existingSecretHoldsDbUrl=true"),
    (["--set", "secrets.existingSecret=s,secrets.existingSecretHoldsDbUrl=true,replicaCount=2"], "ReadWriteMany"),
    (["--set", "secrets.existingSecret=s,secrets.existingSecretHoldsDbUrl=true,networkPolicy.enabled=true,"
      "networkPolicy.egress.restrict=true"], "needs the database in networkPolicy.egress.rules"),
    # Manifests the API server would refuse.
    (["--set", f"secrets.apiKeys={K0},autoscaling.enabled=true,autoscaling.minReplicas=5,autoscaling.maxReplicas=2,"
      "secrets.dbUrl=postgresql+asyncpg://db/z", "--set", "persistence.accessModes={ReadWriteMany}"],
     "autoscaling.minReplicas 5 is above autoscaling.maxReplicas 2"),
    (["--set", f"secrets.apiKeys={K0},autoscaling.enabled=true,autoscaling.targetCPUUtilizationPercentage=null,"
      "secrets.dbUrl=postgresql+asyncpg://db/z", "--set", "persistence.accessModes={ReadWriteMany}"],
     "autoscaling needs a metric"),
    (["--set", f"secrets.apiKeys={K0},updateStrategy.type=Recreate,updateStrategy.rollingUpdate.maxSurge=1"],
     "Recreate takes no rollingUpdate"),
    (["--set", f"secrets.apiKeys={K0},replicaCount=2,secrets.dbUrl=postgresql+asyncpg://db/z"], "ReadWriteMany"),
    # The chart's own settings: the probes, Service and volume depend on them.
    (["--set", f"secrets.apiKeys={K0},config.ZEPHYR_PORT=9000"], "config.ZEPHYR_PORT"),
    # An existing claim is described by accessModes, as a new one is.
    (["--set", f"secrets.apiKeys={K0},replicaCount=2,secrets.dbUrl=postgresql+asyncpg://db/z,"
      "persistence.existingClaim=shared"], "existingClaim"),
    (["--set", f"secrets.apiKeys={K0},config.ZEPHYR_HOME=/models"], "config.ZEPHYR_HOME"),
    # A credential in the ConfigMap would be readable by anyone who may read ConfigMaps.
    (["--set", f"secrets.apiKeys={K0},config.ZEPHYR_REVIEW_CANDIDATE_API_KEY=sk-remote-000000000"],
     "config.ZEPHYR_REVIEW_CANDIDATE_API_KEY is a credential"),
    # The kubelet would kill the pod mid-drain, losing the rows still queued for the log.
    (["--set", f"secrets.apiKeys={K0},config.ZEPHYR_DRAIN_SECONDS=300,terminationGracePeriodSeconds=60"],
     "terminationGracePeriodSeconds 60 is shorter than the shutdown it must cover"),
    # No pod could ever be evicted: every node drain would block.
    (["--set", f"secrets.apiKeys={K0},replicaCount=2,podDisruptionBudget.minAvailable=2,"
      "secrets.dbUrl=postgresql+asyncpg://u:p@db/z", "--set", "persistence.accessModes={ReadWriteMany}"],
     "podDisruptionBudget.minAvailable 2 is not below the 2 replicas"),
    # An empty `from` admits every pod; a restricted egress without the database cuts the server off its log.
    (["--set", f"secrets.apiKeys={K0},networkPolicy.enabled=true,networkPolicy.from=null"], "networkPolicy.from"),
    (["--set", f"secrets.apiKeys={K0},networkPolicy.enabled=true,networkPolicy.egress.restrict=true,"
      "secrets.dbUrl=postgresql+asyncpg://u:p@db/z"], "needs the database in networkPolicy.egress.rules"),
    (["--set", f"secrets.apiKeys={K0},networkPolicy.enabled=true,networkPolicy.egress.restrict=true,"
      "config.ZEPHYR_REVIEW_CANDIDATE=remote"], "needs the candidate's server"),
    # The server would refuse it at start, in a crash loop: one key, two roles.
    (["--set", f"secrets.apiKeys={{{K0},admin:{K0.split(':', 1)[1]}}}"],
     "secrets.apiKeys entry 2 gives the key of an earlier entry another role or name"),
    # The server would refuse it at start, in a crash loop.
    (["--set", f"secrets.apiKeys={{{K0},Ada=reviewer:hunter2}}"],
     "secrets.apiKeys entry 2: its key is shorter than 16 characters"),
    # The server's other rules for an entry, which it would also refuse at start: a role it knows, a `:`, a name.
    (["--set", f"secrets.apiKeys={{{K0},studnet:hunter2hunter2hunter2}}"],
     "secrets.apiKeys entry 2 must be role:key or name=role:key with role one of student, reviewer, admin"),
    (["--set", "secrets.apiKeys={hunter2hunter2hunter2}"],
     "secrets.apiKeys entry 1 must be role:key or name=role:key"),
    (["--set", f"secrets.apiKeys={{{'A' * 65}=admin:hunter2hunter2hunter2}}"],
     "secrets.apiKeys entry 1: its name is longer than 64 characters"),
])
def test_unsafe_values_fail_with_a_message(values, named):
    result = helm("template", "tutor", str(CHART), "-f", str(CHART / "values-cpu.yaml"), *values)
    assert result.returncode != 0 and named in result.stderr, result.stderr
    assert "hunter2" not in result.stderr and "sk-remote" not in result.stderr


def test_the_network_policy_admits_the_named_peers_to_the_servers_port_and_lets_it_reach_dns_and_its_database(
        rendered):
    policy, pod = rendered["NetworkPolicy"]["spec"], rendered["Deployment"]["spec"]["template"]
    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    server = next(c for c in pod["spec"]["containers"] if c["name"] == "zephyr")
    (rule,) = policy["ingress"]
    assert [p["port"] for p in rule["ports"]] == [port["name"] for port in server["ports"]]
    assert {peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for peer in rule["from"]} == {
        "ingress-nginx", "monitoring"}
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    dns, database = policy["egress"]
    # wherever the cluster's DNS runs by default (a NodeLocal cache, OpenShift's); dnsPeers names it to close port 53
    assert {p["port"] for p in dns["ports"]} == {53} and "to" not in dns
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}]
    named = deployment_of("--set", f"secrets.apiKeys={K0},networkPolicy.enabled=true,networkPolicy.egress.restrict="
                          "true,networkPolicy.egress.dnsPeers[0].namespaceSelector.matchLabels.kubernetes\\.io/"
                          "metadata\\.name=kube-system")["NetworkPolicy"]["spec"]["egress"][0]
    assert named["to"] == peers
    assert database["ports"] == [{"port": 5432, "protocol": "TCP"}]


def test_a_release_pinned_by_digest_runs_that_build():
    """A build pushed again under one tag changed no pod template: an upgrade rolled nothing out."""
    digest = "sha256:" + "ab" * 32
    pod = deployment_of("--set", f"secrets.apiKeys={K0},image.digest={digest}")["Deployment"]["spec"]["template"]
    images = {c["image"] for c in pod["spec"]["containers"] + pod["spec"]["initContainers"]}
    assert images == {f"ghcr.io/zephyr-tutor/zephyr@{digest}"}
    bad = helm("template", "tutor", str(CHART), "-f", str(CHART / "values-cpu.yaml"), "--set",
               f"secrets.apiKeys={K0},image.digest=latest")
    assert bad.returncode != 0 and "image.digest must be sha256:" in bad.stderr


def test_without_restricted_egress_the_policy_leaves_egress_alone():
    policy = deployment_of("--set", f"secrets.apiKeys={K0},networkPolicy.enabled=true")["NetworkPolicy"]["spec"]
    assert policy["policyTypes"] == ["Ingress"] and "egress" not in policy
    assert "NetworkPolicy" not in deployment_of("--set", f"secrets.apiKeys={K0}")  # off by default


def test_the_minimum_key_length_is_the_servers_own_setting():
    rendered = deployment_of("--set", f"secrets.apiKeys={{{K0},reviewer:hunter2}}",
                             "--set", "config.ZEPHYR_MIN_API_KEY_CHARS=7")
    assert rendered["ConfigMap"]["data"]["ZEPHYR_MIN_API_KEY_CHARS"] == "7"


def deployment_of(*values: str) -> dict:
    result = helm("template", "tutor", str(CHART), "-f", str(CHART / "values-cpu.yaml"), *values)
    assert result.returncode == 0, result.stderr
    return {doc["kind"]: doc for doc in yaml.safe_load_all(result.stdout) if doc}


def test_one_replica_on_a_single_node_volume_is_replaced_not_surged_and_has_no_budget_blocking_drains():
    objects = deployment_of("--set", f"secrets.apiKeys={K0}")
    assert objects["Deployment"]["spec"]["strategy"] == {"type": "Recreate"}
    assert "PodDisruptionBudget" not in objects
    shared = deployment_of("--set", f"secrets.apiKeys={K0},replicaCount=2,secrets.dbUrl=postgresql+asyncpg://db/z",
                           "--set", "persistence.accessModes={ReadWriteMany}")
    assert shared["Deployment"]["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert shared["PodDisruptionBudget"]["spec"] | {"selector": None} == {"maxUnavailable": 1, "selector": None}
    # Four pods: minAvailable 1 let a drain evict three at once, each replacement loading its model for minutes.
    four = deployment_of("--set", f"secrets.apiKeys={K0},replicaCount=4,secrets.dbUrl=postgresql+asyncpg://db/z",
                         "--set", "persistence.accessModes={ReadWriteMany}")
    assert four["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    chosen = deployment_of("--set", f"secrets.apiKeys={K0},replicaCount=4,secrets.dbUrl=postgresql+asyncpg://db/z,"
                           "podDisruptionBudget.minAvailable=3", "--set", "persistence.accessModes={ReadWriteMany}")
    assert chosen["PodDisruptionBudget"]["spec"]["minAvailable"] == 3  # an operator's own choice is kept
    # An existing Secret not said to hold a database: its log is SQLite on the volume, replaced, never rolled.
    existing = deployment_of("--set", "secrets.existingSecret=mine", "--set", "persistence.accessModes={ReadWriteMany}")
    assert existing["Deployment"]["spec"]["strategy"] == {"type": "Recreate"}
    # Scaled on waiting students alone: vLLM's CPU build reads busy whenever anything generates.
    waiting = deployment_of("--set", f"secrets.apiKeys={K0},autoscaling.enabled=true,autoscaling.waitingRequests."
                            "enabled=true,autoscaling.targetCPUUtilizationPercentage=null,secrets.dbUrl="
                            "postgresql+asyncpg://db/z", "--set", "persistence.accessModes={ReadWriteMany}")
    assert [m["type"] for m in waiting["HorizontalPodAutoscaler"]["spec"]["metrics"]] == ["Pods"]
    # Autoscaled from one to four: no budget let a drain evict all four at once; maxUnavailable 1 never holds one.
    scaled = deployment_of("--set", f"secrets.apiKeys={K0},autoscaling.enabled=true,"
                           "secrets.dbUrl=postgresql+asyncpg://db/z", "--set",
                           "persistence.accessModes={ReadWriteMany}")
    budget = scaled["PodDisruptionBudget"]["spec"]
    assert budget["maxUnavailable"] == 1 and "minAvailable" not in budget
    # One GPU a replica: a surge pod would wait for a second GPU.
    gpu = render("gpu")["Deployment"]["spec"]["strategy"]
    assert gpu["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_a_gpu_pod_on_the_sqlite_log_is_replaced_not_rolled():
    """The GPU profile set RollingUpdate {maxSurge: 0}, which still starts the new pod while the old one drains: two
    writers of one SQLite file (found by a review)."""
    def strategy(*values: str):
        return helm("template", "tutor", str(CHART), "-f", str(CHART / "values-gpu.yaml"),
                    "--set", f"secrets.apiKeys={K0}", *values)

    result = strategy("--set", "persistence.accessModes={ReadWriteMany}")
    assert result.returncode == 0, result.stderr
    assert next(d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "Deployment")["spec"][
        "strategy"] == {"type": "Recreate"}
    refused = strategy("--set", "updateStrategy.type=RollingUpdate")
    assert refused.returncode != 0 and "updateStrategy RollingUpdate would run the new pod beside" in refused.stderr
    # Kubernetes' default type is RollingUpdate: a strategy without one rolls too.
    untyped = strategy("--set", "updateStrategy.rollingUpdate.maxSurge=0")
    assert untyped.returncode != 0 and "updateStrategy RollingUpdate would run the new pod beside" in untyped.stderr
    # The way out for a release that kept the old profile's value (--reuse-values): clear it.
    cleared = strategy("--set", "updateStrategy=null")
    assert cleared.returncode == 0, cleared.stderr
    assert next(d for d in yaml.safe_load_all(cleared.stdout) if d and d["kind"] == "Deployment")["spec"][
        "strategy"] == {"type": "Recreate"}


def test_a_gpu_asked_for_under_limits_only_is_not_surged():
    """NVIDIA's examples set nvidia.com/gpu under limits alone: a surge pod would wait for a second GPU."""
    result = helm("template", "tutor", str(CHART), "-f", str(CHART / "values-cpu.yaml"), "--set",
                  f"secrets.apiKeys={K0},secrets.dbUrl=postgresql+asyncpg://db/z,resources.limits.nvidia\\.com/gpu=1",
                  "--set", "persistence.accessModes={ReadWriteMany}")
    assert result.returncode == 0, result.stderr
    deployment = next(d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "Deployment")
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_key_names_keys_and_the_session_secret_are_measured_in_characters_as_the_server_counts_them():
    def render_with(*values: str):
        return helm("template", "tutor", str(CHART), "-f", str(CHART / "values-cpu.yaml"), *values)

    name = "Ж" * 40  # 80 bytes, 40 characters: the server takes it
    result = render_with("--set", f"secrets.apiKeys={{{name}=reviewer:{K0.split(':', 1)[1]}}}")
    assert result.returncode == 0, result.stderr
    short_key = render_with("--set", "secrets.apiKeys={student:" + "é" * 10 + "}")  # 20 bytes, 10 characters
    assert short_key.returncode != 0 and "its key is shorter than 16 characters" in short_key.stderr
    short_secret = render_with("--set", f"secrets.apiKeys={K0},secrets.sessionSecret=" + "é" * 20)
    assert short_secret.returncode != 0 and "sessionSecret must be at least 32 characters" in short_secret.stderr


def test_sqlite_on_a_shared_volume_is_never_written_by_two_pods():
    """With ReadWriteMany and no database URL a rolling update ran the new pod beside the old one on one SQLite file."""
    objects = deployment_of("--set", f"secrets.apiKeys={K0}", "--set", "persistence.accessModes={ReadWriteMany}")
    assert objects["Deployment"]["spec"]["strategy"] == {"type": "Recreate"}


def test_the_grace_period_follows_the_drain_and_probes_allow_a_busy_pod():
    pod = deployment_of("--set", f"secrets.apiKeys={K0}")["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 180  # 5 preStop + the CPU profile's 150 s drain + 5 + 10 + 10
    longer = deployment_of("--set", f"secrets.apiKeys={K0},config.ZEPHYR_DRAIN_SECONDS=300")
    assert longer["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 330
    probes = pod["containers"][0]
    assert all(probes[p]["timeoutSeconds"] == 5 for p in ("startupProbe", "readinessProbe", "livenessProbe"))


def test_credentials_live_in_the_secret_which_outlives_an_uninstall():
    objects = deployment_of("--set", f"secrets.apiKeys={K0},secrets.reviewCandidateApiKey=sk-remote-000000000")
    assert objects["Secret"]["stringData"]["ZEPHYR_REVIEW_CANDIDATE_API_KEY"] == "sk-remote-000000000"
    assert "sk-remote" not in json.dumps(objects["ConfigMap"])
    # the session secret keys every API-key digest the kept volume or database holds
    assert objects["Secret"]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    env = {e["name"]: e for e in objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["ZEPHYR_REVIEW_CANDIDATE_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_extra_environment_and_volumes_and_odd_values_render():
    objects = deployment_of("--set", f"secrets.apiKeys={K0},image.tag=20240101,metrics.dashboard.enabled=true",
                            "--set", "metrics.dashboard.labels=null",
                            "--set", "extraEnvFrom[0].secretRef.name=mine",
                            "--set", "extraEnv[0].name=ZEPHYR_REVIEW_GUIDELINES,extraEnv[0].value=/etc/zephyr/g.md",
                            "--set", "extraVolumes[0].name=g,extraVolumes[0].configMap.name=guidelines",
                            "--set", "extraVolumeMounts[0].name=g,extraVolumeMounts[0].mountPath=/etc/zephyr")
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert server["image"].endswith(":20240101")  # an all-digit tag is a string, not %!s(int64=...)
    assert {"secretRef": {"name": "mine"}} in server["envFrom"]
    assert {"name": "ZEPHYR_REVIEW_GUIDELINES", "value": "/etc/zephyr/g.md"} in server["env"]
    assert {"name": "g", "mountPath": "/etc/zephyr"} in server["volumeMounts"]
    assert {"name": "g", "configMap": {"name": "guidelines"}} in pod["volumes"]


def test_numbers_from_a_values_file_reach_the_server_as_it_reads_them(tmp_path):
    """A values file's numbers are floats to helm, and `quote` wrote a million as "1e+06": the server refused it and
    the pod crash-looped (found by a review)."""
    values = tmp_path / "values.yaml"
    values.write_text("config:\n  ZEPHYR_MAX_BODY_BYTES: 2000000\n  ZEPHYR_MAX_MODEL_LEN: 1048576\n"
                      "  ZEPHYR_CHAT_TEMPERATURE: 0.25\n  ZEPHYR_SAFETY_GUARD: false\n")
    config = render("cpu", "-f", str(values))["ConfigMap"]["data"]
    assert (config["ZEPHYR_MAX_BODY_BYTES"], config["ZEPHYR_MAX_MODEL_LEN"]) == ("2000000", "1048576")
    assert (config["ZEPHYR_CHAT_TEMPERATURE"], config["ZEPHYR_SAFETY_GUARD"]) == ("0.25", "false")
    settings = Settings(**{name.removeprefix("ZEPHYR_").lower(): value for name, value in config.items()
                           if name in ("ZEPHYR_MAX_BODY_BYTES", "ZEPHYR_MAX_MODEL_LEN", "ZEPHYR_CHAT_TEMPERATURE")})
    assert settings.max_body_bytes == 2_000_000 and settings.max_model_len == 1_048_576


def test_a_list_from_a_values_file_reaches_the_server_as_json(tmp_path, monkeypatch):
    """`quote` wrote a list in Go's form, [EMAIL_ADDRESS PHONE_NUMBER], which the server refused at start (found by
    a review)."""
    values = tmp_path / "values.yaml"
    values.write_text("config:\n  ZEPHYR_PII_ENTITIES: [EMAIL_ADDRESS, PHONE_NUMBER]\n")
    config = render("cpu", "-f", str(values))["ConfigMap"]["data"]
    assert config["ZEPHYR_PII_ENTITIES"] == '["EMAIL_ADDRESS","PHONE_NUMBER"]'
    monkeypatch.setenv("ZEPHYR_PII_ENTITIES", config["ZEPHYR_PII_ENTITIES"])  # read as the pod reads it
    assert Settings().pii_entities == ["EMAIL_ADDRESS", "PHONE_NUMBER"]


def test_keys_from_a_mounted_file_alone_and_no_credentials_for_the_init_container():
    """values.yaml offers an API-keys file through extraVolumes, yet the chart refused to render without
    secrets.apiKeys; and `models prepare` was given every credential it never reads (found by a review)."""
    objects = deployment_of("--set", "config.ZEPHYR_API_KEYS_FILE=/etc/zephyr/keys/keys.txt",
                            "--set", "extraVolumes[0].name=keys,extraVolumes[0].secret.secretName=my-keys",
                            "--set", "extraVolumeMounts[0].name=keys,extraVolumeMounts[0].mountPath=/etc/zephyr/keys")
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    server, prepare = pod["containers"][0], pod["initContainers"][0]
    assert objects["ConfigMap"]["data"]["ZEPHYR_API_KEYS_FILE"] == "/etc/zephyr/keys/keys.txt"
    keys = next(e for e in server["env"] if e["name"] == "ZEPHYR_API_KEYS")
    assert keys["valueFrom"]["secretKeyRef"]["optional"] is True  # an existingSecret need not hold an empty one
    assert {"ZEPHYR_DB_URL", "ZEPHYR_SESSION_SECRET"} <= {e["name"] for e in server["env"]}
    assert "secretKeyRef" not in json.dumps(prepare) and "secretRef" not in json.dumps(prepare)
    assert prepare["envFrom"] == [{"configMapRef": {"name": "tutor-zephyr"}}]


def test_api_keys_as_a_list_or_an_escaped_string_and_a_key_change_restarts_the_pods():
    session = ("--set", "secrets.sessionSecret=" + "s" * 40)
    as_list = deployment_of("--set", f"secrets.apiKeys={{{K1},{K2}}}", *session)
    as_text = deployment_of("--set", rf"secrets.apiKeys={K1}\,{K2}", *session)
    revoked = deployment_of("--set", f"secrets.apiKeys={{{K1}}}", *session)
    assert as_list["Secret"]["stringData"]["ZEPHYR_API_KEYS"] == f"{K1},{K2}"
    assert as_text["Secret"]["stringData"]["ZEPHYR_API_KEYS"] == f"{K1},{K2}"

    def checksum(objects: dict) -> str:
        return objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]

    assert checksum(as_list) == checksum(as_text) != checksum(revoked)
    # Digested under the session secret: the annotation is no plain digest a weak key could be guessed from.
    import hashlib

    assert checksum(revoked) != hashlib.sha256(K1.encode()).hexdigest()


def test_the_init_container_has_resources_and_the_cpu_pod_is_guaranteed():
    pod = deployment_of("--set", f"secrets.apiKeys={K0}")["Deployment"]["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["resources"]["limits"]["memory"]
    # Guaranteed QoS (what the static CPU manager gives cores of their own): every container, the init one too,
    # requests exactly its limits, in whole CPUs.
    for container in pod["initContainers"] + pod["containers"]:
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], container["name"]
        assert float(resources["limits"]["cpu"]).is_integer(), container["name"]


def test_a_first_install_digests_the_session_secret_its_secret_holds():
    import hashlib

    objects = deployment_of("--set", f"secrets.apiKeys={{{K1}}}")
    session = objects["Secret"]["stringData"]["ZEPHYR_SESSION_SECRET"]
    annotation = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
    # The same secret an upgrade reads back from the cluster: the pods restart only when keys or secret change.
    assert annotation == hashlib.sha256(f"{session}\n{K1}\n\n".encode()).hexdigest()


def test_ipv6_only_clusters_may_listen_on_all_ipv6_addresses():
    values = ("-f", str(CHART / "values-cpu.yaml"), "--set", f"secrets.apiKeys={K0},config.ZEPHYR_HOST=::")
    rendered = helm("template", "tutor", str(CHART), *values)
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stdout.count("ZEPHYR_HOST:") == 1 and 'ZEPHYR_HOST: "::"' in rendered.stdout  # once, not twice


def test_dockerfile_matches_the_settings():
    dockerfile = (ROOT / "Dockerfile").read_text()
    env = dict(re.findall(r"(ZEPHYR_[A-Z_]+)=(\S+)", dockerfile))
    assert set(env) <= SETTING_NAMES
    assert f"EXPOSE {env['ZEPHYR_PORT']}" in dockerfile and env["ZEPHYR_HOST"] == "0.0.0.0"
    assert "USER 10001" in dockerfile and "/healthz" in dockerfile
    # Under a read-only root only the chart's volumes are writable: caches the engine writes must live in them.
    pod = deployment_of("--set", f"secrets.apiKeys={K0}")["Deployment"]["spec"]["template"]["spec"]
    writable = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]]
    for variable in ("TRITON_CACHE_DIR", "VLLM_CONFIG_ROOT"):
        path = re.search(rf"{variable}=(\S+)", dockerfile).group(1)
        assert any(path.startswith(mount + "/") for mount in writable), variable
    assert "VLLM_NO_USAGE_STATS=1" in dockerfile
    short_secret = helm("template", "tutor", str(CHART), "--set", f"secrets.apiKeys={K0},secrets.sessionSecret=abc")
    assert short_secret.returncode != 0 and "at least 32 characters" in short_secret.stderr


def test_the_image_copies_every_package_the_project_installs():
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.removesuffix("*") for p in patterns}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE))
    assert packages <= copied, f"Dockerfile does not COPY {sorted(packages - copied)}"
    # .dockerignore excludes everything but what it names: a package it leaves out fails the build, not the lint.
    allowed = set(re.findall(r"^!(\w+)/$", (ROOT / ".dockerignore").read_text(), flags=re.MULTILINE))
    assert copied <= allowed, f".dockerignore keeps {sorted(copied - allowed)} out of the build context"
    # The dependency layer makes an empty folder for each package (so code changes rebuild only the last layer).
    assert packages <= set((ROOT / "Dockerfile").read_text().split("RUN mkdir ", 1)[1].split(";", 1)[0].split())


def test_the_wheel_the_image_installs_holds_every_file_the_packages_track(tmp_path):
    """The tests run on an editable install, which reads files from the checkout: a template, migration, recipe or
    shipped record that package-data leaves out would break only the image, which installs the wheel."""
    import shutil
    import sys
    import tomllib
    import zipfile

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(p.removesuffix("*") for p in patterns)
    listed = subprocess.run(["git", "ls-files", *packages], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0 or not listed.stdout.strip():
        pytest.skip("not a git checkout")
    tracked = listed.stdout.split()
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    for name in [*tracked, "pyproject.toml", "README.md"]:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    missing = sorted(set(tracked) - set(zipfile.ZipFile(wheel).namelist()))
    assert not missing, f"the wheel leaves out {missing}: add them to [tool.setuptools.package-data]"


def test_a_key_repeated_with_the_same_holder_renders_as_the_server_accepts_it():
    key = K0.split(":", 1)[1]
    for keys in (f"{{{K0},student: {key}}}", f"{{alice=reviewer:{key},alice = reviewer:{key}}}"):
        assert "Secret" in deployment_of("--set", f"secrets.apiKeys={keys}")


def test_a_rollout_is_not_called_failed_while_the_startup_probe_still_waits_for_its_pods():
    """Kubernetes' default progress deadline (600 s) was shorter than the GPU profile's startup allowance (900 s)."""
    for profile in ("cpu", "gpu"):
        spec = render(profile)["Deployment"]["spec"]
        probe = spec["template"]["spec"]["containers"][0]["startupProbe"]
        assert spec["progressDeadlineSeconds"] >= probe["periodSeconds"] * probe["failureThreshold"] + 600, profile
        # and the kubelet does not re-chown the whole registry volume at every start
        assert spec["template"]["spec"]["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"


def test_the_install_notes_warn_of_an_autoscaler_that_cannot_read_its_metric_and_of_spills_in_the_pod():
    def notes(*values: str) -> str:
        result = helm("install", "tutor", str(CHART), "--dry-run=client", "-f", str(CHART / "values-gpu.yaml"),
                      "--set", f"secrets.apiKeys={K0},autoscaling.enabled=true,persistence.enabled=false,"
                      "secrets.dbUrl=postgresql+asyncpg://db/z", *values)
        assert result.returncode == 0, result.stderr
        return result.stdout.split("NOTES:", 1)[1]

    bare = notes()  # an HPA missing one of its metrics scales up but never down
    assert "serves no custom metrics API" in bare and "spill to a file in the pod's emptyDir" in bare
    cpu_only = notes("--set", "autoscaling.waitingRequests.enabled=false,config.ZEPHYR_SPILL_PATH=/spill/g.jsonl")
    assert "custom metrics API" not in cpu_only and "emptyDir" not in cpu_only


def test_the_sigterm_drill_drains_for_what_the_cpu_chart_deploys():
    """The drill drained for 150 s while the chart shipped 30: a pass proved nothing about the deployed setting."""
    from loadtest.drills import chart_drain_seconds

    config = deployment_of("--set", f"secrets.apiKeys={K0}")["ConfigMap"]["data"]
    assert chart_drain_seconds() == config["ZEPHYR_DRAIN_SECONDS"] == "150"


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_every_setting_the_chart_ships_is_one_the_server_reads(profile):
    """The server ignores a ZEPHYR_ variable that names no setting: a misspelt key in the chart's values would ship
    its default without a word."""
    from zephyr.settings import unknown_variables

    result = helm("template", "tutor", str(CHART), "-f", str(CHART / f"values-{profile}.yaml"),
                  "--set", f"secrets.apiKeys={K0}")
    assert result.returncode == 0, result.stderr
    config = next(doc for doc in yaml.safe_load_all(result.stdout)
                  if doc and doc["kind"] == "ConfigMap" and any(k.startswith("ZEPHYR_") for k in doc["data"]))
    assert len(config["data"]) > 10 and unknown_variables(config["data"]) == []
    deployment = next(doc for doc in yaml.safe_load_all(result.stdout) if doc and doc["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["enableServiceLinks"] is False  # no ZEPHYR_PORT=tcp://... clash
