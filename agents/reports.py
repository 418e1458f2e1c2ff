"""Pictures and small artefacts of a run: learning curves, saved policies."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def plot_learning_curve(path: Path, points: list[tuple[int, float]], title: str, ylabel: str) -> Path:
    """Save a line plot of ``(env_step, value)`` points as a PNG."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", lw=1.5)
    ax.axhline(1.0, color="grey", ls="--", lw=1, label="optimum")
    ax.set(title=title, xlabel="env steps", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_policy(directory: Path, module, config) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` atomically (temp dir, then rename)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        os.replace(directory, old)
        os.replace(tmp, directory)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        os.replace(tmp, directory)
    return directory
