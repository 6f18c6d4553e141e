"""What the backend did to a model, in a form both people and tests can read."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from llmopt.passes.base import Rewrite, Skipped


@dataclass
class PassRecord:
    """One pass's run over one graph."""

    name: str
    status: str  # "ran", "skipped (disabled)", "failed: ...", "undone: ..."
    rewrites: list[Rewrite] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class GraphReport:
    """Everything the backend did to one graph Dynamo handed it."""

    index: int
    passes: list[PassRecord] = field(default_factory=list)
    ops_before: Counter = field(default_factory=Counter)
    ops_after: Counter = field(default_factory=Counter)
    lowering: str = ""
    lowering_status: str = ""


class Report:
    """The report of one compilation (all graphs, in the order Dynamo produced them)."""

    def __init__(self) -> None:
        self.graphs: list[GraphReport] = []

    def new_graph(self) -> GraphReport:
        graph = GraphReport(index=len(self.graphs))
        self.graphs.append(graph)
        return graph

    # -- queries -------------------------------------------------------------
    def rewrites(self, kind: str | None = None) -> list[Rewrite]:
        return [
            r for g in self.graphs for p in g.passes for r in p.rewrites if kind in (None, r.kind)
        ]

    def impls(self, kind: str | None = None) -> dict[str, str]:
        """Module path -> the implementation each rewritten site of ``kind`` runs."""
        return {r.location: r.impl for r in self.rewrites(kind) if r.impl}

    def count(self, kind: str) -> int:
        """Number of regions of ``kind`` (e.g. ``"attention"``) rewritten."""
        return len(self.rewrites(kind))

    def unmatched(self, kind: str | None = None) -> list[Skipped]:
        """Candidate sites of ``kind`` left alone, each with its reason."""
        return [
            s for g in self.graphs for p in g.passes for s in p.skipped if kind in (None, s.kind)
        ]

    def failures(self) -> list[str]:
        return [
            f"graph {g.index}: {p.name}: {p.status}"
            for g in self.graphs
            for p in g.passes
            if p.status.startswith(("failed", "undone"))
        ]

    def ops_before(self) -> Counter:
        return sum((g.ops_before for g in self.graphs), Counter())

    def ops_after(self) -> Counter:
        return sum((g.ops_after for g in self.graphs), Counter())

    # -- text ----------------------------------------------------------------
    def __str__(self) -> str:
        lines = [f"llmopt report: {len(self.graphs)} graph(s)"]
        for g in self.graphs:
            lines.append(f"\n== graph {g.index} (lowered to {g.lowering or '-'}{_paren(g.lowering_status)})")
            for p in g.passes:
                lines.append(f"  pass {p.name}: {p.status}, {len(p.rewrites)} rewritten, "
                             f"{len(p.skipped)} left alone ({p.seconds * 1000:.0f} ms)")
                lines.extend(f"    + {r.kind} at {r.location}: {r.detail}"
                             + (f" [impl {r.impl}]" if r.impl else "") for r in p.rewrites)
                lines.extend(f"    - {s.kind} at {s.location}: {s.reason}" for s in p.skipped)
                lines.extend(f"    . {n}" for n in p.notes)
            lines.append("  ops (before -> after):")
            lines.extend(_op_table(g.ops_before, g.ops_after))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<llmopt Report: {len(self.graphs)} graph(s), {len(self.rewrites())} rewrites>"


def _paren(text: str) -> str:
    return f", {text}" if text else ""


def _op_table(before: Counter, after: Counter, width: int = 36) -> list[str]:
    names = sorted(set(before) | set(after), key=lambda n: (-max(before[n], after[n]), n))
    rows = []
    for name in names:
        mark = "" if before[name] == after[name] else "  *"
        rows.append(f"    {name:<{width}} {before[name]:>5} -> {after[name]:<5}{mark}")
    return rows
