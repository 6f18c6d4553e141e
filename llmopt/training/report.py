"""A run's files: ``result.json`` (config, per-step records, evaluations) and
``loss.png`` (training and evaluation loss per step; needs matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_run_files", "plot_losses"]


def write_run_files(output_dir, result, config) -> dict:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({"config": config.to_dict(), **result.to_dict()}, indent=1))
    files = {"result": str(out / "result.json"), "log": str(out / "log.jsonl")}
    png = plot_losses(result, out / "loss.png")
    if png is not None:
        files["plot"] = str(png)
    return files


def plot_losses(result, path):
    """The loss curve as a PNG; None if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([s["step"] for s in result.steps], [s["loss"] for s in result.steps], label="train loss")
    if result.evals:
        axis.plot([e["step"] for e in result.evals], [e["loss"] for e in result.evals], "o-", label="eval loss")
    if result.best_step is not None:
        axis.axvline(result.best_step, color="grey", linestyle=":", label=f"best (step {result.best_step})")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("mean per-token loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)
