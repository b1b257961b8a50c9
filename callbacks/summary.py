"""The end of ``fit``: where to look (run directory, grids, progress strip, checkpoints, export, logger runs) and the
validation metrics at the first and last validation, as a few lines of text."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.export import DreamBoothExport
from callbacks.grid import SampleGrid
from callbacks.metrics import validation_history
from callbacks.run_dir import run_dir

LOWER_IS_BETTER = {"pres"}


def metrics_table(history: dict[int, dict[str, float]]) -> list[str]:
    """Lines of a table: each metric at the first and the last validation, and the change between them."""
    if not history:
        return []
    first, last = min(history), max(history)
    steps = [first] if first == last else [first, last]
    names = [n for n in history[last] if n in history[first]]
    header = ["val/*", *(f"step {s}" for s in steps)] + (["change"] if len(steps) == 2 else [])
    table = [header]
    for name in names:
        values = [history[s][name] for s in steps]
        cells = [f"val/{name}", *(_number(v) for v in values)]
        if len(steps) == 2:
            change = round(values[1] - values[0], 3) + 0.0  # + 0.0: no "-0.000"
            better = "lower is better" if name in LOWER_IS_BETTER else "higher is better"
            cells.append(f"{change:+.3f} ({better})" if math.isfinite(change) else "")
        table.append(cells)
    widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip() for row in table]


def _number(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "n/a"


def summary_text(step: int, places: list[tuple[str, str]], history: dict[int, dict[str, float]]) -> str:
    """The summary: the step reached, ``(what, where)`` lines, then the metrics table (Lightning-free)."""
    width = max((len(what) for what, _ in places), default=0)
    lines = [f"fit finished at step {step}. Where to look:"]
    lines += [f"  {what.ljust(width)}  {where}" for what, where in places]
    table = metrics_table(history)
    if table:
        lines += ["Validation metrics, first and last validation:"] + [f"  {line}" for line in table]
    return "\n".join(lines)


class FitSummary(pl.Callback):
    """Puts together, on rank 0 when ``fit`` ends, where to look and how the validation metrics moved.

    ``python train.py fit`` prints it as the last thing it prints (after W&B's closing lines); ``text`` holds it.
    It reads what the other callbacks made: the grids and the strip of ``grid``, the metrics of ``metrics``, the
    export of ``export``, the best checkpoint of a ``ModelCheckpoint`` with a monitor, and each logger's run.

    Args:
        enabled: Set to false to print nothing at the end of ``fit``.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.text: str | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        self.text = summary_text(trainer.global_step, where_to_look(trainer), validation_history(trainer))


def where_to_look(trainer: pl.Trainer) -> list[tuple[str, str]]:
    """(what, where) for the run directory and what each callback and logger of the run wrote."""
    pictures, checkpoints, export = [], [], []
    for callback in trainer.callbacks:
        if isinstance(callback, SampleGrid) and callback.last_grid is not None:
            grids = sorted(callback.last_grid.parent.glob("step_*.png"))
            steps = ", ".join(str(int(p.stem.split("_")[1])) for p in grids)
            pictures.append(("grids", f"{callback.last_grid.parent}/step_*.png (steps {steps})"))
            if callback.progress_path is not None:
                pictures.append(("progress strip", str(callback.progress_path)))
        elif isinstance(callback, ModelCheckpoint):
            if callback.monitor and callback.best_model_path:
                checkpoints.append((f"best {callback.monitor}", callback.best_model_path))
            if callback.last_model_path:
                checkpoints.append(("last checkpoint", callback.last_model_path))
        elif isinstance(callback, DreamBoothExport) and callback.last_export is not None:
            export.append(("export", str(callback.export_dir(trainer))))
    loggers = [place for logger in trainer.loggers for place in logger_places(logger)]
    return [("run directory", str(run_dir(trainer))), *pictures, *checkpoints, *export, *loggers]


def logger_places(logger) -> list[tuple[str, str]]:
    """Where a logger's run is: the W&B run (its page, or offline its folder and how to upload it), the CSV file or
    the TensorBoard folder."""
    name = type(logger).__name__
    if name == "WandbLogger":
        run = logger.experiment
        if getattr(run, "offline", False):
            folder = Path(run.dir).parent  # <save_dir>/wandb/offline-run-<time>-<id>
            return [("W&B run", f"{folder} (offline; upload with: wandb sync {folder})")]
        return [("W&B run", str(run.url))]
    if name == "CSVLogger":
        return [("metrics", str(Path(logger.log_dir) / "metrics.csv"))]
    if name == "TensorBoardLogger":
        return [("TensorBoard", f"tensorboard --logdir {logger.log_dir}")]
    return []


def print_fit_summary(trainer: pl.Trainer) -> None:
    """Print the summary of a finished ``fit`` (if any) as the last lines of the command's output: W&B runs are
    finished first, so that W&B's own closing lines come before it."""
    summary = next((c for c in trainer.callbacks if isinstance(c, FitSummary)), None)
    if summary is None or not summary.text:
        return
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()
    print("\n" + summary.text, flush=True)
