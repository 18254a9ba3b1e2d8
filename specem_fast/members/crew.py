"""Members called together: the crew the round executor talks to.

Each member's work of a round runs on its worker of a :class:`MemberPool`:
local members side by side across devices (or a CPU's cores), each member in
another process or behind an HTTP endpoint on a thread of its own, so a round
costs about the slowest member's time. Local verifiers that share a device are
scored in one launch (the cross-model single pass); any other member verifies
through its own ``verify``. Members of different kinds mix freely.
"""

from __future__ import annotations

from typing import Sequence

from specem_fast.members.local.member import LocalMember, VerifyPlan, score_plans
from specem_fast.members.interface import CommitCall, DraftCall, DraftOut, Member, OpenCall, VerifyCall, VerifyOut
from specem_fast.members.pool import MemberPool


class MemberCrew:
    def __init__(self, members: dict[str, Member], parallel: str = "auto"):
        self.members = members
        interpreted = any(m.interpreted for m in members.values() if isinstance(m, LocalMember))
        devices = {n: m.device if isinstance(m, LocalMember) else None for n, m in members.items()}
        self.pool = MemberPool(devices, parallel, interpreted)

    def open(self, calls: dict[str, list[OpenCall]]) -> None:
        names = [m for m, cs in calls.items() if cs]
        self.pool.map(lambda m: self.members[m].open(calls[m]), names)

    def draft(self, calls: dict[str, list[DraftCall]]) -> dict[str, list[DraftOut]]:
        names = [m for m, cs in calls.items() if cs]
        return dict(zip(names, self.pool.map(lambda m: self.members[m].draft(calls[m]), names)))

    def verify(self, calls: dict[str, list[VerifyCall]]) -> dict[str, list[VerifyOut]]:
        names = [m for m, cs in calls.items() if cs]
        got = self.pool.map(lambda m: self._verify_or_lay_out(m, calls[m]), names)
        plans = [g for g in got if isinstance(g, VerifyPlan)]
        scored = dict(zip(map(id, plans), score_plans(plans)))  # one launch per device
        return {m: scored[id(g)] if isinstance(g, VerifyPlan) else g for m, g in zip(names, got)}

    def _verify_or_lay_out(self, m: str, calls: list[VerifyCall]) -> VerifyPlan | list[VerifyOut]:
        member = self.members[m]
        # scored below, together with the device's other verifiers (one by one when batch-invariant)
        if isinstance(member, LocalMember) and not member.batch_invariant:
            return member.lay_out(calls)
        return member.verify(calls)

    def commit(self, calls: dict[str, list[CommitCall]]) -> dict[str, list[tuple[int, ...]]]:
        names = [m for m, cs in calls.items() if cs]
        return dict(zip(names, self.pool.map(lambda m: self.members[m].commit(calls[m]), names)))

    def close(self, requests: Sequence[int]) -> None:
        """Every member forgets the requests; one member's failure does not keep the others' state."""
        errors = []
        for m in self.members.values():
            try:
                m.close(requests)
            except Exception as exc:  # noqa: BLE001 - raised after every member was told
                errors.append(exc)
        if errors:
            raise errors[0]

    def shutdown(self) -> None:
        self.pool.close()
        for m in self.members.values():
            m.shutdown()
