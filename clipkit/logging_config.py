"""The run logging's config (``logging.*``): progress bar, wandb, TensorBoard, the run report, the MFU peak."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from clipkit.errors import Choice, require


class WandbMode(Choice):
    offline = "offline"  # needs no account
    online = "online"  # needs credentials and network
    disabled = "disabled"


@dataclass
class LoggingConfig:
    # A progress bar on the main rank's terminal.
    progress: bool = True
    # Log to Weights & Biases (offline by default: no network needed).
    wandb: bool = False
    # (the wandb project)
    wandb_project: str = "clipkit"
    # (the wandb entity / team)
    wandb_entity: Optional[str] = None
    # (offline writes runs to sync later with `wandb sync`)
    wandb_mode: WandbMode = WandbMode.offline
    # TensorBoard event files in RUN_DIR/tensorboard (`tensorboard --logdir runs`): the same scalars as
    # metrics.jsonl, eval metrics included; a resumed run drops the events past its checkpoint.
    tensorboard: bool = False
    # RUN_DIR/report.html at the end of training: curves, eval, confusion matrix, retrieval examples, data
    # errors, config, environment (also on demand: `clipkit report RUN_DIR`).
    report: bool = True
    # Peak dense TFLOP/s of one device at the precision in use, for MFU; 0 = known GPUs from a table, none on CPU.
    peak_tflops: float = 0.0

    def validate(self, prefix: str = "logging") -> None:
        require(f"{prefix}.peak_tflops", self.peak_tflops, self.peak_tflops >= 0, "must be >= 0")
