"""Drafted tokens laid out as a tree after a sequence's last token (lookahead decoding).

A step that verifies drafts feeds ``1 + d`` tokens: the sequence's last token
(index 0) and d drafted ones. Plain speculation drafts a chain: draft ``j``
follows draft ``j - 1``. A tree lets several continuations share one forward:
``parents[j]`` is the index (into the fed tokens, 0 = the last token) of the
token draft ``j`` continues, always an earlier one (``parents[j] <= j``), so a
prefix of the drafts is again a tree (the scheduler may cut drafts short).

Each fed token sits at the position after its parent's (``start + depth``) and
attends to the cached prefix and its own ancestors only: the tokens of other
branches are invisible to it, as if each branch ran alone. The K/V of all fed
tokens go to consecutive cache slots after the prefix, in feeding order; only
the slots of the verified tokens are kept (the verifier moves a verified
branch's K/V to the slots after the prefix when it was not the first branch).
"""

from __future__ import annotations

import torch


def check_parents(parents: list[int]) -> None:
    for j, parent in enumerate(parents):
        if not isinstance(parent, int) or not 0 <= parent <= j:
            raise ValueError(f"token tree: draft {j} has parent {parent!r}; a draft continues the "
                             f"last token (0) or an earlier draft (1 to {j})")


def depths(parents: list[int]) -> list[int]:
    """Depth of each fed token: 0 for the last token, then one more than its parent's."""
    out = [0]
    for parent in parents:
        out.append(out[parent] + 1)
    return out


def is_chain(parents: list[int]) -> bool:
    return all(parent == j for j, parent in enumerate(parents))


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """(1 + d, 1 + d) bool: row ``r`` is True at ``r`` and at each of its ancestors."""
    size = 1 + len(parents)
    mask = torch.zeros((size, size), dtype=torch.bool)
    mask[0, 0] = True
    for j, parent in enumerate(parents):
        row = j + 1
        mask[row] = mask[parent]
        mask[row, row] = True
    return mask
