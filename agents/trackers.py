"""Experiment trackers beside ``metrics.jsonl``: TensorBoard, Weights & Biases and Trackio (``--report-to``).

Every line a trainer writes to ``metrics.jsonl`` goes to each tracker too, under the same names
(``loss``, ``eval/accuracy``, ``objective/kl``, ...) at its ``step``. Where they write:

- ``tensorboard``: event files in ``<output_dir>/tensorboard`` (torch's ``SummaryWriter``; needs the
  ``tensorboard`` package), readable with ``tensorboard --logdir <output_dir>``;
- ``wandb``: a run in project ``$WANDB_PROJECT`` (default ``rlhf-gym``) named after the output folder,
  its files under ``<output_dir>/wandb``. Without a network (no connection to ``api.wandb.ai`` within
  a second) the run is offline, to be uploaded later with ``wandb sync``; ``$WANDB_MODE`` overrides;
- ``trackio``: a run in project ``$TRACKIO_PROJECT`` (default ``rlhf-gym``). Trackio keeps its runs in
  a local database unless told of a Hugging Face Space, so it never needs a network.

A tracker whose package is missing is an error that names the package to install, raised when the
trainer starts (before any training), not at the first log.
"""

from __future__ import annotations

import importlib
import os
import socket
from pathlib import Path
from typing import Any, Protocol

REPORT_TO = ("none", "tensorboard", "wandb", "trackio")
"""The accepted names of ``report_to``."""

REPORT_TO_HELP = ("where metrics go besides metrics.jsonl: none, or one or more of tensorboard "
                  "(<output_dir>/tensorboard), wandb (offline without a network), trackio (a local database)")

_PROJECT = "rlhf-gym"


def parse_report_to(value: Any, owner: str) -> list[str]:
    """The trackers of a ``report_to`` value (a list of names, or one string of comma- or space-separated
    names); ``none`` alone means no tracker. Raises ``ValueError`` naming a bad entry."""
    names = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    for name in names:
        if name not in REPORT_TO:
            raise ValueError(f"{owner}.report_to: unknown tracker {name!r}; expected some of {list(REPORT_TO)}")
    if "none" in names and len(names) > 1:
        raise ValueError(f"{owner}.report_to {names} mixes 'none' with trackers: give 'none' alone or the trackers")
    return list(dict.fromkeys(n for n in names if n != "none"))


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _require(package: str, tracker: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ImportError(f"report_to={tracker!r} needs the {package} package: pip install {package} "
                          f"(or pip install 'rlhf-gym[{tracker}]'), or leave {tracker} out of report_to") from err


def _online(host: str, port: int = 443, timeout_s: float = 1.0) -> bool:
    """Whether ``host`` answers a TCP connection within ``timeout_s``."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


class TensorBoardTracker:
    """Scalars to TensorBoard event files in ``log_dir``."""

    def __init__(self, log_dir: Path):
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run, offline when ``api.wandb.ai`` cannot be reached."""

    def __init__(self, output_dir: Path, run_name: str, config: dict[str, Any]):
        wandb = _require("wandb", "wandb")
        mode = os.environ.get("WANDB_MODE") or ("online" if _online("api.wandb.ai") else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", _PROJECT), name=run_name, dir=str(output_dir),
                              config=config, mode=mode, reinit="create_new")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    """A Trackio run (a local database; no network needed)."""

    def __init__(self, run_name: str, config: dict[str, Any]):
        self.trackio = _require("trackio", "trackio")
        self.trackio.init(project=os.environ.get("TRACKIO_PROJECT", _PROJECT), name=run_name, config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)

    def close(self) -> None:
        self.trackio.finish()


def open_trackers(report_to: list[str], output_dir: Path, config: dict[str, Any] | None = None) -> list[Tracker]:
    """The trackers ``report_to`` names (see :func:`parse_report_to`), writing for the run in ``output_dir``."""
    output_dir = Path(output_dir)
    run_name = output_dir.resolve().name
    config = _settings(config or {})
    opened: list[Tracker] = []
    for name in report_to:
        if name == "tensorboard":
            opened.append(TensorBoardTracker(output_dir / "tensorboard"))
        elif name == "wandb":
            opened.append(WandbTracker(output_dir, run_name, config or {}))
        elif name == "trackio":
            opened.append(TrackioTracker(run_name, config or {}))
    return opened


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """The run settings a tracker records: scalars, and short lists of them (not e.g. a list of prompts)."""
    def plain(value: Any) -> bool:
        return value is None or isinstance(value, (str, int, float, bool))

    return {k: v for k, v in config.items()
            if plain(v) or (isinstance(v, (list, tuple)) and len(v) <= 16 and all(plain(x) for x in v))}


def scalars(record: dict[str, Any]) -> tuple[int | None, dict[str, float]]:
    """``(step, {name: value})`` of a metrics line: its numbers and booleans (as 0/1), ``step`` apart."""
    values = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
    step = record.get("step")
    return (int(step) if isinstance(step, (int, float)) else None), values
