"""Per-epoch training history: history.json, history.csv and loss_curve.png (rank 0 only)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from pneumomap.fileio import atomic_write_bytes, atomic_write_text


def format_record(record: dict) -> str:
    """One line for the console: epoch, losses, scalar metrics."""
    parts = [f"epoch {record['epoch']}"]
    for key, value in record.items():
        if key == "epoch" or isinstance(value, (list, dict)):
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    if "confusion_matrix" in record:
        parts.append(f"confusion [[tn, fp], [fn, tp]] {record['confusion_matrix']}")
    return "  ".join(parts)


def write(out: Path, history: list[dict]) -> None:
    """history.json (everything) and history.csv (one row per epoch; lists as JSON text)."""
    atomic_write_text(out / "history.json", json.dumps(history, indent=1))
    columns: list[str] = []
    for record in history:
        columns += [k for k in record if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for record in history:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in record.items()})
    atomic_write_text(out / "history.csv", buffer.getvalue())


def plot(out: Path, history: list[dict], metric: str) -> None:
    """loss_curve.png: train and validation loss per epoch, the validation metric on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(epochs, [r["train_loss"] for r in history], "o-", label="train loss")
    ax.plot(epochs, [r["val_loss"] for r in history], "s-", label="val loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    metric_values = [r.get(f"val_{metric}") for r in history]
    if any(v is not None for v in metric_values):
        ax2 = ax.twinx()
        ax2.plot(epochs, metric_values, "^--", color="tab:green", label=f"val {metric}")
        ax2.set_ylabel(f"val {metric}")
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.set_title(f"training history ({out.name})")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(out / "loss_curve.png", buffer.getvalue())
