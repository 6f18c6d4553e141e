"""The decoding strategies side by side: rows gathered from each benchmark's newest record.

Reads the newest JSON record (by the time stamp in its name) of
bench/speculative.py, bench/lookahead.py, bench/early_exit.py and
bench/cascade.py under bench/results/, and puts their rows in one table and
one speed-against-quality plot. It runs nothing itself, so the rows come
from different runs: each row names its record, and its speedup is against
the plain decode *of that same run* (never against another record's). The
quality columns say what each benchmark measured:

  speculative, lookahead  identical: tokens equal to plain greedy (lossless methods)
  early_exit              position-wise token agreement of the decoded continuation
                          with the full model's, and perplexity (copied KV, CALM)
  cascade                 teacher-forced agreement with SmolLM2 fp32's greedy choice

A benchmark without a record yet is listed as missing. Writes a JSON record
(the rows and which record each came from) and a PNG.

    python bench/decode_strategies.py [--workload chat]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine, pyplot, versions, write_record  # noqa: E402

SOURCES = ("speculative", "lookahead", "early_exit", "cascade")
_STAMP = re.compile(r"-(\d{8}-\d{6})\.json$")


def newest_record(name: str, results: Path = RESULTS_DIR) -> Path | None:
    """The record of ``name`` (``name-<host>-<YYYYmmdd-HHMMSS>.json``) with the latest stamp."""
    found = []
    for path in results.glob(f"{name}-*.json"):
        match = _STAMP.search(path.name)
        if match:
            found.append((match.group(1), path))
    return max(found)[1] if found else None


def _row(strategy, setting, record, tokens_per_s, speedup, agreement=None, measure=None, perplexity=None,
         identical=None):
    return dict(strategy=strategy, setting=setting, record=record, tokens_per_s=tokens_per_s, speedup=speedup,
                agreement=agreement, agreement_measure=measure, perplexity=perplexity, identical=identical)


def speculative_rows(data: dict, name: str, workload: str) -> list[dict]:
    rows = []
    for r in data.get("rows", []):
        if r.get("workload") != workload or r.get("batch", 1) != 1 or r.get("target", "fp32") != "fp32":
            continue
        strategy = "plain" if r["setting"] == "plain" else "speculative"
        identical = True if strategy == "plain" else r.get("identical")  # plain is the reference
        rows.append(_row(strategy, r["setting"], name, r["tokens_per_s"], r.get("speedup"),
                         1.0 if identical else None, "identical to plain greedy" if identical else None,
                         identical=identical))
    return rows


def lookahead_rows(data: dict, name: str, workload: str) -> list[dict]:
    rows = []
    for r in data.get("rows", []):
        if r.get("workload", workload) != workload or r.get("batch", 1) != 1:
            continue
        setting = r.get("setting") or r.get("name") or "lookahead"
        identical = True if setting == "plain" else r.get("identical")
        rows.append(_row("plain" if setting == "plain" else "lookahead", setting, name, r.get("tokens_per_s"),
                         r.get("speedup"), 1.0 if identical else None,
                         "identical to plain greedy" if identical else None, identical=identical))
    return rows


def early_exit_rows(data: dict, name: str, workload: str) -> list[dict]:
    rows = []
    for r in data.get("rows", []):
        if r.get("threshold") is None:
            setting = f"full model ({r.get('model')})"
        else:
            setting = f"t={r['threshold']:g} ({r.get('model')})"
        rows.append(_row("early exit", setting, name, r.get("tokens_per_s"), r.get("speedup"),
                         r.get("decode_agreement"), "decoded tokens equal to the full model's, by position",
                         r.get("copy_ppl")))
    return rows


def cascade_rows(data: dict, name: str, workload: str) -> list[dict]:
    return [_row("cascade", r["setting"], name, r["tokens_per_s"], r.get("speedup_vs_fp32"), r.get("agreement"),
                 "teacher-forced agreement with fp32 greedy", identical=r.get("identical"))
            for r in data.get("rows", [])]


ADAPTERS = {"speculative": speculative_rows, "lookahead": lookahead_rows, "early_exit": early_exit_rows,
            "cascade": cascade_rows}


def gather(workload: str, results: Path = RESULTS_DIR) -> tuple[list[dict], dict]:
    rows, sources = [], {}
    for source in SOURCES:
        path = newest_record(source, results)
        if path is None:
            sources[source] = None
            continue
        data = json.loads(path.read_text())
        m = data.get("machine", {})
        sources[source] = dict(record=path.name, cpu=m.get("cpu_model"),
                               load_average_start=m.get("load_average_start"),
                               load_average_end=m.get("load_average_end"))
        rows += ADAPTERS[source](data, path.name, workload)
    return rows, sources


def table(rows: list[dict]) -> str:
    lines = ["| strategy | setting | tok/s | speedup (vs its run's plain) | agreement | perplexity | record |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        def num(v, fmt):
            return "-" if v is None else format(v, fmt)

        agreement = num(r["agreement"], ".3f")
        if r["identical"] is False:
            agreement = "not identical"
        lines.append(f"| {r['strategy']} | {r['setting']} | {num(r['tokens_per_s'], '.1f')} | "
                     f"{num(r['speedup'], '.2f')} | {agreement} | {num(r['perplexity'], '.2f')} | {r['record']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path):
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        part = [r for r in rows if r["strategy"] == strategy and r["speedup"] is not None
                and r["agreement"] is not None]
        if part:
            ax.scatter([r["agreement"] for r in part], [r["speedup"] for r in part], label=strategy, s=22)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("agreement with plain greedy (each benchmark's own measure: see the table)")
    ax.set_ylabel("tokens/s against the plain decode of the same run")
    ax.set_title("Decoding strategies, SmolLM2-135M on CPU (rows from separate records)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="chat", help="workload of the speculative / lookahead records")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows, sources = gather(args.workload)
    record = dict(benchmark="decode_strategies", machine=machine(), versions=versions(),
                  settings=dict(workload=args.workload), sources=sources, rows=rows,
                  notes="Gathered from the newest record of each benchmark; nothing was run here. Rows of "
                        "different records come from different runs (and machine loads): compare speedups, "
                        "each against its own run's plain decode, not tokens/s across records.")
    path = write_record("decode_strategies", record, args.out)
    for source, info in sources.items():
        print(f"{source:12s} " + (f"{info['record']} ({info['cpu']}, load {info['load_average_start']} -> "
                                  f"{info['load_average_end']})" if info else "no record yet"))
    print()
    print(table(rows))
    picture = plot(rows, path.with_suffix(".png"))
    print(f"\nrecord: {path}" + (f"\nplot: {picture}" if picture else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
