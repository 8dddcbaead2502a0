"""k8s/: every kustomization renders with `kubectl kustomize`, every object is valid against the
Kubernetes schemas, and the manifests agree with the code (images, ports, probes, settings,
service accounts, the storage claim) and with the least-privilege rules they promise."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from torchrelay import __version__
from torchrelay.shared.bus import principals
from torchrelay.shared.cluster.kubernetes.options import KubeOptions
from torchrelay.shared.runtime.http import OPEN_PATHS

ROOT = Path(__file__).parents[2]
K8S_VERSION = "1.32"
KUSTOMIZATIONS = sorted(p.parent for p in (ROOT / "k8s").rglob("kustomization.yaml"))
SERVICES = ("ingest", "train", "serve", "monitor")
FIELD_VALUES = {"metadata.name": "torchrelay-x-0", "metadata.namespace": "torchrelay",
                "status.podIP": "10.0.0.7"}  # fmt: skip


@cache
def render(folder: Path) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is missing: .ci/run installs it")
        pytest.skip("kubectl is not installed")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, check=False
    )
    assert rendered.returncode == 0, rendered.stderr
    return tuple(doc for doc in yaml.safe_load_all(rendered.stdout) if doc)


def of_kind(objects: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def settings_type(service: str) -> type[BaseModel]:
    module = importlib.import_module(f"torchrelay.services.{service}.settings")
    return next(
        value for name, value in vars(module).items()
        if name.endswith("Settings") and value.__module__ == module.__name__
    )  # fmt: skip


def is_setting(model: type[BaseModel], env_name: str) -> bool:
    """Whether TORCHRELAY_<GROUP>_<FIELD> (or TORCHRELAY_<FIELD>) names a field of ``model``."""
    name = env_name.removeprefix("TORCHRELAY_").lower()
    if name in model.model_fields:
        return True
    group, _, field = name.partition("_")
    annotation = model.model_fields.get(group)
    kind = annotation.annotation if annotation else None
    return isinstance(kind, type) and issubclass(kind, BaseModel) and field in kind.model_fields


def test_there_is_a_base_and_a_gpu_overlay() -> None:
    names = {str(p.relative_to(ROOT / "k8s")) for p in KUSTOMIZATIONS}
    assert {"base", "overlays/gpu"} <= names


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_object_is_valid_against_the_kubernetes_schemas(folder: Path) -> None:
    objects = render(folder)
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "torchrelay"
        if obj["kind"] not in ("Namespace", "PersistentVolume"):
            assert obj["metadata"]["namespace"] == "torchrelay", obj["metadata"]["name"]


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_workload_runs_unprivileged_with_probes_and_resources(folder: Path) -> None:
    objects = render(folder)
    workloads = {**of_kind(objects, "Deployment"), **of_kind(objects, "StatefulSet")}
    assert len(workloads) == 5
    for name, workload in workloads.items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
            assert "memory" in container["resources"]["limits"], name
            assert "livenessProbe" in container, name
            assert "readinessProbe" in container, name
            names = [e["name"] for e in container.get("env", [])]
            assert len(names) == len(set(names)), f"{name}: an environment variable twice"


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_services_agree_with_the_code(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = render(folder)
    deployments = of_kind(objects, "Deployment")
    services = of_kind(objects, "Service")
    for service in SERVICES:
        deployment = deployments[f"torchrelay-{service}"]
        template = deployment["spec"]["template"]
        pod = template["spec"]
        (container,) = pod["containers"]
        assert container["image"] == f"torchrelay/{service}:{__version__}"
        assert container["args"] == ["service", service]
        assert pod["serviceAccountName"] == f"torchrelay-{service}"
        env = {}
        for variable in container["env"]:
            value = variable.get("value")
            if value is None and "secretKeyRef" in variable["valueFrom"]:
                secret = variable["valueFrom"]["secretKeyRef"]
                assert variable["name"] == "TORCHRELAY_NATS_PASSWORD", service
                assert secret == {"name": principals.secret_name(service), "key": "password"}
                value = "from-a-secret"
            elif value is None:
                value = FIELD_VALUES[variable["valueFrom"]["fieldRef"]["fieldPath"]]
            env[variable["name"]] = value
        model = settings_type(service)
        for name in env:
            assert is_setting(model, name), f"{service}: {name} is no setting of the service"
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        settings: Any = model()  # raises if a value is invalid
        for name in env:
            monkeypatch.delenv(name)
        port = settings.http.port
        assert settings.http.host == "0.0.0.0"
        assert settings.nats.url == "nats://nats:4222"
        assert settings.nats.user == service, "each service is its own NATS user"
        assert settings.nats.inbox_prefix == principals.inbox_prefix(service)
        assert (services["nats"]["spec"]["ports"][0]["port"]) == 4222
        assert container["ports"] == [{"name": "http", "containerPort": port}]
        assert template["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["path"] in OPEN_PATHS
            assert container[probe]["httpGet"]["port"] == "http"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert services[f"torchrelay-{service}"]["spec"]["ports"][0]["port"] == port
        dockerfile = (ROOT / "services" / service / "Dockerfile").read_text()
        assert f"EXPOSE {port}\n" in dockerfile
        assert f'CMD ["service", "{service}"]' in dockerfile
        # The pod's stop window is longer than the service's own shutdown deadline.
        assert pod["terminationGracePeriodSeconds"] > settings.shutdown.deadline_s
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        if "storage" in mounts:
            assert mounts["storage"] == str(settings.storage_root)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_training_pods_find_their_claim_and_service_account(folder: Path) -> None:
    objects = render(folder)
    options = KubeOptions()
    claims = of_kind(objects, "PersistentVolumeClaim")
    assert options.storage_claim in claims
    assert claims[options.storage_claim]["spec"]["accessModes"] == ["ReadWriteMany"]
    accounts = of_kind(objects, "ServiceAccount")
    assert accounts[options.workload_service_account]["automountServiceAccountToken"] is False
    env = {
        e["name"]: e.get("value")
        for e in of_kind(objects, "Deployment")["torchrelay-train"]["spec"]["template"]["spec"][
            "containers"
        ][0]["env"]
    }
    assert env["TORCHRELAY_TRAIN_BACKEND"] == "kubernetes"
    assert re.fullmatch(
        rf"torchrelay/train:{re.escape(__version__)}(-cuda)?", env["TORCHRELAY_KUBE_WORKER_IMAGE"]
    )


def rules_of(role: dict[str, Any]) -> dict[tuple[str, str], list[str]]:
    return {
        (group, resource): sorted(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }


def test_only_train_and_serve_use_the_api_and_only_with_the_verbs_they_need() -> None:
    objects = render(ROOT / "k8s" / "base")
    accounts = of_kind(objects, "ServiceAccount")
    for service in ("ingest", "monitor"):
        assert accounts[f"torchrelay-{service}"]["automountServiceAccountToken"] is False
    roles = of_kind(objects, "Role")
    assert set(roles) == {"torchrelay-train", "torchrelay-serve"}
    assert of_kind(objects, "ClusterRole") == {}
    assert rules_of(roles["torchrelay-train"]) == {
        ("batch", "jobs"): ["create", "delete", "get", "list", "watch"],
        ("", "pods"): ["list", "watch"],
        ("", "pods/log"): ["get"],  # the failed rank's log tail, before its Job is deleted
        ("", "events"): ["list"],  # why ranks did not start (FailedCreate, FailedMount)
        ("", "services"): ["create"],
    }
    assert rules_of(roles["torchrelay-serve"]) == {
        ("apps", "deployments"): ["create", "delete", "get", "list", "update", "watch"],
        ("", "services"): ["create", "delete"],  # deleted when its model is undeployed
        ("", "pods"): ["list"],
    }
    for name, binding in of_kind(objects, "RoleBinding").items():
        assert binding["roleRef"]["name"] == name
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": name, "namespace": "torchrelay"}
        ]


def test_the_gpu_overlay_sends_gpu_jobs_to_the_gpu_pool_with_cuda_workers() -> None:
    train = of_kind(render(ROOT / "k8s" / "overlays" / "gpu"), "Deployment")["torchrelay-train"]
    env = {
        e["name"]: e.get("value") for e in train["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    options = KubeOptions.model_validate(
        {
            "worker_image": env["TORCHRELAY_KUBE_WORKER_IMAGE"],
            "gpu_node_selector": yaml.safe_load(env["TORCHRELAY_KUBE_GPU_NODE_SELECTOR"]),
            "gpu_tolerations": yaml.safe_load(env["TORCHRELAY_KUBE_GPU_TOLERATIONS"]),
        }
    )
    assert options.worker_image.endswith("-cuda")
    assert options.gpu_node_selector == {"nvidia.com/gpu.present": "true"}
    assert options.gpu_tolerations[0]["key"] == "nvidia.com/gpu"


def test_the_dashboard_and_alert_rules_ship_as_config_maps() -> None:
    maps = of_kind(render(ROOT / "k8s" / "base"), "ConfigMap")
    dashboard = maps["torchrelay-grafana-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (ROOT / "k8s" / "base" / "monitoring" / "grafana-dashboard.json").read_text()
    assert dashboard["data"]["grafana-dashboard.json"] == shipped
    rules = yaml.safe_load(maps["torchrelay-alert-rules"]["data"]["alerts.yaml"])
    assert rules["groups"][0]["rules"]


def test_the_shipped_nats_authorization_is_the_generated_one() -> None:
    shipped = (ROOT / "k8s" / "base" / "nats" / "auth.conf").read_text()
    assert shipped == principals.authorization_config(), "run `torchrelay schema nats-auth`"


def test_nats_reads_every_users_password_from_that_users_secret() -> None:
    objects = render(ROOT / "k8s" / "base")
    (nats,) = of_kind(objects, "StatefulSet")["nats"]["spec"]["template"]["spec"]["containers"]
    secrets = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in nats["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert secrets == {
        principals.password_variable(user): {
            "name": principals.secret_name(user),
            "key": "password",
        }
        for user in principals.USERS
    }
    train = of_kind(objects, "Deployment")["torchrelay-train"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in train["containers"][0]["env"]}
    assert env["TORCHRELAY_KUBE_WORKER_NATS_SECRET"] == principals.secret_name(principals.WORKER)


def test_the_rendered_nats_configuration_is_valid_for_nats_server(tmp_path: Path) -> None:
    from torchrelay.shared.bus.server import find_nats_server

    (config,) = (
        m for name, m in of_kind(render(ROOT / "k8s" / "base"), "ConfigMap").items()
        if name.startswith("nats-config")
    )  # fmt: skip
    for name, text in config["data"].items():
        (tmp_path / name).write_text(text)
    env = {principals.password_variable(user): f"pw-{user}" for user in principals.USERS}
    checked = subprocess.run(
        [str(find_nats_server()), "-t", "-c", str(tmp_path / "nats.conf")],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env, "POD_NAME": "nats-0"},
    )
    assert checked.returncode == 0, checked.stderr


def test_the_asyncapi_servers_are_where_up_and_the_manifests_run_nats() -> None:
    from torchrelay.platform import NATS_PORT
    from torchrelay.shared.events.schema import asyncapi_document

    servers = asyncapi_document()["servers"]
    assert servers["local"]["host"] == f"127.0.0.1:{NATS_PORT}"
    service = of_kind(render(ROOT / "k8s" / "base"), "Service")["nats"]
    namespace, port = service["metadata"]["namespace"], service["spec"]["ports"][0]["port"]
    assert servers["kubernetes"]["host"] == f"nats.{namespace}.svc:{port}"
