"""Resumable training checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint is a directory::

    checkpoint-00000100/
        model.safetensors       model weights (tied weights stored once)
        optimizer.safetensors   optimizer tensor state, keyed "state/<param index>/<name>"
        rng.safetensors         torch CPU (and CUDA) and numpy generator states
        checkpoint.json         optimizer scalars and param groups, scheduler state, python
                                ``random`` state, the caller's ``state`` dict; written last

It is written into a hidden temporary directory next to the target, every file is fsynced, and
the directory is moved into place with ``os.replace``: a crash leaves either the old checkpoint
or the new one, never a torn one. :func:`latest_checkpoint` only returns directories named
``checkpoint-<step>`` that hold a readable ``checkpoint.json``. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

FORMAT_VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d+)$")
_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "checkpoint.json")


def save_checkpoint(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    state: dict[str, Any],
) -> Path:
    """Atomically write model, optimizer, scheduler, RNG and ``state`` (JSON-serialisable) to ``directory``."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        opt_tensors, opt_json = _flatten_optimizer(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_json = _rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        meta = {
            "format": FORMAT_VERSION,
            "state": state,
            "optimizer": opt_json,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_json,
        }
        try:
            text = json.dumps(meta)
        except TypeError as err:
            raise TypeError(
                f"checkpoint state must be JSON-serialisable (numbers, strings, lists, dicts): {err}"
            ) from err
        (tmp / "checkpoint.json").write_text(text)
        for name in _FILES:
            _fsync(tmp / name)
        _fsync(tmp)
        _move_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_model_dir(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    tokenizer: Any = None,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    json_files: dict[str, Any] | None = None,
    into_existing: bool = False,
    keep_training: bool = False,
) -> Path:
    """Write a model directory: every model the project saves goes through here.

    ``model``: a Hugging Face model (``save_pretrained``: safetensors and ``config.json``), a peft model
    (its adapters alone to ``adapter/``, peft's format, and the model with them merged in beside, so every
    loader reads it like any other Hugging Face directory; merged in place, or in a copy with
    ``keep_training`` so that training goes on with the adapters), or a plain module (``model.safetensors`` of its
    state dict). ``tokenizer`` is saved
    beside when given; ``tensors`` maps file names to state dicts (``{"value_head.safetensors": ...}``) and
    ``json_files`` file names to JSON-serialisable objects.

    Written into a temporary directory, then moved into place: the whole directory at once
    (a crash leaves the old one or the new one), or with ``into_existing`` file by file into a
    directory that holds other files too (a trainer's output folder with its metrics).
    """
    from agents.lora import merged_for_saving

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        model = merged_for_saving(model, tmp, keep_training=keep_training)
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp)
        else:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, state_dict in (tensors or {}).items():
            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp / name))
        for name, value in (json_files or {}).items():
            (tmp / name).write_text(json.dumps(value, indent=2, default=str) + "\n")
        if not into_existing:
            _move_into_place(tmp, directory)
            return directory
        directory.mkdir(exist_ok=True)
        for entry in tmp.iterdir():
            target = directory / entry.name
            if entry.is_dir() and target.is_dir():
                _move_into_place(entry, target)
            else:
                os.replace(entry, target)
        tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _move_into_place(tmp: Path, directory: Path) -> None:
    """Replace ``directory`` by the finished directory ``tmp`` (same parent) with ``os.replace``."""
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
        os.replace(directory, old / directory.name)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
    _fsync(directory.parent)


def load_checkpoint(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote (in place) and return the saved ``state`` dict."""
    directory = Path(directory)
    meta_path = directory / "checkpoint.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a complete checkpoint (no checkpoint.json): pick one from latest_checkpoint()"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: checkpoint format {meta.get('format')!r}, this code reads {FORMAT_VERSION}")
    device = next(model.parameters()).device
    missing, unexpected = load_model(model, str(directory / "model.safetensors"), strict=False, device=str(device))
    if missing or unexpected:
        raise ValueError(
            f"{directory}: weights do not fit this model (missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]})"
        )
    if optimizer is not None:
        if meta["optimizer"] is None:
            raise ValueError(f"{directory} holds no optimizer state: load it with optimizer=None")
        optimizer.load_state_dict(
            _unflatten_optimizer(load_file(str(directory / "optimizer.safetensors")), meta["optimizer"], optimizer)
        )
    if scheduler is not None:
        if meta["scheduler"] is None:
            raise ValueError(f"{directory} holds no scheduler state: load it with scheduler=None")
        scheduler.load_state_dict(meta["scheduler"])
    if restore_rng:
        _set_rng_state(load_file(str(directory / "rng.safetensors")), meta["rng"])
    return meta["state"]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete ``checkpoint-<step>`` directory with the highest step in ``run_dir``, or None."""
    found = []
    for path in list_checkpoints(run_dir):
        try:
            json.loads((path / "checkpoint.json").read_text())
        except (OSError, ValueError):
            continue
        found.append(path)
    return found[-1] if found else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """``checkpoint-<step>`` directories in ``run_dir`` that hold every checkpoint file, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and all((path / name).is_file() for name in _FILES):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints in ``run_dir``."""
    for path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flatten_optimizer(
    optimizer: torch.optim.Optimizer | None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Tensor state to a flat ``{"state/<i>/<name>": tensor}`` dict; the rest to JSON."""
    if optimizer is None:
        return {}, None
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in sd["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{index}/{name}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split("/", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    for saved, current in zip(meta["param_groups"], optimizer.param_groups):
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()})
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = cuda_state
    version, internal, gauss_next = random.getstate()
    return tensors, {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((int(k.split("/")[1]), v) for k, v in tensors.items() if k.startswith("cuda/"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v for _, v in cuda][: torch.cuda.device_count()])
    n = meta["numpy"]
    np.random.set_state(
        (n["kind"], tensors["numpy"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
