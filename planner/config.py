"""`PlannerConfig`: every field is a flag of `tandem scale` and a `TANDEM_*` variable."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.roles import Role
from cluster.settings import ConfigFlags

PLANNED_ROLES = (Role.PREFILL, Role.DECODE)  # the roles `tandem scale` sets replicas of


@dataclass(frozen=True)
class PlannerConfig:
    """Where the planner reads load and sets replicas, its bounds and its hysteresis."""

    router: str = field(metadata={
        "help": "gRPC host:port of the router whose load figures (GetClusterStatus) are read"})
    api_token: str | None = field(default=None, metadata={
        "help": "bearer token of the router's public API (one line of its api_tokens_file); "
                "unset: the router takes calls without one"})
    tls_ca: str | None = field(default=None, metadata={
        "help": "CA file that signed the router's certificate: its gRPC (and an https "
                "router_metrics_url) are checked against it; unset: plaintext gRPC"})
    router_metrics_url: str | None = field(default=None, metadata={
        "help": "the router's Prometheus /metrics URL, for the mean TTFT between readings; "
                "unset: TTFT is not a signal"})
    kubernetes_namespace: str | None = field(default=None, metadata={
        "help": "namespace of the Deployments; unset: the planner pod's own, or 'default'"})
    kubeconfig: str | None = field(default=None, metadata={
        "help": "a kubeconfig file for the Kubernetes API; unset: the pod's ServiceAccount "
                "inside a cluster, else $KUBECONFIG or ~/.kube/config"})
    prefill_deployment: str = field(default="tandem-prefill", metadata={
        "help": "the prefill workers' Deployment"})
    decode_deployment: str = field(default="tandem-decode", metadata={
        "help": "the decode workers' Deployment"})
    min_prefill: int = field(default=1, metadata={"help": "fewest prefill replicas"})
    max_prefill: int = field(default=4, metadata={"help": "most prefill replicas"})
    min_decode: int = field(default=1, metadata={"help": "fewest decode replicas"})
    max_decode: int = field(default=4, metadata={"help": "most decode replicas"})
    max_total_replicas: int | None = field(default=None, metadata={
        "help": "most prefill + decode replicas together (the accelerators there are); at it, "
                "a role that needs more takes one from the other role when that one is below "
                "the low-water mark; unset: no budget"})
    interval_s: float = field(default=15.0, metadata={"help": "seconds between readings"})
    high_water: float = field(default=0.8, metadata={
        "help": "a role whose utilization (0..1, see README) is above this for `up_after` "
                "readings in a row gets one more replica"})
    low_water: float = field(default=0.3, metadata={
        "help": "a role whose utilization is below this for `down_after` readings in a row "
                "gets one fewer replica"})
    up_after: int = field(default=2, metadata={
        "help": "readings in a row above the high-water mark before scaling up"})
    down_after: int = field(default=8, metadata={
        "help": "readings in a row below the low-water mark before scaling down"})
    cooldown_s: float = field(default=120.0, metadata={
        "help": "after a role's replicas change, leave that role alone this long"})
    prefill_queue_blocks_target: float = field(default=64.0, metadata={
        "help": "prefill utilization 1.0: this many queued prompt blocks per prefill worker"})
    ttft_target_s: float | None = field(default=None, metadata={
        "help": "prefill utilization 1.0: this mean TTFT (needs router_metrics_url); unset: "
                "TTFT is not a signal"})
    status_timeout_s: float = field(default=5.0, metadata={
        "help": "deadline of one reading (GetClusterStatus, /metrics)"})
    dry_run: bool = field(default=False, metadata={
        "help": "decide and log, change no replica count"})

    def __post_init__(self) -> None:
        if not self.router:
            raise ValueError("router: --router (or TANDEM_ROUTER) is required")
        for name in ("min_prefill", "min_decode"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for role in PLANNED_ROLES:
            low, high = self.bounds(role)
            if high < max(low, 1):
                raise ValueError(f"max_{role.value}: must be >= max(min_{role.value}, 1), "
                                 f"got {high}")
        if self.max_total_replicas is not None and \
                self.max_total_replicas < self.min_prefill + self.min_decode:
            raise ValueError(f"max_total_replicas: must be >= min_prefill + min_decode, got "
                             f"{self.max_total_replicas}")
        if not 0 < self.low_water < self.high_water:
            raise ValueError(f"low_water: must be > 0 and below high_water ({self.high_water}),"
                             f" got {self.low_water}")
        for name in ("up_after", "down_after"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("interval_s", "prefill_queue_blocks_target", "status_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.cooldown_s < 0:
            raise ValueError(f"cooldown_s: must be >= 0, got {self.cooldown_s}")
        if self.ttft_target_s is not None and self.ttft_target_s <= 0:
            raise ValueError(f"ttft_target_s: must be > 0, got {self.ttft_target_s}")
        if self.ttft_target_s is not None and self.router_metrics_url is None:
            raise ValueError("ttft_target_s: needs router_metrics_url (TTFT is read there)")

    def bounds(self, role: Role) -> tuple[int, int]:
        """(min, max) replicas of `role`."""
        if role is Role.PREFILL:
            return self.min_prefill, self.max_prefill
        return self.min_decode, self.max_decode

    def deployment(self, role: Role) -> str:
        return self.prefill_deployment if role is Role.PREFILL else self.decode_deployment


def planner_flags() -> ConfigFlags[PlannerConfig]:
    """The flags of `tandem scale`."""
    return ConfigFlags(PlannerConfig)
