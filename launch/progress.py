"""Rank 0's console: a rich progress bar with loss and tokens/s, and a summary at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from launch.config import ExperimentConfig


class TrainingProgress:
    def __init__(self, config: ExperimentConfig, enabled: bool = True, start: int = 0) -> None:
        self.enabled = enabled
        self.tokens_per_step = config.train.batch_size * config.model.block_size
        self.console = Console(stderr=False)
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} tok/s"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not enabled,
        )
        self.task = self.progress.add_task(
            "train", total=config.train.steps, completed=start, loss="-", speed="-"
        )

    def __enter__(self) -> TrainingProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, record: Any) -> None:
        if not self.enabled:
            return
        if record.nonfinite:  # train.on_nonfinite=skip
            self.progress.console.print(
                f"step {record.step}: loss {record.loss:g}, gradient norm {record.grad_norm:g}: "
                "not finite, update skipped"
            )
        speed = self.tokens_per_step / record.time_s if record.time_s > 0 else 0.0
        self.progress.update(self.task, advance=1, loss=f"{record.loss:.4f}", speed=f"{speed:,.0f}")

    def summary(self, metrics: dict[str, Any], path: Path) -> None:
        first, last = metrics["steps"][0]["loss"], metrics["final_loss"]
        layout = metrics["layout"]
        self.console.print(
            f"[bold]done[/]: dp={layout['dp']} tp={layout['tp']} pp={layout['pp']} "
            f"on {metrics['world_size']} rank(s); loss {first:.4f} -> {last:.4f}, "
            f"val {metrics['val_loss']:.4f}, {metrics['tokens_per_s']:,.0f} tok/s; "
            f"wrote {path}"
        )
