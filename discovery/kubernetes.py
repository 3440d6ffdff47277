"""`PodWatcher`: the worker pods of a namespace, listed then watched through the Kubernetes API
(a `WorkerSource`).

    list     GET /api/v1/namespaces/NS/pods?labelSelector=...        → the whole set, and the
                                                                        list's resourceVersion
    watch    GET ...&watch=true&resourceVersion=RV&timeoutSeconds=T   → ADDED / MODIFIED /
                                                                        DELETED / BOOKMARK lines
    resume   the watch ends (the server's timeout, a dropped connection): watch again from the
             last resourceVersion seen (of an event or a bookmark), no relist
    relist   the API answers 410 Gone (that resourceVersion is too old): list again, replacing
             the whole set, then watch from the new list's resourceVersion
    fail     any other error (403 Forbidden: RBAC; 401; 5xx; the API unreachable): logged once
             with what to fix, counted, shown in `problem` (the router's cluster status); the
             router keeps the workers it last knew; tried again every `kubernetes_retry_s`

Pods, not EndpointSlices: the role label, the named gRPC port and the Ready condition are all
on the pod, so discovery needs no Service per role and only `get, list, watch` on pods; a
Tandem cluster has tens of workers, not the thousands where slices pay off.

The official client's asyncio API (`kubernetes.aio`) makes the calls; the watch stream is read
line by line here because this version of `kubernetes.aio` ships no `Watch` helper, and
because resuming and relisting are this class's decisions to count, not a helper's to hide.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
from kubernetes.aio.client import ApiClient, CoreV1Api
from kubernetes.aio.client.exceptions import ApiException

from cluster.kube_client import api_client, resolve_namespace
from discovery.config import KubernetesConfig
from discovery.pods import Pod, PodContractError, pod_name, pod_record
from index.registry import WorkerRecord

log = logging.getLogger(__name__)

RBAC_NEEDED = "get, list and watch on pods (apiGroups [\"\"], resources [\"pods\"])"


class PodWatcher:
    """The routable worker pods (see the module doc). Counters since start, exported by the
    router as fallback metrics: `relists` (410 Gone), `watch_drops` (watches that failed
    mid-stream and were resumed), `errors` (failed list or watch calls), `forbidden` (those
    that were 403)."""

    authoritative = True

    def __init__(self, config: KubernetesConfig, api: ApiClient | None = None) -> None:
        self.config = config
        self.namespace = resolve_namespace(config.kubernetes_namespace)
        self._api = api
        self._pods: dict[str, WorkerRecord] = {}  # routable pods by name
        self.resource_version: str | None = None  # None: the next step is a list
        self.problem = ""
        self.relists = 0
        self.watch_drops = 0
        self.errors = 0
        self.forbidden = 0
        self._broken: dict[str, str] = {}  # pods that break the contract → why (logged once)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._api is None:
            self._api = await api_client(self.config.kubeconfig)
        listed = True
        try:
            await self._list()
        except (TimeoutError, ApiException, aiohttp.ClientError, ValueError) as error:
            self._failed("list", error)
            listed = False
        self._task = asyncio.create_task(self._run(wait_first=not listed),
                                         name="kubernetes-pod-watch")

    async def list_workers(self) -> list[WorkerRecord]:
        return sorted(self._pods.values(), key=lambda r: r.worker_id)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._api is not None:
            await self._api.close()

    # -- the loop --

    async def _run(self, wait_first: bool) -> None:
        if wait_first:
            await asyncio.sleep(self.config.kubernetes_retry_s)
        while True:
            verb = "list" if self.resource_version is None else "watch"
            try:
                if self.resource_version is None:
                    await self._list()
                await self._watch()
            except ApiException as error:
                if error.status == 410:
                    self.relists += 1
                    log.info("pod watch: resourceVersion %s expired (410 Gone): relisting",
                             self.resource_version)
                    self.resource_version = None
                    continue
                self._failed(verb, error)
                await asyncio.sleep(self.config.kubernetes_retry_s)
            except (TimeoutError, aiohttp.ClientError, ValueError) as error:
                if verb == "watch":
                    self.watch_drops += 1
                self._failed(verb, error)
                await asyncio.sleep(self.config.kubernetes_retry_s)

    async def _list(self) -> None:
        body = await self._get(watch=False)
        items = body.get("items") or []
        self._pods = {}
        for pod in items:
            self._apply("ADDED", pod)
        self.resource_version = (body.get("metadata") or {}).get("resourceVersion") or None
        self._recovered()
        log.info("pod list: %d routable of %d matching %r in %s (resourceVersion %s)",
                 len(self._pods), len(items), self.config.kubernetes_label_selector,
                 self.namespace, self.resource_version)

    async def _watch(self) -> None:
        """One watch from `resource_version`, until the server ends it; raises ApiException
        for an error answer or ERROR event (410 included)."""
        response = await CoreV1Api(self._api).list_namespaced_pod(
            self.namespace, label_selector=self.config.kubernetes_label_selector, watch=True,
            resource_version=self.resource_version, allow_watch_bookmarks=True,
            timeout_seconds=max(1, round(self.config.kubernetes_watch_timeout_s)),
            _preload_content=False, _request_timeout=self._timeout(watch=True))
        try:
            await _check(response)
            self._recovered()
            async for line in response.content:
                if line.strip():
                    self._event(json.loads(line))
        finally:
            response.release()

    async def _get(self, watch: bool) -> dict[str, Any]:
        response = await CoreV1Api(self._api).list_namespaced_pod(
            self.namespace, label_selector=self.config.kubernetes_label_selector,
            _preload_content=False, _request_timeout=self._timeout(watch))
        try:
            await _check(response)
            body: dict[str, Any] = await response.json()
            return body
        finally:
            response.release()

    def _timeout(self, watch: bool) -> aiohttp.ClientTimeout:
        # a watch's own end is the server's timeoutSeconds; a read silent past it (plus a
        # margin) is a dead connection
        read = self.config.kubernetes_watch_timeout_s + 30 if watch else 30.0
        return aiohttp.ClientTimeout(sock_connect=10.0, sock_read=read)

    # -- events --

    def _event(self, event: Mapping[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":  # a Status object: 410 Gone when the resourceVersion expired
            raise ApiException(status=int(obj.get("code") or 500),
                               reason=f"{obj.get('reason')}: {obj.get('message')}")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self._apply(str(kind), obj)
        if version:
            self.resource_version = version

    def _apply(self, kind: str, pod: Pod) -> None:
        name = pod_name(pod)
        record: WorkerRecord | None = None
        if kind != "DELETED":
            try:
                record = pod_record(pod, self.config.kubernetes_port_name)
                self._broken.pop(name, None)
            except PodContractError as error:
                if self._broken.get(name) != str(error):
                    log.error("pod watch: not routing to %s", error)
                self._broken[name] = str(error)
        else:
            self._broken.pop(name, None)
        before = self._pods.get(name)
        if record is None:
            if self._pods.pop(name, None) is not None:
                log.info("pod %s left the routable set (%s)", name, kind.lower())
        elif before != record:
            self._pods[name] = record
            log.info("pod %s routable: %s at %s", name, record.role.value, record.address)

    # -- failures --

    def _failed(self, verb: str, error: BaseException) -> None:
        self.errors += 1
        status = error.status if isinstance(error, ApiException) else None
        if status == 403:
            self.forbidden += 1
            why = (f"the Kubernetes API refused to {verb} pods in namespace {self.namespace} "
                   f"(403 Forbidden): the router's ServiceAccount needs {RBAC_NEEDED} in that "
                   f"namespace")
        elif status == 401:
            why = (f"the Kubernetes API refused the router's credentials to {verb} pods "
                   f"(401 Unauthorized): check its ServiceAccount token or kubeconfig")
        elif status is not None:
            reason = error.reason if isinstance(error, ApiException) else ""
            why = f"the Kubernetes API failed to {verb} pods: {status} {reason}"
        else:
            why = (f"the Kubernetes API is unreachable to {verb} pods: "
                   f"{type(error).__name__}: {error}")
        why += f"; routing to the {len(self._pods)} workers last known"
        if why != self.problem:
            log.error("worker discovery: %s", why)
        self.problem = why

    def _recovered(self) -> None:
        if self.problem:
            log.warning("worker discovery: the Kubernetes API answers again")
        self.problem = ""


async def _check(response: aiohttp.ClientResponse) -> None:
    """Raises ApiException (with the API's Status message) for an answer that is not 2xx:
    with `_preload_content=False` the client leaves that to the caller."""
    if 200 <= response.status < 300:
        return
    text = await response.text()
    try:
        message = json.loads(text).get("message", text)
    except ValueError:
        message = text
    raise ApiException(status=response.status, reason=f"{response.reason}: {message}")
