"""`KubernetesConfig`: where and how the router watches the worker pods (flattened into the
router's flags: `--kubernetes-namespace` ↔ `TANDEM_KUBERNETES_NAMESPACE`, and so on)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_LABEL_SELECTOR = "tandem.ai/role in (prefill,decode,aggregated)"


@dataclass(frozen=True)
class KubernetesConfig:
    """The worker pods' namespace and labels, the API credentials, the watch's timings."""

    kubernetes_namespace: str | None = field(default=None, metadata={
        "help": "discovery kubernetes: namespace of the worker pods; unset: the router pod's "
                "own namespace (its ServiceAccount's), or 'default' outside a cluster"})
    kubernetes_label_selector: str = field(default=DEFAULT_LABEL_SELECTOR, metadata={
        "help": "discovery kubernetes: label selector of the worker pods (each carries "
                "tandem.ai/role=prefill|decode|aggregated)"})
    kubernetes_port_name: str = field(default="grpc", metadata={
        "help": "discovery kubernetes: name of the worker container's gRPC port"})
    kubeconfig: str | None = field(default=None, metadata={
        "help": "a kubeconfig file for the Kubernetes API; unset: the pod's ServiceAccount "
                "inside a cluster, else $KUBECONFIG or ~/.kube/config"})
    kubernetes_watch_timeout_s: float = field(default=300.0, metadata={
        "help": "discovery kubernetes: the API server ends each pod watch after this long; "
                "the router resumes it from the last resourceVersion"})
    kubernetes_retry_s: float = field(default=2.0, metadata={
        "help": "discovery kubernetes: after a failed list or watch, wait this long before "
                "trying again (meanwhile the router keeps its last known workers)"})

    def __post_init__(self) -> None:
        if self.kubernetes_namespace is not None and not self.kubernetes_namespace.strip():
            raise ValueError("kubernetes_namespace: must not be blank (unset it for the pod's "
                             "own namespace)")
        if not self.kubernetes_label_selector.strip():
            raise ValueError("kubernetes_label_selector: must not be empty (it would watch "
                             "every pod of the namespace)")
        if not self.kubernetes_port_name:
            raise ValueError("kubernetes_port_name: must not be empty")
        for name in ("kubernetes_watch_timeout_s", "kubernetes_retry_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
