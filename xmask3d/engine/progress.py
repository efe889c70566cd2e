"""Progress of long loops (training steps, evaluation views) for people and for log files.

On a terminal a tqdm bar is drawn; anywhere else (a Prefect worker, a CI log, output piped to a
file) there is no bar, so no raw ``\\r`` lands in a log, and plain lines are written through a
logger instead: one every ``interval_s`` seconds and one at the end of every epoch, each with the
loss, the learning rates, steps per second and the time left. The logger is whatever the caller
passes (the flows pass Prefect's run logger, so the lines show in the flow run's logs), else this
package's module logger.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def is_tty(stream: IO[str] | None = None) -> bool:
    """True when ``stream`` (default stderr, where tqdm draws) is an interactive terminal."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed stream
        return False


def format_duration(seconds: float) -> str:
    """``1:02:03`` / ``2:03`` style; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class TrainProgress:
    """Step and epoch progress of a training run (rank 0 only: pass ``enabled=False`` elsewhere)."""

    def __init__(self, total_steps: int, start_step: int, iters_per_epoch: int, epochs: int,
                 logger: logging.Logger | logging.LoggerAdapter | None = None, enabled: bool = True,
                 interval_s: float = 60.0, tty: bool | None = None) -> None:
        self.total_steps, self.start_step = total_steps, start_step
        self.iters_per_epoch, self.epochs = iters_per_epoch, epochs
        self.logger = logger if logger is not None else log
        self.enabled = enabled
        self.interval_s = interval_s
        self.tty = is_tty() if tty is None else tty
        self.started = time.monotonic()
        self.last_line = self.started
        self.bar: Any = None
        self.step = start_step

    def rate(self) -> float:
        """Steps per second since this process started training (resumed steps not counted)."""
        elapsed = time.monotonic() - self.started
        done = self.step - self.start_step
        return done / elapsed if elapsed > 0 and done > 0 else math.nan

    def eta(self) -> float:
        rate = self.rate()
        return (self.total_steps - self.step) / rate if rate > 0 else math.nan

    def start_epoch(self, epoch: int, offset: int) -> None:
        if self.enabled and self.tty:
            self.bar = tqdm(desc=f"epoch {epoch + 1}/{self.epochs}", initial=offset,
                            total=self.iters_per_epoch, unit="step", leave=False)

    def update(self, step: int, values: Mapping[str, float]) -> None:
        """After a step: move the bar, or write a plain line when ``interval_s`` has passed."""
        self.step = step
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if "loss/loss" in values:
                self.bar.set_postfix(loss=f"{values['loss/loss']:.3f}")
            return
        now = time.monotonic()
        if now - self.last_line >= self.interval_s:
            self.last_line = now
            self.logger.info("step %d/%d: %s", step, self.total_steps, self._summary(values))

    def end_epoch(self, epoch: int, step: int, mean_loss: float, values: Mapping[str, float]) -> None:
        """One line per epoch: mean loss of the epoch, current lr, step/s, ETA."""
        self.step = step
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self.enabled:
            return
        self.last_line = time.monotonic()
        self.logger.info("epoch %d/%d step %d/%d: %s", epoch + 1, self.epochs, step, self.total_steps,
                         self._summary({**values, "loss/loss": mean_loss}, mean=True))

    def _summary(self, values: Mapping[str, float], mean: bool = False) -> str:
        loss = values.get("loss/loss", math.nan)
        lrs = " ".join(f"{k.removeprefix('lr/')} {v:.3g}" for k, v in values.items() if k.startswith("lr/"))
        return (f"{'mean ' if mean else ''}loss {loss:.4f}, lr {lrs or '?'}, {self.rate():.2f} step/s, "
                f"ETA {format_duration(self.eta())}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def view_bar(total: int, desc: str, show: bool) -> Any:
    """A tqdm bar over evaluation views on a terminal; a disabled one elsewhere (no ``\\r`` in logs)."""
    return tqdm(total=total, desc=desc, unit="view", disable=not (show and is_tty()), leave=False)


# Loggers whose INFO lines drown the pipeline's own (Dask's ~20 lines per cluster, MLflow's
# database set-up, HTTP clients, the sentence-transformers loader).
NOISY_LOGGERS = ("distributed", "mlflow", "alembic", "sentence_transformers", "httpx", "urllib3")


def quiet_library_noise() -> None:
    """Library chatter off by default: WARNING level for :data:`NOISY_LOGGERS`, Dask's
    ``distributed`` logging at warning in worker processes too, and when stderr is no terminal,
    no library progress bars (tqdm, Hugging Face, MLflow artifact transfers), so no ``\r`` in logs.

    Environment variables are only set when the user has not set them (``DASK_LOGGING__DISTRIBUTED``,
    ``MLFLOW_LOGGING_LEVEL``, ``TQDM_DISABLE``, ``HF_HUB_DISABLE_PROGRESS_BARS``,
    ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``);
    set them to get the chatter back. Called by the CLI and by the flow modules.
    """
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is first imported
    if not is_tty():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
