"""A client of the Kubernetes API, for the router's pod discovery and the `tandem scale`
planner: the official `kubernetes` package's asyncio client (`kubernetes.aio`, aiohttp), so the
calls run on the caller's event loop with no thread of their own.

Credentials: a kubeconfig file when one is given, else the pod's ServiceAccount inside a
cluster, else $KUBECONFIG or ~/.kube/config.
"""

from __future__ import annotations

import os
from pathlib import Path

from kubernetes.aio.client import ApiClient, Configuration
from kubernetes.aio.config import load_incluster_config, new_client_from_config

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


async def api_client(kubeconfig: str | None) -> ApiClient:
    """An API client from `kubeconfig`, or the in-cluster ServiceAccount, or the default
    kubeconfig (see the module doc). The caller closes it."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        configuration = Configuration()
        load_incluster_config(client_configuration=configuration)
        return ApiClient(configuration)
    return await new_client_from_config(config_file=kubeconfig, persist_config=False)


def resolve_namespace(namespace: str | None) -> str:
    """`namespace`, else the ServiceAccount's namespace inside a pod, else "default"."""
    if namespace is not None:
        return namespace
    if SERVICE_ACCOUNT_NAMESPACE.exists():
        return SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip()
    return "default"
