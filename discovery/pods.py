"""The contract between a worker pod and the router's discovery, and reading a pod by it.

A worker pod the router routes to:
- carries the label `tandem.ai/role` with the worker's role (`prefill`, `decode`,
  `aggregated`);
- has a container port named `grpc` (`KubernetesConfig.kubernetes_port_name`): the router
  dials the pod IP on it;
- is named as the worker names itself (`worker_id`; the chart sets `TANDEM_WORKER_ID` from
  `metadata.name`): the worker id is the pod name, the key of its prefix-index stream;
- is routable while it is Ready (its readiness probe is `grpc.health.v1`) and not terminating
  (no `deletionTimestamp`: a pod draining in its preStop hook takes no new requests).

Pods are read as the API's JSON (dicts), the same for a list item and a watch event's object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cluster.roles import Role
from index.registry import WorkerRecord

ROLE_LABEL = "tandem.ai/role"

Pod = Mapping[str, Any]


class PodContractError(ValueError):
    """A pod the label selector matched does not follow the contract (no role label, an
    unknown role, no gRPC port): it is never routed to, and the message says why."""


def pod_name(pod: Pod) -> str:
    return str(pod.get("metadata", {}).get("name", ""))


def pod_record(pod: Pod, port_name: str) -> WorkerRecord | None:
    """The worker `pod` runs, or None while it is not routable (not Ready, terminating, no IP
    yet). Raises PodContractError when the pod breaks the contract."""
    metadata = pod.get("metadata", {})
    name = pod_name(pod)
    role_label = (metadata.get("labels") or {}).get(ROLE_LABEL)
    try:
        role = Role(str(role_label))
    except ValueError:
        raise PodContractError(
            f"pod {name}: label {ROLE_LABEL} must be one of "
            f"{', '.join(r.value for r in Role)}, got {role_label!r}") from None
    port = _named_port(pod, port_name)
    if port is None:
        raise PodContractError(f"pod {name}: no container port named {port_name!r} "
                               f"(the worker's gRPC port)")
    status = pod.get("status") or {}
    ip = status.get("podIP")
    if metadata.get("deletionTimestamp") or not ip or not _ready(status):
        return None
    host = f"[{ip}]" if ":" in ip else ip  # an IPv6 pod address
    return WorkerRecord(worker_id=name, role=role, address=f"{host}:{port}")


def _named_port(pod: Pod, port_name: str) -> int | None:
    for container in (pod.get("spec") or {}).get("containers") or ():
        for port in container.get("ports") or ():
            if port.get("name") == port_name and port.get("containerPort"):
                return int(port["containerPort"])
    return None


def _ready(status: Mapping[str, Any]) -> bool:
    if status.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in status.get("conditions") or ())
