"""The manifests in deploy/: schema-valid (offline, strict) and least-privilege."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubrpc.resolvers.k8s import parse_target

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
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


@pytest.mark.parametrize("document", DOCUMENTS + OPTIONAL, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
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
