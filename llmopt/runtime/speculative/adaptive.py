"""Per-sequence k from recent acceptance.

Each sequence starts at the configured k. After a verification that kept
every draft its k grows by one (up to the configured k); after one that
rejected a draft it becomes the number kept plus one, so a sequence whose
drafts keep failing drafts one token at a time. A sequence whose last
``window`` verifications kept nothing is switched off (k = 0) for
``cooldown`` steps, then tries again with k = 1: a poor drafter then costs
almost nothing, and a sequence that becomes predictable (a passage being
copied) is picked up again.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _State:
    k: int
    misses: int = 0  # verifications in a row that kept nothing
    off_steps: int = 0  # steps left with speculation off


class AdaptiveK:
    def __init__(self, max_k: int, enabled: bool = True, window: int = 4, cooldown: int = 16):
        self.max_k, self.enabled, self.window, self.cooldown = max_k, enabled, window, cooldown
        self._states: dict[str, _State] = {}

    def k(self, request_id: str) -> int:
        if not self.enabled:
            return self.max_k
        state = self._states.setdefault(request_id, _State(self.max_k))
        if state.off_steps:
            state.off_steps -= 1
            return 0
        return state.k

    def observe(self, request_id: str, drafted: int, accepted: int) -> None:
        if not self.enabled or drafted == 0:
            return
        state = self._states.setdefault(request_id, _State(self.max_k))
        if accepted == drafted:
            state.k = min(self.max_k, state.k + 1)
        else:
            state.k = max(1, accepted + 1)
        state.misses = state.misses + 1 if accepted == 0 else 0
        if state.misses >= self.window:
            state.misses, state.k, state.off_steps = 0, 1, self.cooldown

    def forget(self, request_id: str) -> None:
        self._states.pop(request_id, None)
