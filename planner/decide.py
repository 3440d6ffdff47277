"""The planner's decision: a pure function of the configuration, the hysteresis state, one
reading of load figures and the current replica counts. No I/O, no clock: tests replay
recorded figures through it.

Per role, each reading:
- out of bounds (someone set the replicas by hand): back to the nearest bound, at once;
- utilization above `high_water` for `up_after` readings in a row: one more replica;
- below `low_water` for `down_after` readings in a row: one fewer;
- within `cooldown_s` of that role's last change: nothing (the readings still count), so a new
  replica has time to start and take load before it is judged;
- at `max_total_replicas`: a role that needs more takes a replica from the other role if that
  one is below the low-water mark and above its minimum (a rebalance), else it waits.

A change resets the role's streaks. A role with no live worker gives no reading: its streaks
stay as they were.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from cluster.roles import Role
from planner.config import PLANNED_ROLES, PlannerConfig
from planner.figures import LoadFigures, utilization


@dataclass(frozen=True)
class RoleState:
    """A role's hysteresis: readings in a row above / below the marks, its last change."""

    above: int = 0
    below: int = 0
    last_change_s: float | None = None


@dataclass(frozen=True)
class PlannerState:
    roles: dict[Role, RoleState] = field(
        default_factory=lambda: {role: RoleState() for role in PLANNED_ROLES})


@dataclass(frozen=True)
class Decision:
    """Set `role` from `current` to `target` replicas (equal: held, `reason` says why)."""

    role: Role
    current: int
    target: int
    reason: str

    @property
    def changes(self) -> bool:
        return self.target != self.current


@dataclass(frozen=True)
class Plan:
    decisions: list[Decision]
    state: PlannerState
    utilization: dict[Role, float | None]

    def changes(self) -> list[Decision]:
        return [d for d in self.decisions if d.changes]


def decide(config: PlannerConfig, state: PlannerState, figures: LoadFigures,
           replicas: dict[Role, int], now_s: float) -> Plan:
    """What to do after one reading (see the module doc). `replicas`: each role's current
    count (the Deployment's spec.replicas); `now_s`: a monotonic time in seconds."""
    usage = {role: utilization(role, figures, config) for role in PLANNED_ROLES}
    roles = {role: _count(state.roles[role], usage[role], config) for role in PLANNED_ROLES}
    decisions: dict[Role, Decision] = {}
    wants: dict[Role, int] = {}
    for role in PLANNED_ROLES:
        current, (low, high) = replicas[role], config.bounds(role)
        if not low <= current <= high:
            target = min(max(current, low), high)
            decisions[role] = Decision(role, current, target,
                                       f"{current} is outside the bounds [{low}, {high}]")
            continue
        rs = roles[role]
        if rs.last_change_s is not None and now_s - rs.last_change_s < config.cooldown_s:
            continue
        if rs.above >= config.up_after and current < high:
            wants[role] = +1
        elif rs.below >= config.down_after and current > low:
            wants[role] = -1
    for role, step in wants.items():
        if role in decisions:
            continue
        current, u = replicas[role], usage[role]
        if step < 0:
            decisions[role] = Decision(role, current, current - 1,
                                       f"utilization {u:.2f} below {config.low_water} for "
                                       f"{roles[role].below} readings")
            continue
        why = f"utilization {u:.2f} above {config.high_water} for {roles[role].above} readings"
        total = sum(decisions[r].target if r in decisions else replicas[r]
                    for r in PLANNED_ROLES)
        if config.max_total_replicas is None or total < config.max_total_replicas:
            decisions[role] = Decision(role, current, current + 1, why)
            continue
        other = Role.DECODE if role is Role.PREFILL else Role.PREFILL
        donor_u = usage[other]
        if (other not in decisions and donor_u is not None and donor_u < config.low_water
                and replicas[other] > config.bounds(other)[0]):
            decisions[role] = Decision(role, current, current + 1,
                                       f"{why}; rebalanced from {other.value}")
            decisions[other] = Decision(other, replicas[other], replicas[other] - 1,
                                        f"rebalanced to {role.value} (utilization "
                                        f"{donor_u:.2f} below {config.low_water})")
        else:
            decisions[role] = Decision(role, current, current,
                                       f"{why}, held at the budget of "
                                       f"{config.max_total_replicas} replicas")
    for decision in decisions.values():
        if decision.changes:
            roles[decision.role] = RoleState(last_change_s=now_s)
    ordered = [decisions[r] for r in PLANNED_ROLES if r in decisions]
    return Plan(ordered, PlannerState(roles), usage)


def _count(rs: RoleState, u: float | None, config: PlannerConfig) -> RoleState:
    """The streaks after a reading of utilization `u` (None: no reading, unchanged)."""
    if u is None:
        return rs
    if u > config.high_water:
        return replace(rs, above=rs.above + 1, below=0)
    if u < config.low_water:
        return replace(rs, above=0, below=rs.below + 1)
    return replace(rs, above=0, below=0)
