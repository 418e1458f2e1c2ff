"""What SFT, reward-model training and DPO share: the config fields, batching, the optimizer and
LR schedule, the metrics JSONL writer, the LM-head trick, and the training loop.

The loop (:func:`run_training`) is the skeleton of every LM trainer here: a seeded permutation per
epoch, one optimizer step per batch of pre-tokenised examples padded to the batch's longest
sequence, gradient clipping, metrics every ``log_every`` steps (tensors stay on the device between
logs, so there is no per-step host sync), evaluation, atomic checkpoints every ``checkpoint_every``
steps, exact resume, and the final model saved as a loadable Hugging Face directory.

Data parallel: launched by ``torchrun`` (or ``accelerate launch``), each process joins the
process group in :func:`start_run` and the loop trains one model with torch's
``DistributedDataParallel``: every optimizer step's batch of ``batch_size`` examples is dealt out
to the processes, gradients are averaged by DDP, and only rank 0 logs, evaluates and writes.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import time
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from agents.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint, save_model_dir
from agents.distributed import LossModule, distributed, join_process_group, shard
from agents.lora import LORA_HELP, check_lora_fields
from agents.trackers import REPORT_TO_HELP, parse_report_to
from rlhf_envs.validation import check_config_fields

LR_SCHEDULES = ("linear", "cosine", "constant")
CPU_FUSED_ADAM = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4)


@dataclass
class LMTrainConfig:
    """Fields every LM trainer (SFT, reward model, DPO) shares; each algorithm's config adds its own."""

    model_path: str | None = field(default=None, metadata={"help": "local Hugging Face causal-LM directory; None = "
                                                                   "the embedded default model"})
    data_path: str = field(default="", metadata={"help": "training data: JSONL, .jsonl.gz, parquet or a "
                                                         "datasets.save_to_disk folder (the fields depend on the "
                                                         "algorithm, agents.data)"})
    output_dir: str = field(default="runs/out", metadata={"help": "the final model (a Hugging Face directory), "
                                                                  "metrics.jsonl and checkpoints/ go here"})
    seed: int = field(default=0, metadata={"help": "seed of torch, numpy, random, the data order and the held-out "
                                                   "split"})
    num_epochs: int = field(default=1, metadata={"help": "passes over the training data"})
    max_steps: int | None = field(default=None, metadata={"help": "total optimizer steps (the LR schedule is sized to "
                                                                  "it; overrides num_epochs); None = num_epochs full "
                                                                  "passes"})
    batch_size: int = field(default=32, metadata={"help": "examples per optimizer step"})
    max_length: int = field(default=128, metadata={"help": "longest tokenised sequence (prompt + response); longer "
                                                           "ones are truncated, see agents.data"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not applied to biases and norms)"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of the steps with a linear LR warm-up from 0"})
    lr_schedule: str = field(default="linear", metadata={"help": "LR decay after warm-up: linear (to 0), cosine (to "
                                                                 "0) or constant"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "clip the global gradient norm to this; None = "
                                                                       "no clipping"})
    eval_fraction: float = field(default=0.05, metadata={"help": "fraction of the data held out for evaluation (0 = "
                                                                 "none)"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every this many steps (0 = only at the end)"})
    log_every: int = field(default=10, metadata={"help": "write a metrics line every this many steps"})
    checkpoint_every: int = field(default=0, metadata={"help": "save a resumable checkpoint every this many steps (0 "
                                                               "= never)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many of the newest checkpoints to keep"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest complete checkpoint in "
                                                          "output_dir/checkpoints"})
    device: str = field(default="auto", metadata={"help": "torch device: auto (cuda if available, else cpu), cpu, "
                                                          "cuda, cuda:1, ..."})
    bf16: bool = field(default=False, metadata={"help": "autocast the forward passes to bfloat16 (weights and "
                                                        "optimizer stay float32); on a CPU with bf16 instructions "
                                                        "faster on long sequences, slower on short ones; on a CPU "
                                                        "without them emulated and about 15x slower, with a warning "
                                                        "(README, Performance)"})
    torch_threads: int | None = field(default=None, metadata={"help": "torch intra-op threads; None = torch's default"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code shipped inside model_path"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    report_to: list[str] = field(default_factory=lambda: ["none"], metadata={"help": REPORT_TO_HELP, "nargs": "+"})
    lora_r: int = field(default=0, metadata={"help": LORA_HELP["lora_r"]})
    lora_alpha: float = field(default=16.0, metadata={"help": LORA_HELP["lora_alpha"]})
    lora_dropout: float = field(default=0.0, metadata={"help": LORA_HELP["lora_dropout"]})
    lora_target_modules: str | None = field(default=None, metadata={"help": LORA_HELP["lora_target_modules"]})

    def __post_init__(self) -> None:
        check_config_fields(self)
        name = type(self).__name__
        self.report_to = parse_report_to(self.report_to, name)
        check_lora_fields(self, name)
        if not self.data_path:
            raise ValueError(f"{name}.data_path is empty: give the path of a JSONL file")
        for key in ("num_epochs", "batch_size", "max_length", "log_every", "keep_checkpoints"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}.{key} must be a positive integer, got {value!r}")
        for key in ("eval_every", "checkpoint_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}.{key} must be an integer >= 0 (0 turns it off), got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"{name}.max_steps must be a positive integer or None, got {self.max_steps!r}")
        if self.max_length < 2:
            raise ValueError(f"{name}.max_length must be >= 2 (a prompt token and a response token), got "
                             f"{self.max_length}")
        if not self.learning_rate > 0:
            raise ValueError(f"{name}.learning_rate must be > 0, got {self.learning_rate!r}")
        if self.weight_decay < 0:
            raise ValueError(f"{name}.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"{name}.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"{name}.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"{name}.max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"{name}.eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"{name}.torch_threads must be >= 1 or None, got {self.torch_threads!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as err:
                raise ValueError(f"{name}.device {self.device!r} is not a torch device: use auto, cpu or "
                                 "cuda[:N]") from err


@dataclass
class TrainResult:
    """What a trainer returns: where the model is, how far it got, how fast, and the last metrics."""

    output_dir: str
    global_step: int
    samples_seen: int
    train_seconds: float
    samples_per_second: float
    metrics: dict[str, float] = field(default_factory=dict)


def set_seed(seed: int) -> None:
    """Seed python ``random``, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


ONEDNN_CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def cpu_has_bf16() -> bool | None:
    """Whether this CPU has bfloat16 instructions (AVX512_BF16 or AMX); None where torch cannot tell."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(check is None for check in checks):
        return None
    return any(check() for check in checks)


def start_run(config: LMTrainConfig) -> torch.device:
    """What every trainer does first: torch threads, seeds, and the device to train on.

    With ``bf16`` on CPU, the bfloat16 matrix products go through oneDNN, which by default keeps
    up to 1024 compiled primitives (with their buffers), one per shape. Packed batches change shape
    every step, so that cache only grows (the long-pair DPO benchmark in bf16 peaked at about
    1,550 MiB with it and 1,130 without, at the same speed). So, unless ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``
    is already set, it is set to 0 here (oneDNN reads it when it first builds a primitive, so this
    takes effect only if nothing in the process used oneDNN before).

    ``bf16`` on a CPU without bfloat16 instructions is allowed, with a warning: its bfloat16 matrix
    products are emulated, and our DPO trained 15x slower in bf16 than in float32 on such a CPU
    (``python -m benchmarks.bench_breakdown``, 2026-12-01: 16.7 against 244 pairs/s).
    """
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    set_seed(config.seed)
    device = resolve_device(config.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = join_process_group(device)
    if config.bf16 and device.type == "cpu":
        os.environ.setdefault(ONEDNN_CACHE_VARIABLE, "0")
        if cpu_has_bf16() is False:
            warnings.warn(
                "bf16=True on a CPU without bfloat16 instructions (AVX512_BF16 or AMX): its bf16 matrix "
                "products "
                "are emulated and training runs many times slower than in float32 (15x for DPO in "
                "benchmarks/bench_breakdown.py on such a CPU); leave bf16 off on this machine",
                stacklevel=2,
            )
    return device


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_dir(model_path: str | None) -> Path:
    """``model_path``'s directory: the embedded default when it is None, a shipped model's for its name."""
    from rlhf_envs.lm.loading import resolve_model_path

    return resolve_model_path(model_path)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability in ``model`` to 0 (deterministic scores and log-probs)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def fuse_gelu(model: nn.Module) -> int:
    """Swap transformers' Python tanh-GELU modules for torch's fused ``nn.GELU(approximate="tanh")``.

    ``NewGELUActivation`` (GPT-2's ``gelu_new``) and ``FastGELUActivation`` compute the same
    function in five element-wise ops that each keep an activation for the backward pass; the
    fused op is one kernel and equal to float rounding (about 1e-7). Weights and the saved config
    are untouched. Returns how many modules were swapped.
    """
    from transformers.activations import FastGELUActivation, NewGELUActivation

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(parent, name, nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped


def make_optimizer(model: nn.Module, config: LMTrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, norms or 1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The fused kernel (CUDA, and CPU since torch 2.4) updates every tensor in one call: 3x faster than
    # the per-tensor loop on the embedded model's 52 tensors.
    fused = device.type == "cuda" or (device.type == "cpu" and CPU_FUSED_ADAM)
    return torch.optim.AdamW(groups, lr=config.learning_rate, fused=fused)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: LMTrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_ratio * total_steps`` steps, then ``lr_schedule`` decay."""
    warmup = int(config.warmup_ratio * total_steps)
    schedule = config.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def held_out_split(
    n: int,
    eval_fraction: float,
    seed: int,
    groups: Sequence[Hashable] | None = None,
) -> tuple[list[int], list[int]]:
    """Seeded ``(train_indices, eval_indices)``; at least one eval example when eval_fraction > 0.

    With ``groups`` (one key per example, e.g. its prompt) whole groups are held out, in a seeded
    order, until ``eval_fraction`` of the examples are: no held-out example shares its group with a
    training one, so a held-out score measures new prompts, not new answers to seen ones. When every
    key is distinct this is the same split as without ``groups``.
    """
    n_eval = max(1, round(eval_fraction * n)) if eval_fraction > 0 else 0
    labels = list(range(n)) if groups is None else list(groups)
    if len(labels) != n:
        raise ValueError(f"held_out_split: {len(labels)} group keys for {n} examples")
    members: dict[Hashable, list[int]] = {}
    for i, key in enumerate(labels):
        members.setdefault(key, []).append(i)
    keys = list(members)
    held: list[int] = []
    for g in torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist():
        if len(held) >= n_eval:
            break
        held += members[keys[g]]
    if n - len(held) < 1:
        raise ValueError(
            f"{n} examples leave none for training after holding out {len(held)}"
            f"{'' if groups is None else f' (whole groups of {len(keys)})'}: add data or lower "
            "eval_fraction"
        )
    chosen = set(held)
    return [i for i in range(n) if i not in chosen], sorted(held)


class MetricsWriter:
    """Appends one JSON object per line to ``path``; on resume it drops lines past the resumed step.

    With ``report_to`` (tracker names, :mod:`agents.trackers`) every line also goes to those trackers,
    under the same names, for the run in ``path``'s folder; ``run_config`` is the run's settings they record.
    """

    def __init__(
        self,
        path: Path,
        resume_step: int | None = None,
        report_to: Sequence[str] = (),
        run_config: dict[str, Any] | None = None,
    ):
        from agents.trackers import open_trackers

        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line and json.loads(line).get("step", 0) <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        self._trackers = open_trackers(list(report_to), path.parent, run_config)
        self._file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        from agents.trackers import scalars

        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step, values = scalars(record)
        for tracker in self._trackers:
            tracker.log(values, step)

    def close(self) -> None:
        self._file.close()
        for tracker in self._trackers:
            tracker.close()


_RESUME_KEYS = ("seed", "batch_size", "num_epochs", "max_steps", "max_length", "eval_fraction")

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def run_training(
    config: LMTrainConfig,
    *,
    algorithm: str,
    model: nn.Module,
    tokenizer: Any,
    num_train: int,
    collate: Callable[[list[int]], Any],
    loss_fn: LossFn,
    evaluate: Callable[[nn.Module], dict[str, float]] | None,
    device: torch.device,
    extra_seconds: float = 0.0,
    example_weights: Sequence[float] | None = None,
) -> TrainResult:
    """Train ``model`` on ``num_train`` examples and save it to ``config.output_dir``.

    ``collate(indices)`` builds a device batch from training-example indices; ``loss_fn(model,
    batch)`` returns the scalar loss and detached metric tensors; ``evaluate(model)`` returns
    held-out metrics (logged with an ``eval/`` prefix). ``extra_seconds`` (e.g. DPO's reference
    pass) is added to the training time used for ``samples_per_second``.

    In a data-parallel run (see the module's docstring) ``collate`` gets this process's share of
    each batch (:func:`shard`; ``example_weights``, one per training example, when ``loss_fn``'s
    loss is not a mean over examples), ``loss_fn`` runs under DDP, the logged training metrics are the
    batch's over every process, and ``evaluate`` runs on rank 0 alone.
    """
    rank, world = distributed()
    main = rank == 0
    output_dir = Path(config.output_dir)
    checkpoint_root = output_dir / "checkpoints"
    steps_per_epoch, total_steps, num_epochs = _schedule_lengths(config, num_train)

    model.to(device)
    model.train()
    optimizer = make_optimizer(model, config, device)
    scheduler = make_scheduler(optimizer, config, total_steps)
    resume_from = latest_checkpoint(checkpoint_root) if config.resume else None
    state = _resume(resume_from, config, algorithm, num_train, model, optimizer, scheduler)
    step_loss = (
        DistributedDataParallel(
            LossModule(model, loss_fn), device_ids=[device.index] if device.type == "cuda" else None
        )
        if world > 1
        else functools.partial(loss_fn, model)
    )
    writer = (
        MetricsWriter(
            output_dir / "metrics.jsonl",
            resume_step=state["global_step"] if resume_from else None,
            report_to=config.report_to,
            run_config=asdict(config),
        )
        if main
        else None
    )
    log = writer.write if writer is not None else (lambda record: None)
    step, samples = state["global_step"], state["samples_seen"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)
    pending: list[dict[str, torch.Tensor]] = []
    last: dict[str, float] = {}
    bar = tqdm(total=total_steps, initial=step, desc=algorithm, disable=not (config.progress and main))
    start = time.perf_counter()
    for epoch in range(step // steps_per_epoch, num_epochs):
        order = torch.randperm(num_train, generator=torch.Generator().manual_seed(config.seed + epoch)).tolist()
        batches = [order[i : i + config.batch_size] for i in range(0, num_train, config.batch_size)]
        for indices in batches[step - epoch * steps_per_epoch :]:
            if step >= total_steps:
                break
            mine, scale = shard(indices, rank, world, example_weights)
            batch = collate(mine)
            with autocast:
                loss, metrics = step_loss(batch)
            (loss * scale if scale != 1.0 else loss).backward()
            if config.max_grad_norm is not None:
                metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), config.max_grad_norm, foreach=True
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            metrics["loss"] = loss.detach()
            # scaled like the loss, so that the mean over processes is the mean over the whole batch
            pending.append({k: v * scale for k, v in metrics.items()} if scale != 1.0 else metrics)
            step += 1
            samples += len(indices)
            bar.update(1)
            if step % config.log_every == 0 or step == total_steps:
                last = _mean_metrics(pending, world)
                pending.clear()
                log({"step": step, "epoch": round(step / steps_per_epoch, 4), "lr": scheduler.get_last_lr()[0], **last})
                bar.set_postfix(loss=f"{last['loss']:.4f}")
            if (
                main
                and evaluate is not None
                and config.eval_every
                and step % config.eval_every == 0
                and step != total_steps
            ):
                log({"step": step, **{f"eval/{k}": v for k, v in _evaluate(model, evaluate, autocast).items()}})
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                _save_checkpoint(
                    checkpoint_root,
                    config,
                    model,
                    optimizer,
                    scheduler,
                    main,
                    world,
                    {
                        "algorithm": algorithm,
                        "global_step": step,
                        "samples_seen": samples,
                        "num_train": num_train,
                        "config": asdict(config),
                    },
                )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start + extra_seconds
    bar.close()
    new_samples = samples - state["samples_seen"]
    speed = new_samples / seconds if seconds > 0 else 0.0
    if main:
        if evaluate is not None:
            last.update({f"eval/{k}": v for k, v in _evaluate(model, evaluate, autocast).items()})
            log({"step": step, **{k: v for k, v in last.items() if k.startswith("eval/")}})
        _save_final(
            output_dir,
            model,
            tokenizer,
            writer,
            {"step": step, "train_seconds": seconds, "samples_per_second": speed, "processes": world},
        )
    if world > 1:
        dist.barrier()
    return TrainResult(str(output_dir), step, samples, seconds, speed, last)


def _schedule_lengths(config: LMTrainConfig, num_train: int) -> tuple[int, int, int]:
    """``(steps_per_epoch, total_steps, num_epochs)``: ``max_steps`` when set, else ``num_epochs`` epochs."""
    steps_per_epoch = math.ceil(num_train / config.batch_size)
    total_steps = config.num_epochs * steps_per_epoch if config.max_steps is None else config.max_steps
    return steps_per_epoch, total_steps, math.ceil(total_steps / steps_per_epoch)


def _resume(
    resume_from: Path | None,
    config: LMTrainConfig,
    algorithm: str,
    num_train: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """The training state to start from: a fresh one, or ``resume_from``'s after checking it is this run's."""
    if resume_from is None:
        return {"global_step": 0, "samples_seen": 0, "num_train": num_train}
    state = load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler)
    if state.get("algorithm") != algorithm or state.get("num_train") != num_train:
        raise ValueError(
            f"checkpoint {resume_from} is from {state.get('algorithm')!r} on {state.get('num_train')} examples, "
            f"this run is {algorithm!r} on {num_train}: resume with the same data and algorithm, or set resume=False"
        )
    changed = {
        k: (state["config"][k], getattr(config, k))
        for k in _RESUME_KEYS
        if state["config"].get(k) != getattr(config, k)
    }
    if changed:
        settings = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
        raise ValueError(
            f"checkpoint {resume_from} was written with other settings ({settings}): "
            "resume with the same values, or set resume=False to start over"
        )
    return state


def _save_checkpoint(
    root: Path,
    config: LMTrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    main: bool,
    world: int,
    meta: dict[str, Any],
) -> None:
    """Rank 0 writes ``checkpoint-<step>`` and prunes to ``keep_checkpoints``; every process waits for it."""
    if main:
        save_checkpoint(
            root / f"checkpoint-{meta['global_step']:08d}",
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            state=meta,
        )
        prune_checkpoints(root, keep=config.keep_checkpoints)
    if world > 1:
        dist.barrier()


def _save_final(output_dir: Path, model: nn.Module, tokenizer: Any, writer: MetricsWriter, timing: dict) -> None:
    """Close the metrics, write ``timing.json`` and the trained model into ``output_dir``."""
    # Wall-clock figures go beside the metrics, so that metrics.jsonl is identical across runs with one seed.
    (output_dir / "timing.json").write_text(json.dumps(timing) + "\n")
    writer.close()
    save_model_dir(output_dir, model=model, tokenizer=tokenizer, into_existing=True)


def _mean_metrics(pending: list[dict[str, torch.Tensor]], world: int) -> dict[str, float]:
    """The mean of each metric over the steps in ``pending`` and, in a data-parallel run, over the processes."""
    keys = list(pending[0])
    means = torch.stack([torch.stack([m[k].float() for m in pending]).mean() for k in keys])
    if world > 1:
        dist.all_reduce(means)
        means /= world
    return dict(zip(keys, means.tolist()))


def _evaluate(
    model: nn.Module, evaluate: Callable[[nn.Module], dict[str, float]], autocast: torch.autocast
) -> dict[str, float]:
    model.eval()
    try:
        with torch.inference_mode(), autocast:
            return evaluate(model)
    finally:
        model.train()
