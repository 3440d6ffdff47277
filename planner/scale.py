"""The prefill and decode Deployments' replica counts, read and set through their scale
subresource (`GET`/`PATCH /apis/apps/v1/namespaces/NS/deployments/NAME/scale`): the planner
needs `get` and `patch` on `deployments/scale`, nothing else."""

from __future__ import annotations

from kubernetes.aio.client import ApiClient, AppsV1Api

from cluster.kube_client import resolve_namespace
from cluster.roles import Role
from planner.config import PlannerConfig


class DeploymentScaler:
    """Replicas per role (raises kubernetes.aio.client.exceptions.ApiException)."""

    def __init__(self, config: PlannerConfig, api: ApiClient) -> None:
        self.config = config
        self.namespace = resolve_namespace(config.kubernetes_namespace)
        self._apps = AppsV1Api(api)

    async def replicas(self, role: Role) -> int:
        scale = await self._apps.read_namespaced_deployment_scale(
            self.config.deployment(role), self.namespace)
        return int(scale.spec.replicas or 0)

    async def set_replicas(self, role: Role, replicas: int) -> None:
        """A strategic merge patch of spec.replicas alone: nothing else of the Deployment is
        touched."""
        await self._apps.patch_namespaced_deployment_scale(
            self.config.deployment(role), self.namespace, {"spec": {"replicas": replicas}})
