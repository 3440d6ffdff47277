"""A small stand-in for the Kubernetes API server, served over real HTTP on loopback.

No real API server can run here (no etcd, no kube-apiserver binary, no cluster), so the tests
point the official `kubernetes` client at this instead, through a kubeconfig file: the client
builds its real requests, and this answers the few endpoints Tandem uses as the API server
does:

    GET   /api/v1/namespaces/NS/pods?labelSelector=S                a PodList + resourceVersion
    GET   /api/v1/namespaces/NS/pods?watch=true&resourceVersion=RV  the events after RV, then
                                                                    live ones, one JSON a line;
                                                                    an ERROR event with a 410
                                                                    Status when RV was compacted
    GET   /apis/apps/v1/namespaces/NS/deployments/NAME/scale        a Scale
    PATCH /apis/apps/v1/namespaces/NS/deployments/NAME/scale        sets spec.replicas

Every request is recorded (`requests`) so tests can assert the parameters (the resumed watch's
resourceVersion) and the PATCH bodies. `forbidden` answers 403 as RBAC would; `drop_watches`
ends the open watches as a server timeout or a lost connection does; `compact` forgets the
history, so a watch resumed from an older resourceVersion gets 410 Gone.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

POD_PATH = "/api/v1/namespaces/{ns}/pods"
SCALE_PATH = "/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale"


@dataclass
class Recorded:
    """One request the stand-in answered."""

    method: str
    path: str
    params: dict[str, str]
    content_type: str = ""
    body: Any = None
    status: int = 200


@dataclass
class _Watch:
    namespace: str
    selector: str
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)


def worker_pod(name: str, role: str | None, ip: str = "127.0.0.1", port: int | None = 50051,
               ready: bool = True, namespace: str = "tandem",
               port_name: str = "grpc") -> dict[str, Any]:
    """A worker pod as the API returns it (labels, the named port, phase and Ready)."""
    labels = {"app.kubernetes.io/name": "tandem"}
    if role is not None:
        labels["tandem.ai/role"] = role
    ports = [{"name": port_name, "containerPort": port, "protocol": "TCP"}] if port else []
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels,
                     "uid": f"uid-{name}"},
        "spec": {"containers": [{"name": "worker", "image": "tandem", "ports": ports}]},
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality (`k=v`, `k!=v`), set (`k in (a,b)`) and existence (`k`) requirements, joined
    by commas outside parentheses: the subset of label selectors the tests use."""
    for requirement in re.split(r",(?![^(]*\))", selector):
        requirement = requirement.strip()
        if not requirement:
            continue
        if m := re.fullmatch(r"(\S+)\s+in\s+\((.*)\)", requirement):
            if labels.get(m[1]) not in {v.strip() for v in m[2].split(",")}:
                return False
        elif "!=" in requirement:
            key, value = requirement.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in requirement:
            key, value = requirement.split("=", 1)
            if labels.get(key.strip()) != value.strip().lstrip("="):
                return False
        elif requirement not in labels:
            return False
    return True


class KubeApiStandIn:
    """See the module doc. `await start()`, then `url`, `write_kubeconfig(path)`."""

    def __init__(self) -> None:
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}  # (namespace, name) → pod
        self.scales: dict[tuple[str, str], int] = {}  # (namespace, deployment) → replicas
        self.resource_version = 100
        self.compacted = 0  # watches from a resourceVersion below this get 410 Gone
        self.history: list[tuple[int, str, dict[str, Any]]] = []  # (rv, type, pod)
        self.requests: list[Recorded] = []
        self.forbidden = False
        self._watches: list[_Watch] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- serving --

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._pods)
        app.router.add_get("/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale",
                           self._get_scale)
        app.router.add_patch("/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale",
                             self._patch_scale)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig whose one context is this server, with a bearer token (JSON is YAML)."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "router", "user": {"token": "standin-token"}}],
            "contexts": [{"name": "standin",
                          "context": {"cluster": "standin", "user": "router"}}],
        }), encoding="utf-8")
        return path

    # -- what tests do to the cluster --

    def apply(self, pod: dict[str, Any]) -> None:
        """Creates or replaces a pod (ADDED or MODIFIED to the watches)."""
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        kind = "MODIFIED" if key in self.pods else "ADDED"
        self._change(kind, key, copy.deepcopy(pod))

    def delete(self, name: str, namespace: str = "tandem") -> None:
        self._change("DELETED", (namespace, name), self.pods[(namespace, name)])

    def drop_watches(self) -> None:
        """Ends every open watch stream cleanly (the client sees the body end)."""
        for watch in self._watches:
            watch.queue.put_nowait(None)
        self._watches.clear()

    def compact(self) -> None:
        """Forgets the event history: older resourceVersions now get 410 Gone."""
        self.history.clear()
        self.compacted = self.resource_version + 1

    def watch_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.params.get("watch", "").lower() == "true"]

    def list_requests(self) -> list[Recorded]:
        return [r for r in self.requests
                if r.path.endswith("/pods") and r.params.get("watch", "").lower() != "true"]

    def patches(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "PATCH"]

    def _change(self, kind: str, key: tuple[str, str], pod: dict[str, Any]) -> None:
        self.resource_version += 1
        pod["metadata"]["resourceVersion"] = str(self.resource_version)
        if kind == "DELETED":
            del self.pods[key]
        else:
            self.pods[key] = pod
        self.history.append((self.resource_version, kind, pod))
        for watch in self._watches:
            if watch.namespace == key[0] and matches(watch.selector, _labels(pod)):
                watch.queue.put_nowait({"type": kind, "object": copy.deepcopy(pod)})

    # -- handlers --

    def _record(self, request: web.Request, body: Any = None, status: int = 200) -> Recorded:
        recorded = Recorded(request.method, request.path, dict(request.query),
                            request.headers.get("Content-Type", ""), body, status)
        self.requests.append(recorded)
        return recorded

    def _refuse(self, request: web.Request, resource: str) -> web.Response:
        self._record(request, status=403)
        verb = "watch" if request.query.get("watch", "").lower() == "true" else "list"
        if request.method == "PATCH":
            verb = "patch"
        return _status(403, "Forbidden", f'{resource} is forbidden: User "system:serviceaccount:'
                       f'tandem:router" cannot {verb} resource "{resource}" in API group "" in '
                       f'the namespace "{request.match_info["ns"]}"')

    async def _pods(self, request: web.Request) -> web.StreamResponse:
        if self.forbidden:
            return self._refuse(request, "pods")
        self._record(request)
        namespace = request.match_info["ns"]
        selector = request.query.get("labelSelector", "")
        if request.query.get("watch", "").lower() != "true":
            items = [pod for (ns, _), pod in sorted(self.pods.items())
                     if ns == namespace and matches(selector, _labels(pod))]
            return web.json_response({
                "apiVersion": "v1", "kind": "PodList", "items": items,
                "metadata": {"resourceVersion": str(self.resource_version)}})
        return await self._watch(request, namespace, selector)

    async def _watch(self, request: web.Request, namespace: str,
                     selector: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        since = int(request.query.get("resourceVersion") or self.resource_version)
        if since + 1 < self.compacted:
            gone = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                    "reason": "Expired", "message": f"too old resource version: {since} "
                                                    f"({self.compacted - 1})"}
            await response.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
            await response.write_eof()
            return response
        watch = _Watch(namespace, selector)
        for rv, kind, pod in self.history:
            if rv > since and pod["metadata"]["namespace"] == namespace and matches(
                    selector, _labels(pod)):
                watch.queue.put_nowait({"type": kind, "object": copy.deepcopy(pod)})
        self._watches.append(watch)
        timeout = float(request.query.get("timeoutSeconds") or 3600)
        try:
            async with asyncio.timeout(timeout):
                while (event := await watch.queue.get()) is not None:
                    await response.write(json.dumps(event).encode() + b"\n")
        except TimeoutError:
            pass
        finally:
            if watch in self._watches:
                self._watches.remove(watch)
        await response.write_eof()
        return response

    def _scale(self, namespace: str, name: str) -> dict[str, Any]:
        replicas = self.scales.get((namespace, name), 1)
        return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"replicas": replicas}, "status": {"replicas": replicas}}

    async def _get_scale(self, request: web.Request) -> web.Response:
        if self.forbidden:
            return self._refuse(request, "deployments/scale")
        self._record(request)
        ns, name = request.match_info["ns"], request.match_info["name"]
        if (ns, name) not in self.scales:
            return _status(404, "NotFound", f'deployments.apps "{name}" not found')
        return web.json_response(self._scale(ns, name))

    async def _patch_scale(self, request: web.Request) -> web.Response:
        if self.forbidden:
            return self._refuse(request, "deployments/scale")
        body = await request.json()
        self._record(request, body)
        ns, name = request.match_info["ns"], request.match_info["name"]
        if (ns, name) not in self.scales:
            return _status(404, "NotFound", f'deployments.apps "{name}" not found')
        self.scales[(ns, name)] = int(body["spec"]["replicas"])
        return web.json_response(self._scale(ns, name))


def _labels(pod: dict[str, Any]) -> dict[str, str]:
    return dict(pod["metadata"].get("labels") or {})


def _status(code: int, reason: str, message: str) -> web.Response:
    return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                              "message": message, "reason": reason, "code": code}, status=code)
