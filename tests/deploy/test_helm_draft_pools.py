"""The chart's draftPools: several draft pools of different kinds, each its own Deployment, headless Service,
PodDisruptionBudget and HorizontalPodAutoscaler, with draft: as every pool's defaults, and the router's --drafts
naming each pool. With draftPools empty the chart renders what it always did (one pool, "<fullname>-draft").

Needs ``helm`` (see tests/helm_tools.py).
"""

from __future__ import annotations

import functools
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from dashboards import DASHBOARDS, expressions
from helm_tools import (
    CHART,
    FULLNAME,
    NAMESPACE,
    PROMETHEUS_RULE_API,
    RELEASE,
    SERVICE_MONITOR_API,
    VALUE_SETS,
    component,
    containers,
    env_map,
    flag_value,
    objects,
    render,
    run_helm,
    schema_errors,
)

POOL_LABEL = "specfleet/draft-pool"
TARGET_MODEL = "qwen2.5-coder-1.5b"  # values.yaml's target.model.name
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# The docs' example: prompt lookup for short code edits, the target's own weights over a sparse cache for long
# documents.
TWO_POOLS: dict[str, Any] = {"draftPools": [
    {"name": "ngram", "drafter": "ngram", "replicas": 3, "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
     "extraArgs": ["--ngram-max", "4"], "pdb": {"enabled": False}},
    {"name": "sparse", "drafter": "sparse_self", "sparseWindow": 496, "image": {"flavor": "cuda"}, "gpu": 1,
     "resources": {"requests": {"cpu": "2", "memory": "16Gi"}, "limits": {"memory": "32Gi"}},
     "nodeSelector": {"nvidia.com/gpu.present": "true"}, "tolerations": [GPU_TOLERATION],
     "autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": 0,
                     "customMetric": {"name": "specfleet_service_live_sequences", "targetAverageValue": "24"}}},
]}
MONITORED = (SERVICE_MONITOR_API, PROMETHEUS_RULE_API)


def helm_template(values: dict[str, Any], api_versions: tuple[str, ...] = (),
                  release: str = RELEASE) -> tuple[int, str, str]:
    """``helm template`` of the chart with ``values`` as a values file: (return code, stdout, stderr)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="values-") as handle:
        yaml.safe_dump(values, handle)
        handle.flush()
        args = ["template", release, str(CHART), "--namespace", NAMESPACE, "--values", handle.name]
        for api in api_versions:
            args += ["--api-versions", api]
        result = run_helm(*args)
    return result.returncode, result.stdout, result.stderr


@functools.cache
def _render_json(values_json: str, api_versions: tuple[str, ...], release: str) -> tuple[dict[str, Any], ...]:
    code, out, err = helm_template(json.loads(values_json), api_versions, release)
    if code != 0:
        pytest.fail(f"helm template failed:\n{err}", pytrace=False)
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def render_values(values: dict[str, Any], api_versions: tuple[str, ...] = (),
                  release: str = RELEASE) -> tuple[dict[str, Any], ...]:
    """The chart's objects for ``values`` (cached), parsed; fails the test on errors."""
    return _render_json(json.dumps(values, sort_keys=True), api_versions, release)


def drafts(rendered: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    """The draft objects of ``kind`` by name."""
    return {obj["metadata"]["name"]: obj for obj in objects(rendered, kind) if component(obj) == "draft"}


def router_args(rendered: tuple[dict[str, Any], ...]) -> list[str]:
    (router,) = [d for d in objects(rendered, "Deployment") if component(d) == "router"]
    return containers(router)[0]["args"]


def draft_args(rendered: tuple[dict[str, Any], ...], name: str) -> list[str]:
    return containers(drafts(rendered, "Deployment")[name])[0]["args"]


def parse_draft_args(args: list[str]) -> Any:
    from specfleet.cli import build_parser
    from specfleet.config import DraftConfig, from_arguments

    return from_arguments(DraftConfig, build_parser().parse_args(args))


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# ---------------------------------------------------------------------------------------------------------------------
# draftPools empty: what the chart always rendered


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_without_pools_the_one_draft_pool_keeps_its_names(value_set: str) -> None:
    objs = render(value_set)
    for kind in ("Deployment", "Service"):
        assert list(drafts(objs, kind)) == [f"{FULLNAME}-draft"], kind
    (deployment,) = drafts(objs, "Deployment").values()
    assert deployment["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "specfleet", "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "draft"}  # immutable: an upgrade must not change it
    assert not any(POOL_LABEL in obj["metadata"].get("labels", {}) for obj in objs)
    assert flag_value(router_args(objs), "--drafts") == f"k8s://{FULLNAME}-draft.{NAMESPACE}:50051"


def test_an_empty_list_renders_exactly_the_default() -> None:
    code, out, err = helm_template({"draftPools": [], "redis": {"auth": {"password": "fixed"}}})
    assert code == 0, err
    code, default_out, err = helm_template({"redis": {"auth": {"password": "fixed"}}})
    assert code == 0, err
    assert out == default_out


def test_a_single_sparse_self_draft_loads_the_targets_model() -> None:
    objs = render_values({"draft": {"drafter": "sparse_self", "sparseSinks": 4}})
    config = parse_draft_args(draft_args(objs, f"{FULLNAME}-draft"))
    assert (config.drafter, config.model) == ("sparse_self", TARGET_MODEL)
    assert (config.sparse_sinks, config.sparse_window) == (4, 240)


# ---------------------------------------------------------------------------------------------------------------------
# two pools: ngram and sparse_self


def test_two_pools_render_a_deployment_and_a_service_each() -> None:
    objs = render_values(TWO_POOLS)
    names = [f"{FULLNAME}-draft-ngram", f"{FULLNAME}-draft-sparse"]
    deployments, services = drafts(objs, "Deployment"), drafts(objs, "Service")
    assert sorted(deployments) == sorted(services) == names
    for name in names:
        pool = name.rsplit("-", 1)[1]
        deployment, service = deployments[name], services[name]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector[POOL_LABEL] == pool and selector["app.kubernetes.io/component"] == "draft"
        assert deployment["metadata"]["labels"][POOL_LABEL] == service["metadata"]["labels"][POOL_LABEL] == pool
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"] == selector
        # Each Service selects its own pool's pods only.
        for other in deployments.values():
            pod_labels = other["spec"]["template"]["metadata"]["labels"]
            assert selects(service["spec"]["selector"], pod_labels) == (other is deployment), (name, other)
        env = env_map(containers(deployment)[0])
        assert f"specfleet.draft_pool={pool}" in env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
        assert env["OTEL_SERVICE_NAME"]["value"] == "specfleet-draft"  # the dashboards' and traces' component


def test_the_sparse_self_pool_gets_the_targets_model_and_the_sparse_flags() -> None:
    objs = render_values(TWO_POOLS)
    sparse = parse_draft_args(draft_args(objs, f"{FULLNAME}-draft-sparse"))
    assert (sparse.drafter, sparse.model) == ("sparse_self", TARGET_MODEL)
    assert (sparse.sparse_sinks, sparse.sparse_window) == (16, 496)  # the default sinks, the pool's window
    args = draft_args(objs, f"{FULLNAME}-draft-ngram")
    assert flag_value(args, "--drafter") == "ngram"
    assert not {"--model", "--sparse-sinks", "--sparse-window"} & set(args)


def test_the_router_is_given_every_pool_by_name() -> None:
    from specfleet.config import ServicePool, parse_pool

    objs = render_values(TWO_POOLS)
    value = flag_value(router_args(objs), "--drafts")
    assert value == (f"ngram=k8s://{FULLNAME}-draft-ngram.{NAMESPACE}:50051,"
                     f"sparse=k8s://{FULLNAME}-draft-sparse.{NAMESPACE}:50051")
    services = drafts(objs, "Service")
    for entry in value.split(","):
        name, _, pool = entry.partition("=")
        parsed = parse_pool(pool, "--drafts")
        assert parsed == ServicePool(f"{FULLNAME}-draft-{name}", NAMESPACE, "50051")
        ports = services[parsed.service]["spec"]["ports"]
        assert {"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"} in ports


def test_the_router_parses_the_named_pools() -> None:
    """With the router's named --drafts (specfleet.config.parse_draft_pools), the chart's value names both pools."""
    config = pytest.importorskip("specfleet.config")
    if not hasattr(config, "parse_draft_pools"):
        pytest.skip("this specfleet has no named draft pools (specfleet.config.parse_draft_pools) yet")
    pools = config.parse_draft_pools(flag_value(router_args(render_values(TWO_POOLS)), "--drafts"))
    assert pools == {"ngram": config.ServicePool(f"{FULLNAME}-draft-ngram", NAMESPACE, "50051"),
                     "sparse": config.ServicePool(f"{FULLNAME}-draft-sparse", NAMESPACE, "50051")}


def test_each_pool_overrides_the_draft_defaults() -> None:
    objs = render_values(TWO_POOLS)
    ngram, sparse = (drafts(objs, "Deployment")[f"{FULLNAME}-draft-{pool}"] for pool in ("ngram", "sparse"))
    ngram_pod, sparse_pod = ngram["spec"]["template"]["spec"], sparse["spec"]["template"]["spec"]
    (ngram_container,), (sparse_container,) = ngram_pod["containers"], sparse_pod["containers"]
    assert ngram["spec"]["replicas"] == 3
    assert "replicas" not in sparse["spec"]  # autoscaled
    assert ngram_container["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"}}  # replaced whole
    assert sparse_container["resources"] == {"requests": {"cpu": "2", "memory": "16Gi"},
                                             "limits": {"memory": "32Gi", "nvidia.com/gpu": 1}}
    assert ngram_container["image"].endswith("-cpu") and sparse_container["image"].endswith("-cuda")
    assert sparse_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and "nodeSelector" not in ngram_pod
    assert sparse_pod["tolerations"] == [GPU_TOLERATION] and "tolerations" not in ngram_pod
    assert parse_draft_args(ngram_container["args"]).ngram_max == 4 and "--ngram-max" not in sparse_container["args"]
    # What a pool does not set comes from draft: (values.yaml's defaults).
    for container in (ngram_container, sparse_container):
        assert flag_value(container["args"], "--num-slots") == "32"
        assert flag_value(container["args"], "--top-k-pairs") == "64"


def test_hpa_and_pdb_per_pool() -> None:
    objs = render_values(TWO_POOLS)
    (hpa,) = drafts(objs, "HorizontalPodAutoscaler").values()
    assert hpa["metadata"]["name"] == f"{FULLNAME}-draft-sparse"
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{FULLNAME}-draft-sparse"
    # The pool set enabled, a CPU target of 0 and its metric; min and max replicas are draft:'s.
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 8)
    assert [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]] == ["specfleet_service_live_sequences"]
    (pdb,) = drafts(objs, "PodDisruptionBudget").values()  # the ngram pool turned its PDB off
    sparse = drafts(objs, "Deployment")[f"{FULLNAME}-draft-sparse"]
    assert pdb["metadata"]["name"] == f"{FULLNAME}-draft-sparse"
    assert pdb["spec"]["selector"]["matchLabels"] == sparse["spec"]["selector"]["matchLabels"]


def test_the_pools_objects_validate_against_kubernetes_schemas() -> None:
    """The same strict check test_helm.py makes of every rendering, over the pools with every switch on."""
    values = {**TWO_POOLS, "serviceMonitor": {"enabled": True}, "metrics": {"podAnnotations": True},
              "target": {"model": {"source": "huggingface", "name": "Qwen/Qwen2.5-7B-Instruct"}},
              "router": {"tokenizer": ""}}
    objs = render_values(values, MONITORED)
    assert len(drafts(objs, "Deployment")) == 2
    errors = schema_errors(objs)  # the CRDs are checked below
    assert not errors, "\n".join(errors)
    # A hub target: the sparse_self pool downloads the target's weights before it starts, like the target.
    sparse = drafts(objs, "Deployment")[f"{FULLNAME}-draft-sparse"]["spec"]["template"]["spec"]
    (init,) = sparse["initContainers"]
    assert init["args"][1:] == ["Qwen/Qwen2.5-7B-Instruct", "", "/cache/huggingface/models/Qwen/Qwen2.5-7B-Instruct",
                                "false"]
    assert flag_value(sparse["containers"][0]["args"], "--model") == (
        "/cache/huggingface/models/Qwen/Qwen2.5-7B-Instruct")
    assert "initContainers" not in drafts(objs, "Deployment")[f"{FULLNAME}-draft-ngram"]["spec"]["template"]["spec"]


def test_the_pools_pods_are_probed_and_drain() -> None:
    for deployment in drafts(render_values(TWO_POOLS), "Deployment").values():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"] == {"port": 50051}
        drain = float(flag_value(container["args"], "--drain-timeout-s"))
        assert 0 < drain <= pod["terminationGracePeriodSeconds"] - 5
        assert pod["automountServiceAccountToken"] is False


def test_the_chart_lints_with_pools(tmp_path: Path) -> None:
    values = tmp_path / "pools.yaml"
    values.write_text(yaml.safe_dump(TWO_POOLS))
    result = run_helm("lint", "--strict", str(CHART), "--values", str(values))
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# discovery and monitoring reach every pool


def test_the_routers_role_reads_every_pools_endpointslices() -> None:
    """EndpointSlices are named after their Service plus a random suffix: the Role grants reads of all of them in the
    namespace (no resourceNames), so it covers any number of pools, and the router's ServiceAccount is bound to it."""
    objs = render_values(TWO_POOLS)
    (role,) = objects(objs, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]
    (binding,) = objects(objs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert all(service["metadata"]["namespace"] == NAMESPACE for service in drafts(objs, "Service").values())


def test_the_service_monitor_scrapes_every_pool_and_labels_it() -> None:
    objs = render_values({**TWO_POOLS, "serviceMonitor": {"enabled": True}}, MONITORED)
    (monitor,) = objects(objs, "ServiceMonitor")
    selector = monitor["spec"]["selector"]
    (expression,) = selector["matchExpressions"]
    services = drafts(objs, "Service")
    assert len(services) == 2
    for name, service in services.items():
        labels = service["metadata"]["labels"]
        assert selects(selector["matchLabels"], labels), name
        assert labels[expression["key"]] in expression["values"], name
        assert any(port["name"] == "metrics" for port in service["spec"]["ports"]), name
    relabelings = monitor["spec"]["endpoints"][0]["relabelings"]
    assert {"sourceLabels": ["__meta_kubernetes_service_label_specfleet_draft_pool"],
            "targetLabel": "draft_pool"} in relabelings
    assert objects(objs, "PrometheusRule")  # the alerts read the router's metrics, whatever the pools
    # Without pools the ServiceMonitor is what it was.
    (monitor,) = objects(render_values({"serviceMonitor": {"enabled": True}}, MONITORED), "ServiceMonitor")
    assert len(monitor["spec"]["endpoints"][0]["relabelings"]) == 1


def test_the_dashboards_do_not_select_by_service_or_job() -> None:
    """The pools' series differ from a single pool's by job, service, pod and draft_pool; the dashboards select by
    none of these, so they sum over every pool."""
    per_object = {"job", "service", "pod", "instance", "container", "endpoint", "draft_pool"}
    for path in DASHBOARDS:
        for expr in expressions(path):
            matchers = set(re.findall(r"\b([a-zA-Z_]+)\s*(?:=~|!~|!=|=)\s*\"", expr))
            assert not matchers & per_object, (path.name, expr)


# ---------------------------------------------------------------------------------------------------------------------
# switches, overrides and names


def test_draft_enabled_false_turns_every_pool_off() -> None:
    objs = render_values({**TWO_POOLS, "draft": {"enabled": False}})
    assert not drafts(objs, "Deployment") and not drafts(objs, "Service")
    assert flag_value(router_args(objs), "--drafts") == ""


def test_a_pool_can_be_left_out() -> None:
    pools = [{"name": "ngram", "drafter": "ngram", "enabled": False}, {"name": "model"}]
    objs = render_values({"draftPools": pools})
    assert list(drafts(objs, "Deployment")) == [f"{FULLNAME}-draft-model"]
    assert flag_value(router_args(objs), "--drafts") == f"model=k8s://{FULLNAME}-draft-model.{NAMESPACE}:50051"
    assert flag_value(draft_args(objs, f"{FULLNAME}-draft-model"), "--model") == "qwen2.5-coder-0.5b"  # draft:'s


def test_router_drafts_overrides_the_pools() -> None:
    value = "ngram=k8s://elsewhere.other:grpc,ngram=10.0.0.7:50051"
    objs = render_values({**TWO_POOLS, "router": {"drafts": value}})
    assert flag_value(router_args(objs), "--drafts") == value
    assert len(drafts(objs, "Deployment")) == 2


def test_a_sparse_self_pool_may_name_its_own_model() -> None:
    model = {"source": "path", "name": "/models/qwen-7b"}
    objs = render_values({"draftPools": [{"name": "sparse", "drafter": "sparse_self", "model": model}]})
    assert flag_value(draft_args(objs, f"{FULLNAME}-draft-sparse"), "--model") == "/models/qwen-7b"


def test_long_names_fit_a_dns_label() -> None:
    release = "a-release-name-long-enough-to-need-shortening"
    pool = "p" * 40
    objs = render_values({"draftPools": [{"name": pool}]}, release=release)
    (service,) = drafts(objs, "Service")
    assert len(service) <= 63 and service.endswith(f"-draft-{pool}")
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", service)
    assert flag_value(router_args(objs), "--drafts") == f"{pool}=k8s://{service}.{NAMESPACE}:50051"


def test_a_duplicate_pool_name_fails() -> None:
    code, _, err = helm_template({"draftPools": [{"name": "ngram", "drafter": "ngram"},
                                                 {"name": "ngram", "drafter": "model"}]})
    assert code != 0
    assert 'draftPools: more than one pool is named "ngram"' in err, err


def test_a_llamacpp_pool_inheriting_a_hub_model_fails() -> None:
    code, _, err = helm_template({"draft": {"drafter": "llamacpp"}, "draftPools": [
        {"name": "gguf", "model": {"source": "huggingface", "name": "Qwen/Qwen2.5-0.5B"}}]})
    assert code != 0 and "draftPools[gguf]" in err and "GGUF" in err, err


@pytest.mark.parametrize(("pool", "where"), [
    ({"name": "Ngram"}, "name"),  # not lowercase
    ({"name": "1gram"}, "name"),  # the router's pool names start with a letter
    ({"name": "ngram-"}, "name"),
    ({"name": "n_gram"}, "name"),  # not a DNS label
    ({"name": "p" * 41}, "name"),
    ({"drafter": "ngram"}, "name"),  # no name
    ({"name": "x", "drafter": "medusa"}, "drafter"),
    ({"name": "x", "replica": 2}, "replica"),  # a typo
    ({"name": "x", "sparseWindow": 0}, "sparseWindow"),
    ({"name": "x", "sparseSinks": -1}, "sparseSinks"),
    ({"name": "x", "autoscaling": {"enabled": "yes"}}, "enabled"),
    ({"name": "x", "drafter": "llamacpp", "model": {"source": "huggingface", "name": "Qwen/Qwen2.5-0.5B"}}, "source"),
    ({"name": "x", "model": {"source": "preset"}}, "name"),  # a model is given whole
])
def test_schema_rejects_bad_pools(pool: dict[str, Any], where: str) -> None:
    code, _, err = helm_template({"draftPools": [pool]})
    assert code != 0, f"{pool} was accepted"
    assert "schema" in err and where in err, err


@pytest.mark.parametrize("values", [
    {"draftPools": [{"name": "a"}]},
    {"draftPools": [{"name": "ngram", "pdb": {"enabled": False}, "probes": {"startup": {"failureThreshold": 9}}}]},
    {"draftPools": [{"name": "model", "model": {"source": "huggingface", "name": "Qwen/Qwen2.5-0.5B"}}]},
    {"router": {"drafts": "ngram=k8s://d-ngram:grpc,sparse=k8s://d-sparse.llm:50053,sparse=10.0.0.1:50053"}},
    {"draft": {"drafter": "sparse_self"}},
])
def test_schema_accepts_good_pools(values: dict[str, Any]) -> None:
    code, _, err = helm_template(values)
    assert code == 0, err


@pytest.mark.parametrize("drafts_value", ["ngram=", "Ngram=k8s://d:grpc", "ngram=k8s://d", "=10.0.0.1:5"])
def test_schema_rejects_bad_named_router_drafts(drafts_value: str) -> None:
    code, _, err = helm_template({"router": {"drafts": drafts_value}})
    assert code != 0 and "drafts" in err, err


def test_the_docs_example_renders_the_two_pools() -> None:
    docs = CHART.parents[2] / "docs" / "kubernetes.md"
    section = docs.read_text().split("## Several draft pools", 1)[1]
    example = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    objs = render_values(example)
    assert flag_value(router_args(objs), "--drafts") == (
        f"ngram=k8s://{FULLNAME}-draft-ngram.{NAMESPACE}:50051,sparse=k8s://{FULLNAME}-draft-sparse.{NAMESPACE}:50051")
    sparse = parse_draft_args(draft_args(objs, f"{FULLNAME}-draft-sparse"))
    assert (sparse.drafter, sparse.model) == ("sparse_self", TARGET_MODEL)


def test_the_values_document_draft_pools() -> None:
    text = (CHART / "values.yaml").read_text()
    assert re.search(r"^# -- Several draft pools.*?^draftPools: \[\]$", text, re.M | re.S)
    for key in ("sparseSinks", "sparseWindow"):
        assert re.search(rf"^  # -- sparse_self drafter only: .*\n  {key}: \d+$", text, re.M), key
    schema = json.loads((CHART / "values.schema.json").read_text())
    pool = schema["definitions"]["draftPool"]
    assert pool["additionalProperties"] is False and pool["required"] == ["name"]
    # Every key of draft: may be set per pool.
    assert set(schema["properties"]["draft"]["properties"]) | {"name"} == set(pool["properties"])
