"""The Helm chart: lint, render with each value set, validate every object against the Kubernetes schemas offline,
check what the deployment relies on (probes, GPUs, RBAC, Services, Redis, metrics), the values schema, and the
Grafana dashboards' PromQL (with promtool).

Needs ``helm`` and ``promtool``; .ci/run installs both (see tests/helm_tools.py for how to get them by hand).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from dashboards import (
    ADAPTER_VALUES,
    COUNTERS_AND_GAUGES,
    DASHBOARDS,
    HISTOGRAMS,
    KNOWN_SERIES,
    VLLM_FAMILIES,
    as_promql,
    expressions,
    panels,
)
from helm_tools import (
    CHART,
    FULLNAME,
    NAMESPACE,
    PROMETHEUS_RULE_API,
    RELEASE,
    SERVICE_MONITOR_API,
    VALUE_SETS,
    by_component,
    component,
    containers,
    env_map,
    flag_value,
    objects,
    pod_containers,
    promtool_binary,
    render,
    run_helm,
    schema_errors,
    template,
    value_args,
)

SERVICES = ("router", "draft", "target")
# A hub-sourced target with the router taking its tokenizer from it: renders the model-fetching init containers.
HUB_TARGET = ("target.model.source=huggingface", "target.model.name=Qwen/Qwen2.5-7B-Instruct", "router.tokenizer=")
# Every switch on at once, so the optional templates are validated too.
EVERYTHING = (*HUB_TARGET, "draft.autoscaling.enabled=true", "target.autoscaling.enabled=true",
              "target.autoscaling.targetCPUUtilizationPercentage=80", "serviceMonitor.enabled=true",
              "redis.persistence.enabled=true", "metrics.podAnnotations=true", "router.service.type=NodePort",
              "router.service.nodePort=30050", "otel.enabled=true", "otel.endpoint=http://collector:4317",
              "models.volume.type=hostPath", "models.volume.hostPath=/srv/models", "cache.type=persistentVolumeClaim",
              "cache.claimName=specfleet-cache", "models.huggingface.tokenSecret=hf-token")
RENDERINGS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    **{name: (name, (), ()) for name in VALUE_SETS},
    "gpu-external-redis+servicemonitor": ("gpu-external-redis", (), (SERVICE_MONITOR_API,)),
    "everything": ("default", EVERYTHING, (SERVICE_MONITOR_API, PROMETHEUS_RULE_API)),
}


def rendered(name: str) -> tuple[dict[str, Any], ...]:
    value_set, sets, api_versions = RENDERINGS[name]
    return render(value_set, sets, api_versions)


def service_containers(objs: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    """The router, draft and target containers, by component."""
    found = {}
    for deployment in objects(objs, "Deployment"):
        (container,) = containers(deployment)
        found[component(deployment)] = container
    return found


# ---------------------------------------------------------------------------------------------------------------------
# lint, render, validate


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_lint_strict(value_set: str) -> None:
    result = run_helm("lint", "--strict", str(CHART), *value_args(value_set))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_objects_validate_against_kubernetes_schemas(name: str) -> None:
    objs = rendered(name)
    assert objs, "nothing rendered"
    for obj in objs:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"].get("namespace", NAMESPACE) == NAMESPACE, where
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):  # CRDs: no schema shipped with kubernetes-validate
            if obj["kind"] == "ServiceMonitor":
                check_service_monitor(obj)
            else:
                assert obj["kind"] == "PrometheusRule" and obj["spec"]["groups"], where
    errors = schema_errors(objs)
    assert not errors, "\n".join(errors)


def check_service_monitor(obj: dict[str, Any]) -> None:
    assert obj["kind"] == "ServiceMonitor"
    spec = obj["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert spec["selector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
    (expression,) = spec["selector"]["matchExpressions"]
    assert expression == {"key": "app.kubernetes.io/component", "operator": "In", "values": list(SERVICES)}
    assert [endpoint["port"] for endpoint in spec["endpoints"]] == ["metrics"]
    relabel = spec["endpoints"][0]["relabelings"][0]
    assert relabel["targetLabel"] == "component"


def test_every_value_set_renders_the_three_services() -> None:
    for value_set in VALUE_SETS:
        assert set(service_containers(render(value_set))) == set(SERVICES), value_set


# ---------------------------------------------------------------------------------------------------------------------
# pods


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_every_service_container_has_health_probes(name: str) -> None:
    """Native gRPC probes on grpc.health.v1; a router serving TLS, which the kubelet's gRPC probes cannot speak, is
    probed on its HTTP API's /health over HTTPS."""
    for service, container in service_containers(rendered(name)).items():
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert int(flag_value(container["args"], "--port")) == ports["grpc"], service
        tls = "--tls-cert" in container["args"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if tls:
                assert container[probe]["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTPS"}, (
                    service, probe)
            else:
                assert container[probe]["grpc"] == {"port": ports["grpc"]}, (service, probe)
        startup = container["startupProbe"]
        allowed_s = startup["periodSeconds"] * startup["failureThreshold"]
        assert allowed_s >= 600, f"{service}: the startup probe must allow for model loading"


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_pods_drain_before_they_stop(name: str) -> None:
    for deployment in objects(rendered(name), "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        sleep = container["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep"
        assert int(sleep[1]) < pod["terminationGracePeriodSeconds"], component(deployment)
        # The service's own drain (streams and calls under way) fits after the sleep, with time to spare.
        drain = float(flag_value(container["args"], "--drain-timeout-s"))
        assert 0 < int(sleep[1]) + drain <= pod["terminationGracePeriodSeconds"] - 5, component(deployment)


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_every_container_runs_as_non_root_with_resource_requests(name: str) -> None:
    for workload, container in pod_containers(rendered(name)):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["resources"]["requests"], container["name"]


def gpu_limits(container: dict[str, Any]) -> int:
    return int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("value_set", ["default", "gpu-external-redis"])
def test_targets_ask_for_gpus(value_set: str) -> None:
    found = service_containers(render(value_set))
    assert gpu_limits(found["target"]) == 1
    assert gpu_limits(found["router"]) == 0
    target = by_component(render(value_set), "Deployment")["target"]
    tolerations = target["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_cpu_demo_has_no_gpus() -> None:
    objs = render("cpu-demo")
    for _, container in pod_containers(objs):
        assert not any("gpu" in name for name in container["resources"].get("limits", {})), container["name"]
    found = service_containers(objs)
    assert flag_value(found["target"]["args"], "--device") == "cpu"
    assert flag_value(found["target"]["args"], "--model") == "smollm2-135m"
    assert flag_value(found["draft"]["args"], "--drafter") == "ngram"
    assert "--model" not in found["draft"]["args"]
    assert found["target"]["image"].endswith("-cpu")


def test_gpu_value_set_loads_models_from_the_volume() -> None:
    objs = render("gpu-external-redis")
    found = service_containers(objs)
    assert flag_value(found["target"]["args"], "--model") == "/models/Qwen2.5-7B-Instruct"
    assert flag_value(found["draft"]["args"], "--model") == "/models/Qwen2.5-0.5B-Instruct"
    assert gpu_limits(found["draft"]) == 1
    for service, container in found.items():
        assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"], service
    for deployment in objects(objs, "Deployment"):
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "qwen-models", "readOnly": True}
        assert "emptyDir" in volumes["cache"]


def test_hub_models_are_fetched_by_an_init_container() -> None:
    objs = render("default", HUB_TARGET)
    deployments = by_component(objs, "Deployment")
    folder = "/cache/huggingface/models/Qwen/Qwen2.5-7B-Instruct"
    assert flag_value(containers(deployments["target"])[0]["args"], "--model") == folder
    for service, weights in (("target", "false"), ("router", "true")):
        (init,) = deployments[service]["spec"]["template"]["spec"]["initContainers"]
        assert init["command"] == ["python", "-c"]
        assert init["args"][1:] == ["Qwen/Qwen2.5-7B-Instruct", "", folder, weights], service
        assert {"name": "cache", "mountPath": "/cache"} in init["volumeMounts"]
    assert "initContainers" not in deployments["draft"]["spec"]["template"]["spec"]  # a preset
    assert "--tokenizer" not in containers(deployments["router"])[0]["args"]


def test_cache_volume_is_mounted_everywhere() -> None:
    for value_set in VALUE_SETS:
        for service, container in service_containers(render(value_set)).items():
            assert {"name": "cache", "mountPath": "/cache"} in container["volumeMounts"], (value_set, service)
            assert env_map(container)["SPECFLEET_CACHE"]["value"] == "/cache"


def test_autoscaled_deployments_leave_replicas_to_the_hpa() -> None:
    objs = render("gpu-external-redis")
    hpas = by_component(objs, "HorizontalPodAutoscaler")
    assert set(hpas) == {"draft", "target"}
    for service, deployment in by_component(objs, "Deployment").items():
        assert ("replicas" in deployment["spec"]) == (service == "router"), service
    for service, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": f"{FULLNAME}-{service}"}
    assert not objects(render("default"), "HorizontalPodAutoscaler")


def adapter_rules() -> list[dict[str, Any]]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


def test_the_hpas_scale_on_metrics_the_shipped_adapter_rules_serve() -> None:
    """prometheus-adapter-values.yaml turns exported gauges into per-pod custom metrics, named as the HPAs ask."""
    rules = adapter_rules()
    served = set()
    for rule in rules:
        series = re.fullmatch(r"([\w:]+)\{(.*)\}", rule["seriesQuery"])
        assert series, rule["seriesQuery"]
        assert series.group(1) in COUNTERS_AND_GAUGES | {n for n, t in VLLM_FAMILIES.items() if t == "gauge"}
        assert 'namespace!=""' in series.group(2) and 'pod!=""' in series.group(2)  # the ServiceMonitor's labels
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert re.fullmatch(rule["name"]["matches"], series.group(1))
        served.add(rule["name"]["as"])
    hpas = by_component(render("gpu-external-redis"), "HorizontalPodAutoscaler")
    asked = {metric["pods"]["metric"]["name"] for hpa in hpas.values() for metric in hpa["spec"]["metrics"]
             if metric["type"] == "Pods"}
    assert asked and asked <= served
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert defaults["target"]["autoscaling"]["customMetric"]["name"] in served


def test_pdbs_select_their_component() -> None:
    objs = render("default")
    pdbs = by_component(objs, "PodDisruptionBudget")
    assert set(pdbs) == set(SERVICES)
    deployments = by_component(objs, "Deployment")
    for service, pdb in pdbs.items():
        assert pdb["spec"]["selector"]["matchLabels"] == deployments[service]["spec"]["selector"]["matchLabels"]


# ---------------------------------------------------------------------------------------------------------------------
# RBAC, Services, discovery


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_role_grants_only_endpointslice_reads_in_the_namespace(value_set: str) -> None:
    objs = render(value_set)
    assert not objects(objs, "ClusterRole") and not objects(objs, "ClusterRoleBinding")
    (role,) = objects(objs, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]
    (binding,) = objects(objs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    (account,) = objects(objs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    for service, deployment in by_component(objs, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        if service == "router":
            assert pod["serviceAccountName"] == account["metadata"]["name"]
            assert pod["automountServiceAccountToken"] is True
        else:
            assert pod["automountServiceAccountToken"] is False, service


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_router_service_exposes_the_public_port(value_set: str) -> None:
    objs = render(value_set)
    router = by_component(objs, "Service")["router"]
    assert router["spec"].get("clusterIP") != "None"
    grpc = next(port for port in router["spec"]["ports"] if port["name"] == "grpc")
    assert (grpc["port"], grpc["targetPort"], grpc["appProtocol"]) == (50050, "grpc", "grpc")
    container = service_containers(objs)["router"]
    assert {"name": "grpc", "containerPort": 50050, "protocol": "TCP"} in container["ports"]
    assert router["spec"]["selector"] == by_component(objs, "Deployment")["router"]["spec"]["selector"]["matchLabels"]
    http = next(port for port in router["spec"]["ports"] if port["name"] == "http")
    assert (http["port"], http["targetPort"], http["appProtocol"]) == (8000, "http", "http")
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in container["ports"]


def test_the_openai_api_is_on_by_default_and_can_be_turned_off() -> None:
    from specfleet.cli import build_parser
    from specfleet.config import RouterConfig, from_arguments

    for sets, port in (((), 8000), (("router.httpPort=8080",), 8080), (("router.httpPort=0",), 0)):
        objs = render(sets=sets)
        args = service_containers(objs)["router"]["args"]
        assert from_arguments(RouterConfig, build_parser().parse_args(args)).http_port == port, sets
        ports = by_component(objs, "Service")["router"]["spec"]["ports"]
        assert [p["port"] for p in ports if p["name"] == "http"] == ([port] if port else [])


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_draft_and_target_services_are_headless_and_watched_by_the_router(value_set: str) -> None:
    objs = render(value_set)
    services = by_component(objs, "Service")
    router_args = service_containers(objs)["router"]["args"]
    for service, port in (("draft", 50051), ("target", 50052)):
        spec = services[service]["spec"]
        assert spec["clusterIP"] == "None", service
        assert {"name": "grpc", "port": port, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"} in (
            spec["ports"])
        flag = "--drafts" if service == "draft" else "--targets"
        assert flag_value(router_args, flag) == f"k8s://{FULLNAME}-{service}.{NAMESPACE}:{port}"


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_router_accepts_the_flags_the_chart_passes(value_set: str) -> None:
    from specfleet.cli import build_parser
    from specfleet.config import RouterConfig, ServicePool, from_arguments

    args = build_parser().parse_args(service_containers(render(value_set))["router"]["args"])
    config = from_arguments(RouterConfig, args)
    assert config.target_pool == ServicePool(f"{FULLNAME}-target", NAMESPACE, "50052")
    assert config.draft_pool == ServicePool(f"{FULLNAME}-draft", NAMESPACE, "50051")


def test_without_drafts_the_router_runs_plain_decoding() -> None:
    objs = render("default", ("draft.enabled=false",))
    assert "draft" not in by_component(objs, "Deployment")
    assert "draft" not in by_component(objs, "Service")
    assert flag_value(service_containers(objs)["router"]["args"], "--drafts") == ""


def test_a_llamacpp_draft_gets_its_model_and_its_tree_slots() -> None:
    args = service_containers(render("default", ("draft.drafter=llamacpp",)))["draft"]["args"]
    assert (flag_value(args, "--drafter"), flag_value(args, "--model")) == ("llamacpp", "qwen2.5-coder-0.5b")
    assert flag_value(args, "--tree-slots") == "8"
    args = service_containers(render("default", ("draft.drafter=llamacpp", "draft.treeSlots=0")))["draft"]["args"]
    assert flag_value(args, "--tree-slots") == "0"
    assert "--tree-slots" not in service_containers(render("default"))["draft"]["args"]  # a model drafter has none


def test_router_passes_depth_and_limits() -> None:
    args = service_containers(render("default"))["router"]["args"]
    assert (flag_value(args, "--depth"), flag_value(args, "--max-depth")) == ("auto", "16")
    args = service_containers(render("cpu-demo"))["router"]["args"]
    assert flag_value(args, "--depth") == "4"


# ---------------------------------------------------------------------------------------------------------------------
# Redis


def test_in_cluster_redis_with_chart_secret() -> None:
    objs = render("default")
    (statefulset,) = objects(objs, "StatefulSet")
    (secret,) = objects(objs, "Secret")
    assert secret["metadata"]["name"] == f"{FULLNAME}-redis"
    assert "redis-password" in secret["data"]
    redis = containers(statefulset)[0]
    assert env_map(redis)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-redis",
                                                                              "key": "redis-password"}
    assert "--requirepass" in redis["args"]
    for service, container in service_containers(objs).items():
        assert env_map(container)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == f"{FULLNAME}-redis"
        url = flag_value(container["args"], "--redis-url")
        assert url == f"redis://:$(REDIS_PASSWORD)@{FULLNAME}-redis:6379/0", service


def test_redis_without_password() -> None:
    objs = render("cpu-demo")
    assert not objects(objs, "Secret")
    assert len(objects(objs, "StatefulSet")) == 1
    for container in service_containers(objs).values():
        assert "REDIS_PASSWORD" not in env_map(container)
        assert flag_value(container["args"], "--redis-url") == f"redis://{FULLNAME}-redis:6379/0"


def test_external_redis_password_from_existing_secret() -> None:
    objs = render("gpu-external-redis")
    assert not objects(objs, "StatefulSet")
    assert not objects(objs, "Secret")
    assert "redis" not in by_component(objs, "Service")
    for service, container in service_containers(objs).items():
        password = env_map(container)["REDIS_PASSWORD"]
        assert password["valueFrom"]["secretKeyRef"] == {"name": "specfleet-redis", "key": "password"}, service
        assert flag_value(container["args"], "--redis-url") == (
            "redis://:$(REDIS_PASSWORD)@redis-master.data.svc.cluster.local:6379/0")


# ---------------------------------------------------------------------------------------------------------------------
# metrics and OpenTelemetry


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_metrics_port_on_containers_and_services(value_set: str) -> None:
    objs = render(value_set)
    services = by_component(objs, "Service")
    for service, container in service_containers(objs).items():
        assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in container["ports"]
        assert flag_value(container["args"], "--metrics-port") == "9464"
        assert {"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"} in (
            services[service]["spec"]["ports"])


def test_service_monitor_needs_values_and_the_operator() -> None:
    assert not objects(render("gpu-external-redis"), "ServiceMonitor")  # enabled, but no Prometheus Operator
    assert not objects(render("default", (), (SERVICE_MONITOR_API,)), "ServiceMonitor")  # operator, not enabled
    (monitor,) = objects(rendered("gpu-external-redis+servicemonitor"), "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_the_canary_alert_needs_the_operator_and_parses_with_promtool(tmp_path: Path) -> None:
    """The PrometheusRule comes with the ServiceMonitor (where the operator serves the kind), and promtool accepts
    its rules, which read a metric the router exports."""
    assert not objects(render("default", ("serviceMonitor.enabled=true",), (SERVICE_MONITOR_API,)), "PrometheusRule")
    everything = rendered("everything")
    (rule,) = objects(everything, "PrometheusRule")
    alerts = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    assert [a["alert"] for a in alerts] == ["SpecfleetCanaryMismatch"]
    assert set(re.findall(r"\bspecfleet_[a-z0-9_]+", alerts[0]["expr"])) <= KNOWN_SERIES
    assert not objects(render("default", ("serviceMonitor.enabled=true", "serviceMonitor.alerts=false"),
                              (SERVICE_MONITOR_API, PROMETHEUS_RULE_API)), "PrometheusRule")
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, width=1000))
    result = subprocess.run([promtool_binary(), "check", "rules", str(rules_file)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    (router,) = [c for c in service_containers(everything).values() if flag_value(c["args"], "--canary-share")]
    assert flag_value(router["args"], "--canary-share") == "0.01"


def test_opentelemetry_environment() -> None:
    for service, container in service_containers(render("default")).items():
        env = {name: item.get("value") for name, item in env_map(container).items()}
        assert env["OTEL_SERVICE_NAME"] == f"specfleet-{service}"
        assert env["OTEL_TRACES_EXPORTER"] == env["OTEL_METRICS_EXPORTER"] == "none"
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env
        assert "k8s.pod.name=$(POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"]
        names = list(env)
        assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")  # $(VAR) needs VAR defined first
    for service, container in service_containers(render("gpu-external-redis")).items():
        env = {name: item.get("value") for name, item in env_map(container).items()}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc:4317", service
        assert env["OTEL_TRACES_EXPORTER"] == env["OTEL_METRICS_EXPORTER"] == "otlp"
        assert "deployment.environment=production" in env["OTEL_RESOURCE_ATTRIBUTES"]


def test_otel_enabled_without_endpoint_fails() -> None:
    result = template("default", ("otel.enabled=true",))
    assert result.returncode != 0 and "otel.endpoint" in result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# values schema


@pytest.mark.parametrize(("bad", "key"), [
    ("target.replicas=-1", "replicas"),
    ("router.replicas=-3", "replicas"),
    ("router.depth=17", "depth"),
    ("router.depth=-1", "depth"),
    ("router.depth=deep", "depth"),
    ("router.maxDepth=17", "maxDepth"),
    ("draft.drafter=medusa", "drafter"),
    ("router.port=70000", "port"),
    ("router.httpPort=70000", "httpPort"),
    ("otel.protocol=http/json", "protocol"),  # the services export OTLP over grpc or http/protobuf only
    ("target.port=0", "port"),
    ("metrics.port=65536", "port"),
    ("target.gpu=-1", "gpu"),
    ("target.numSlots=0", "numSlots"),
    ("target.device=tpu", "device"),
    ("target.dtype=int8", "dtype"),
    ("target.model.source=s3", "source"),
    ("target.model.name=llama-3", "name"),  # not a preset
    ("target.model.source=path", "name"),  # a path must be absolute
    ("router.targets=not an address", "targets"),
    ("router.drafts=k8s://fleet-draft.llm", "drafts"),  # no port
    ("router.targets=k8s://Fleet-Target.llm:grpc", "targets"),  # not a Service name
    ("externalRedis.url=redis://user:secret@host:6379/0", "url"),
    ("logLevel=LOUD", "logLevel"),
    ("target.replica=2", "replica"),  # a typo: unknown key
    # a llamacpp draft runs a GGUF file (a preset's or a path), not a hub model folder
    ("draft.drafter=llamacpp,draft.model.source=huggingface,draft.model.name=Qwen/Qwen2.5-0.5B", "source"),
    ("tagret.replicas=2", "tagret"),  # an unknown top-level key
])
def test_schema_rejects_bad_values(bad: str, key: str) -> None:
    result = template("default", (bad,))
    assert result.returncode != 0, f"--set {bad} was accepted"
    assert "schema" in result.stderr, result.stderr
    assert key in result.stderr, result.stderr


def test_depth_above_max_depth_fails() -> None:
    result = template("default", ("router.maxDepth=4", "router.depth=6"))
    assert result.returncode != 0 and "router.maxDepth" in result.stderr


@pytest.mark.parametrize("good", ["router.depth=auto", "router.depth=0", "router.depth=16", "target.replicas=0",
                                  "router.targets=k8s://big-model.serving:grpc", "router.targets=k8s://big-model:50052",
                                  "draft.drafter=ngram", "target.device=cuda:1"])
def test_schema_accepts_good_values(good: str) -> None:
    result = template("default", (good,))
    assert result.returncode == 0, result.stderr


def test_schema_is_strict_about_shape() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    for service in (*SERVICES, "redis", "externalRedis"):
        assert schema["properties"][service]["additionalProperties"] is False, service


# ---------------------------------------------------------------------------------------------------------------------
# Grafana dashboards

def test_dashboards_exist() -> None:
    assert [path.name for path in DASHBOARDS] == ["overview.json", "speculation.json"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_shape(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["title"] == f"specfleet {path.stem}"
    assert dashboard["uid"] == f"specfleet-{path.stem}"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboards_use_only_exported_metrics_and_cover_them() -> None:
    used = set()
    for path in DASHBOARDS:
        for expr in expressions(path):
            names = set(re.findall(r"\bspecfleet_[a-z0-9_]+", expr))
            assert names <= KNOWN_SERIES, f"{path.name}: unknown series {names - KNOWN_SERIES} in {expr}"
            used |= names
    families = {re.sub(r"_(bucket|sum|count)$", "", name) if name not in COUNTERS_AND_GAUGES else name
                for name in used}
    assert families == COUNTERS_AND_GAUGES | HISTOGRAMS


def test_dashboard_queries_parse_with_promtool(tmp_path: Path) -> None:
    """Each panel query becomes a recording rule; `promtool check rules` parses them all offline."""
    import yaml

    rules = [{"record": f"specfleet:dashboard_query:{i}", "expr": as_promql(expr)}
             for i, expr in enumerate(expr for path in DASHBOARDS for expr in expressions(path))]
    assert len(rules) >= 30
    rules_file = tmp_path / "dashboard-queries.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, width=1000))
    result = subprocess.run([promtool_binary(), "check", "rules", str(rules_file)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_promtool_rejects_a_broken_query(tmp_path: Path) -> None:
    """The check above would catch a bad query (guards against promtool accepting anything)."""
    import yaml

    rules_file = tmp_path / "broken.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "specfleet:broken", "expr": "sum(rate(specfleet_requests_total[5m])"}]}]}))
    result = subprocess.run([promtool_binary(), "check", "rules", str(rules_file)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_dashboards_configmaps(value_set: str) -> None:
    maps = [cm for cm in objects(render(value_set), "ConfigMap") if "grafana_dashboard" in cm["metadata"]["labels"]]
    assert len(maps) == len(DASHBOARDS)
    for configmap, path in zip(sorted(maps, key=lambda cm: cm["metadata"]["name"]), DASHBOARDS, strict=True):
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert configmap["metadata"]["name"] == f"{FULLNAME}-dashboard-{path.stem}"
        assert list(configmap["data"]) == [path.name]
        assert json.loads(configmap["data"][path.name]) == json.loads(path.read_text())


def test_dashboards_can_be_turned_off() -> None:
    assert not objects(render("default", ("dashboards.enabled=false",)), "ConfigMap")


# ---------------------------------------------------------------------------------------------------------------------
# security: API keys, the internal token and TLS from existing Secrets

SECURED = ("security.apiKeys.existingSecret=keys", "security.adminKeys.existingSecret=admins",
           "security.internalToken.existingSecret=token",
           "security.tls.existingSecret=router-tls")


def secret_env(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container["env"] if e["name"].startswith("SPECFLEET_") and "valueFrom" in e}


def test_without_secrets_nothing_is_sealed() -> None:
    containers = service_containers(render())
    assert all(not secret_env(c) and "--tls-cert" not in c["args"] for c in containers.values())


def test_secrets_reach_the_services_that_check_them() -> None:
    from specfleet.cli import build_parser
    from specfleet.config import RouterConfig, from_arguments

    objs = render(sets=SECURED)
    containers = service_containers(objs)
    assert secret_env(containers["router"]) == {"SPECFLEET_INTERNAL_TOKEN": ("token", "token"),
                                                "SPECFLEET_API_KEYS": ("keys", "api-keys"),
                                                "SPECFLEET_ADMIN_KEYS": ("admins", "admin-keys")}
    for service in ("draft", "target"):  # they check the token; API keys are the router's business
        assert secret_env(containers[service]) == {"SPECFLEET_INTERNAL_TOKEN": ("token", "token")}, service
    config = from_arguments(RouterConfig, build_parser().parse_args(containers["router"]["args"]))
    assert (config.tls_cert, config.tls_key) == ("/etc/specfleet/tls/tls.crt", "/etc/specfleet/tls/tls.key")
    assert {"name": "tls", "mountPath": "/etc/specfleet/tls", "readOnly": True} in containers["router"]["volumeMounts"]
    pod = by_component(objs, "Deployment")["router"]["spec"]["template"]["spec"]
    assert {"name": "tls", "secret": {"secretName": "router-tls"}} in pod["volumes"]


def kubelet_env(container: dict[str, Any], secrets: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet makes it: secrets by key, then each ``$(NAME)`` in a value from
    the variables defined above it."""
    env: dict[str, str] = {}
    for var in container["env"]:
        if "secretKeyRef" in var.get("valueFrom", {}):
            env[var["name"]] = secrets.get(var["valueFrom"]["secretKeyRef"]["key"], "")
        elif "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
    return env


def test_draft_and_target_also_answer_the_routers_of_other_releases(monkeypatch: pytest.MonkeyPatch) -> None:
    from specfleet.security import INTERNAL_TOKEN_ENV, internal_token, internal_tokens

    containers = service_containers(render(sets=(*SECURED, "security.internalToken.otherRoutersKey=others")))
    assert secret_env(containers["router"])["SPECFLEET_INTERNAL_TOKEN"] == ("token", "token")  # it sends its own
    secrets = {"token": "ours", "others": "theirs\nand-theirs\n"}
    for service in ("draft", "target"):
        monkeypatch.setenv(INTERNAL_TOKEN_ENV, kubelet_env(containers[service], secrets)[INTERNAL_TOKEN_ENV])
        assert internal_tokens("") == {"ours", "theirs", "and-theirs"}, service
    monkeypatch.setenv(INTERNAL_TOKEN_ENV, "ours")
    assert internal_token("") == "ours"


def test_a_tls_router_without_the_http_api_is_probed_on_its_port() -> None:
    router = service_containers(render(sets=(*SECURED, "router.httpPort=0")))["router"]
    assert all(router[p]["tcpSocket"] == {"port": "grpc"} for p in ("livenessProbe", "readinessProbe"))


def test_the_public_example_seals_everything() -> None:
    containers = service_containers(render("gpu-external-redis"))
    assert "SPECFLEET_API_KEYS" in secret_env(containers["router"]) and "--tls-cert" in containers["router"]["args"]
    assert all("SPECFLEET_INTERNAL_TOKEN" in secret_env(c) for c in containers.values())


def test_the_engines_dtype_reaches_draft_and_target() -> None:
    from specfleet.cli import build_parser
    from specfleet.config import DraftConfig, TargetConfig, from_arguments

    containers = service_containers(render(sets=("target.dtype=bfloat16", "draft.dtype=float16")))
    parser = build_parser()
    assert from_arguments(TargetConfig, parser.parse_args(containers["target"]["args"])).dtype == "bfloat16"
    assert from_arguments(DraftConfig, parser.parse_args(containers["draft"]["args"])).dtype == "float16"


# ---------------------------------------------------------------------------------------------------------------------
# the target's backend


def test_a_llamacpp_target_runs_the_gguf_backend_and_refuses_a_hub_model() -> None:
    from specfleet.cli import build_parser
    from specfleet.config import TargetConfig, from_arguments

    assert "--backend" not in service_containers(render())["target"]["args"]  # the engine: the service's default
    args = service_containers(render(sets=("target.backend=llamacpp", "target.model.name=smollm2-135m",
                                           "target.extraArgs[0]=--threads=2")))["target"]["args"]
    config = from_arguments(TargetConfig, build_parser().parse_args(args))
    assert (config.backend, config.model, config.threads) == ("llamacpp", "smollm2-135m", 2)
    hub = template(sets=("target.backend=llamacpp", "target.model.source=huggingface",
                         "target.model.name=Qwen/Qwen2.5-7B-Instruct"))
    assert hub.returncode != 0 and "target.backend llamacpp runs a GGUF file" in hub.stderr
    wrong = template(sets=("target.backend=vllm",))
    assert wrong.returncode != 0 and "/target/backend" in wrong.stderr
