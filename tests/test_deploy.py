"""The manifests in deploy/: schema-valid (offline, strict), least-privilege, and their shutdown timing adds up."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

import kubrpc
from kubrpc.resolvers.k8s import parse_target

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
READ_ONLY = {"get", "list", "watch"}


def load(folder: Path) -> list[dict[str, Any]]:
    documents = []
    for path in sorted(folder.glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


#: What `kubectl apply -f deploy/` applies (not recursive).
DOCUMENTS = load(DEPLOY)
#: Opt-in extras in deploy/optional/, applied one by one on top (pod reads for weights_from_pods).
OPTIONAL = load(DEPLOY / "optional")
#: The template for a user's own service, deploy/template/.
TEMPLATE = load(DEPLOY / "template")
#: Seconds left after the drain for the process to exit (close listeners, flush logs) before SIGKILL.
EXIT_MARGIN = 5


def only(kind: str, name: str | None = None) -> dict[str, Any]:
    [found] = [d for d in DOCUMENTS if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return found


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def test_the_expected_objects() -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in DOCUMENTS)
    assert kinds == [
        ("Deployment", "arith"),
        ("Job", "arith-client"),
        ("Role", "kubrpc-endpointslice-reader"),
        ("RoleBinding", "arith-client-endpointslice-reader"),
        ("Service", "arith"),
        ("ServiceAccount", "arith-client"),
    ]
    assert all("namespace" not in d["metadata"] for d in DOCUMENTS + OPTIONAL)  # applied into any namespace
    assert sorted((d["kind"], d["metadata"]["name"]) for d in OPTIONAL) == [
        ("Role", "kubrpc-pod-weight-reader"),
        ("RoleBinding", "arith-client-pod-weight-reader"),
    ]


@pytest.mark.parametrize(
    "document", DOCUMENTS + OPTIONAL + TEMPLATE, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
def test_schema_valid_strict(document: dict[str, Any]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_deployment() -> None:
    deployment = only("Deployment", "arith")
    assert deployment["spec"]["replicas"] == 3
    assert (
        deployment["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    spec = pod_spec(deployment)
    [container] = spec["containers"]
    ports = {p["name"]: (p["containerPort"], p.get("protocol", "TCP")) for p in container["ports"]}
    assert ports == {"rpc": (9000, "TCP"), "http": (8080, "TCP")}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + 15  # room to drain after the preStop
    assert spec["automountServiceAccountToken"] is False  # the servers never call the API


def test_service_ports_are_named_and_match_the_pods() -> None:
    service, deployment = only("Service", "arith"), only("Deployment", "arith")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    container_ports = {p["name"] for c in pod_spec(deployment)["containers"] for p in c["ports"]}
    for port in service["spec"]["ports"]:
        assert port["name"] and port["targetPort"] in container_ports


def test_rbac_is_least_privilege() -> None:
    assert not [d for d in DOCUMENTS if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    role = only("Role")
    assert role["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
    ]
    for rule in role["rules"]:
        assert set(rule["verbs"]) <= READ_ONLY
        assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"]
    binding = only("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    account = only("ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"]}]
    users = [d for d in DOCUMENTS if "template" in d.get("spec", {}) and pod_spec(d).get("serviceAccountName")]
    assert [d["metadata"]["name"] for d in users] == ["arith-client"]


def test_optional_pod_weights_rbac_is_least_privilege() -> None:
    assert not [d for d in OPTIONAL if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    [role] = [d for d in OPTIONAL if d["kind"] == "Role"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    [binding] = [d for d in OPTIONAL if d["kind"] == "RoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "kubrpc-pod-weight-reader",
    }
    assert binding["subjects"] == only("RoleBinding")["subjects"]  # the same client ServiceAccount
    for document in OPTIONAL:
        assert document["metadata"]["labels"]["app.kubernetes.io/component"] == "optional-pod-weights"
    assert "OPTIONAL" in (DEPLOY / "optional" / "rbac-pod-weights.yaml").read_text().splitlines()[0]


def test_the_client_targets_the_service() -> None:
    command = pod_spec(only("Job", "arith-client"))["containers"][0]["command"]
    service, namespace, port = parse_target(command[-1])
    assert (service, namespace) == ("arith", None)  # the pod's own namespace
    assert port in {p["name"] for p in only("Service", service)["spec"]["ports"]}


def pre_stop_seconds(container: dict[str, Any]) -> float:
    """How long the container's preStop hook keeps the pod serving before SIGTERM (exec sleep or sleep action)."""
    hook = container["lifecycle"]["preStop"]
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


def example_server() -> kubrpc.Server:
    """The Server that deploy/arith.yaml runs (`python -m examples.arith.service`), with its real options."""
    spec = importlib.util.spec_from_file_location("_arith_example", ROOT / "examples" / "arith" / "service.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    server: kubrpc.Server = module.server
    return server


@pytest.mark.parametrize(
    ("documents", "name", "server"),
    [(DOCUMENTS, "arith", example_server), (TEMPLATE, "my-service", kubrpc.Server)],
    ids=["example", "template"],
)
def test_shutdown_fits_the_grace_period(
    documents: list[dict[str, Any]], name: str, server: Callable[[], kubrpc.Server]
) -> None:
    """preStop + shutdown_delay + drain_timeout (+ time to exit) <= terminationGracePeriodSeconds.

    Kubernetes counts the preStop hook inside the grace period, sends SIGTERM after it, and SIGKILLs the pod
    when the period runs out: calls still draining then are cut off. The template assumes Server's defaults.
    """
    [deployment] = [d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == name]
    spec = pod_spec(deployment)
    options = server()
    for container in spec["containers"]:
        needed = pre_stop_seconds(container) + options.shutdown_delay + options.drain_timeout
        grace = spec["terminationGracePeriodSeconds"]
        assert needed + EXIT_MARGIN <= grace, (
            f"{name}: preStop {pre_stop_seconds(container):g} s + shutdown_delay {options.shutdown_delay:g} s + "
            f"drain_timeout {options.drain_timeout:g} s + {EXIT_MARGIN} s to exit > "
            f"terminationGracePeriodSeconds {grace}"
        )


def test_template() -> None:
    """deploy/template/: what a service of one's own needs, each piece where kubrpc expects it."""
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in TEMPLATE)
    assert kinds == [
        ("Deployment", "my-service"),
        ("Role", "my-service-endpointslice-reader"),
        ("RoleBinding", "my-service-endpointslice-reader"),
        ("Service", "my-service"),
        ("ServiceAccount", "my-service"),
    ]
    assert all("namespace" not in d["metadata"] for d in TEMPLATE)
    assert all("TEMPLATE" in path.read_text() for path in (DEPLOY / "template").glob("*.yaml"))
    [deployment] = [d for d in TEMPLATE if d["kind"] == "Deployment"]
    [service] = [d for d in TEMPLATE if d["kind"] == "Service"]
    spec = pod_spec(deployment)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    [container] = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"rpc": 9000, "http": 8080, "metrics": 9100}
    assert {(p["name"], p["targetPort"]) for p in service["spec"]["ports"]} == {(n, n) for n in ports}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert pre_stop_seconds(container) > 0
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert "memory" in container["resources"]["limits"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    # Least privilege: a namespaced Role that only reads EndpointSlices, bound to the pods' own account.
    assert not [d for d in TEMPLATE if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    [role] = [d for d in TEMPLATE if d["kind"] == "Role"]
    [binding] = [d for d in TEMPLATE if d["kind"] == "RoleBinding"]
    assert role["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
    ]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": spec["serviceAccountName"]}]
    assert ("ServiceAccount", spec["serviceAccountName"]) in kinds
