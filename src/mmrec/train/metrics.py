"""What a run writes as it goes: metrics.csv, eval.csv, TensorBoard events and a loss plot."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

TRAIN_COLUMNS = [
    "step",
    "tokens",
    "loss",
    "bpb",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "seq_len",
    "batch_size",
    "elapsed_s",
    "skipped",
]


class MetricsWriter:
    """Appends rows; on resume, drops rows newer than the checkpoint so files stay consistent."""

    def __init__(self, out: Path, enabled: bool = True, resume_step: int | None = None) -> None:
        self.out, self.enabled = out, enabled
        self.train_path, self.eval_path = out / "metrics.csv", out / "eval.csv"
        self._tb: Any = None
        if not enabled:
            return
        for path in (self.train_path, self.eval_path):
            if resume_step is None:
                path.unlink(missing_ok=True)
            elif path.exists():
                self._truncate_after(path, resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # tensorboard is an optional extra
            self._tb = None

    @staticmethod
    def _truncate_after(path: Path, step: int) -> None:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(kept)

    def _append(self, path: Path, columns: list[str], row: dict[str, Any]) -> None:
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})

    def train(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._append(self.train_path, TRAIN_COLUMNS, row)
        if self._tb is not None:
            for key in ("loss", "bpb", "lr", "grad_norm", "tokens_per_s", "seq_len"):
                value = row.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, row["step"])

    def eval(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        columns = ["step", "tokens"] + sorted(k for k in row if k not in ("step", "tokens"))
        if self.eval_path.exists():
            with open(self.eval_path, newline="") as f:
                header = next(csv.reader(f), None)
            columns = header or columns
        self._append(self.eval_path, columns, row)
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("step", "tokens") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"val/{key}", value, row["step"])
            self._tb.flush()

    def plot(self, title: str) -> Path | None:
        """loss.png: training and validation bits per byte against tokens seen."""
        if not self.enabled or not self.train_path.exists():
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        train = read_csv(self.train_path)
        evals = read_csv(self.eval_path) if self.eval_path.exists() else []
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.plot([r["tokens"] for r in train], [r["bpb"] for r in train], lw=0.8, alpha=0.6, label="train")
        if evals:
            ax.plot([r["tokens"] for r in evals], [r["val_bpb"] for r in evals], "o-", lw=1.5, label="validation")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("bits per byte")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.out / "loss.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_csv(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]
