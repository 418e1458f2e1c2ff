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

from agents.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint

LR_SCHEDULES = ("linear", "cosine", "constant")
CPU_FUSED_ADAM = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4)


@dataclass
class LMTrainConfig:
    """Fields every LM trainer (SFT, reward model, DPO) shares; each algorithm's config adds its own."""

    model_path: str | None = field(default=None, metadata={"help": "local Hugging Face causal-LM directory; None = the embedded default model"})
    data_path: str = field(default="", metadata={"help": "JSONL training data (the format depends on the algorithm)"})
    output_dir: str = field(default="runs/out", metadata={"help": "the final model (a Hugging Face directory), metrics.jsonl and checkpoints/ go here"})
    seed: int = field(default=0, metadata={"help": "seed of torch, numpy, random, the data order and the held-out split"})
    num_epochs: int = field(default=1, metadata={"help": "passes over the training data"})
    max_steps: int | None = field(default=None, metadata={"help": "total optimizer steps (the LR schedule is sized to it; overrides num_epochs); None = num_epochs full passes"})
    batch_size: int = field(default=32, metadata={"help": "examples per optimizer step"})
    max_length: int = field(default=128, metadata={"help": "longest tokenised sequence (prompt + response); longer ones are truncated, see agents.data"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not applied to biases and norms)"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of the steps with a linear LR warm-up from 0"})
    lr_schedule: str = field(default="linear", metadata={"help": "LR decay after warm-up: linear (to 0), cosine (to 0) or constant"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "clip the global gradient norm to this; None = no clipping"})
    eval_fraction: float = field(default=0.05, metadata={"help": "fraction of the data held out for evaluation (0 = none)"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every this many steps (0 = only at the end)"})
    log_every: int = field(default=10, metadata={"help": "write a metrics line every this many steps"})
    checkpoint_every: int = field(default=0, metadata={"help": "save a resumable checkpoint every this many steps (0 = never)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many of the newest checkpoints to keep"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest complete checkpoint in output_dir/checkpoints"})
    device: str = field(default="auto", metadata={"help": "torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."})
    bf16: bool = field(default=False, metadata={"help": "autocast the forward passes to bfloat16 (weights and optimizer stay float32); on a CPU with bf16 instructions faster on long sequences, slower on short ones; on a CPU without them emulated and about 15x slower, with a warning (README, Performance)"})
    torch_threads: int | None = field(default=None, metadata={"help": "torch intra-op threads; None = torch's default"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code shipped inside model_path"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        name = type(self).__name__
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
            raise ValueError(f"{name}.max_length must be >= 2 (a prompt token and a response token), got {self.max_length}")
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
                raise ValueError(f"{name}.device {self.device!r} is not a torch device: use auto, cpu or cuda[:N]") from err


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
            warnings.warn("bf16=True on a CPU without bfloat16 instructions (AVX512_BF16 or AMX): its bf16 matrix products "
                          "are emulated and training runs many times slower than in float32 (15x for DPO in "
                          "benchmarks/bench_breakdown.py on such a CPU); leave bf16 off on this machine", stacklevel=2)
    return device


def join_process_group(device: torch.device) -> torch.device:
    """Join the process group of a ``torchrun`` / ``accelerate launch`` run (``WORLD_SIZE`` > 1) and
    return this process's device: ``cuda:LOCAL_RANK`` on GPUs (NCCL), the CPU otherwise (gloo).

    Every process must run the same command: the same seed gives them the same model, data order and
    held-out split, and :func:`run_training` deals each step's batch out among them.
    """
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def distributed() -> tuple[int, int]:
    """``(rank, world size)`` of this process's data-parallel group; ``(0, 1)`` when it trains alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on the process that logs, evaluates and writes files (rank 0, or the only one)."""
    return distributed()[0] == 0


def refuse_distributed(what: str) -> None:
    """Raise if launched as several processes: ``what`` does not split its work among them yet."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"{what} does not run data parallel yet (WORLD_SIZE={os.environ['WORLD_SIZE']}): "
                         "launch it as one process; `rlhf sft`, `rlhf rm`, `rlhf dpo` and `rlhf ppo` run under torchrun")


def shard(indices: list[int], rank: int, world: int, weights: Sequence[float] | None = None) -> tuple[list[int], float]:
    """This process's share of one step's batch ``indices``, and the factor its mean loss is scaled by.

    The examples are dealt out round-robin. DDP averages the processes' gradients, so a process
    whose share holds ``n`` of the batch's ``N`` examples scales its (per-example mean) loss by
    ``n * world / N``: the averaged gradient is then exactly that of the mean over all ``N``. A loss
    that is a mean over something else (SFT's, over target tokens) gives each example its
    ``weights[i]`` (its number of targets) and the share is weighed by those. A batch with fewer
    examples than processes goes whole to every process (factor 1), so none idles without a loss
    to back-propagate.
    """
    if world == 1 or len(indices) < world:
        return indices, 1.0
    mine = indices[rank::world]
    if weights is None:
        return mine, len(mine) * world / len(indices)
    total = sum(weights[i] for i in indices)
    return mine, sum(weights[i] for i in mine) * world / total if total else 1.0


class LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module's forward, so that DDP sees the pass it synchronises."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.loss_fn(self.model, batch)


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


def pad(seqs: list[torch.Tensor], value: int, side: str = "right") -> torch.Tensor:
    """Stack 1-D tensors into ``[B, max_len]``, padded with ``value`` on ``side``."""
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value, padding_side=side)


def split_lm_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(body, head)`` when ``model(x).logits == head(body(x).last_hidden_state)`` for this model.

    Training losses only need logits at response positions; applying the LM head (``[H, V]``, most
    of a small model's FLOPs) to those positions only is the main speed-up of these trainers. The
    split is verified once on a short input, so models with logit soft-capping or scaling (where
    it would be wrong) get None and the callers fall back to full logits.
    """
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or body is model or not isinstance(head, nn.Module):
        return None
    device = next(model.parameters()).device
    ids = torch.arange(min(8, model.config.vocab_size), device=device).unsqueeze(0)
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            split = head(body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state)
    except (TypeError, AttributeError, RuntimeError):
        return None
    finally:
        model.train(was_training)
    return (body, head) if split.shape == full.shape and torch.allclose(split, full, atol=1e-5, rtol=1e-4) else None


def target_logits(
    model: nn.Module,
    split: tuple[nn.Module, nn.Module] | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits that predict the target tokens of a right-padded batch.

    Args:
        input_ids, attention_mask: ``[B, L]``, right-padded.
        target_mask: ``[B, L]`` bool, True at each token that is a target (predicted from the
            position before it; column 0 is never a target).
        split: from :func:`split_lm_head`; None computes the full logits.

    Returns:
        ``logits [N, V]``, ``targets [N]`` token ids and ``rows [N]`` (the batch row of each), for
        the ``N = target_mask.sum()`` targets in row-major order.
    """
    select = target_mask[:, 1:]
    if split is None:
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logits = hidden[:, :-1][select]
    else:
        body, head = split
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][select])
    targets = input_ids[:, 1:][select]
    rows = select.nonzero()[:, 0]
    return logits.float(), targets, rows


def response_target_mask(lengths: torch.Tensor, prompt_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width]`` bool: True at positions ``max(prompt_len, 1) <= j < length`` (the response tokens)."""
    positions = torch.arange(width, device=lengths.device)
    start = prompt_lengths.clamp(min=1).unsqueeze(1)
    return (positions >= start) & (positions < lengths.unsqueeze(1))


def batch_sequences(
    seqs: list[torch.Tensor], prompt_lengths: torch.Tensor, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``B`` prompt+response sequences to the longest; move them to ``device``.

    Returns ``input_ids [B, L]``, ``attention_mask [B, L]`` and ``target_mask [B, L]`` (True on
    response tokens, see :func:`response_target_mask`).
    """
    lengths = torch.tensor([len(s) for s in seqs])
    input_ids = pad(seqs, pad_id)
    width = input_ids.shape[1]
    attention_mask = (torch.arange(width) < lengths.unsqueeze(1)).long()
    target_mask = response_target_mask(lengths, prompt_lengths, width)
    return input_ids.to(device, non_blocking=True), attention_mask.to(device, non_blocking=True), target_mask.to(device, non_blocking=True)


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


def make_scheduler(optimizer: torch.optim.Optimizer, config: LMTrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
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


def held_out_split(n: int, eval_fraction: float, seed: int, groups: Sequence[Hashable] | None = None,
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
        raise ValueError(f"{n} examples leave none for training after holding out {len(held)}"
                         f"{'' if groups is None else f' (whole groups of {len(keys)})'}: add data or lower eval_fraction")
    chosen = set(held)
    return [i for i in range(n) if i not in chosen], sorted(held)


class MetricsWriter:
    """Appends one JSON object per line to ``path``; on resume it drops lines past the resumed step."""

    def __init__(self, path: Path, resume_step: int | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


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
    steps_per_epoch = math.ceil(num_train / config.batch_size)
    total_steps = config.num_epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = config.max_steps
    num_epochs = math.ceil(total_steps / steps_per_epoch)

    model.to(device)
    model.train()
    optimizer = make_optimizer(model, config, device)
    scheduler = make_scheduler(optimizer, config, total_steps)
    state = {"global_step": 0, "samples_seen": 0, "num_train": num_train}
    resume_from = latest_checkpoint(checkpoint_root) if config.resume else None
    if resume_from is not None:
        state = load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler)
        if state.get("algorithm") != algorithm or state.get("num_train") != num_train:
            raise ValueError(
                f"checkpoint {resume_from} is from {state.get('algorithm')!r} on {state.get('num_train')} examples, this run is "
                f"{algorithm!r} on {num_train}: resume with the same data and algorithm, or set resume=False")
        changed = {k: (state["config"][k], getattr(config, k)) for k in _RESUME_KEYS if state["config"].get(k) != getattr(config, k)}
        if changed:
            raise ValueError(
                f"checkpoint {resume_from} was written with other settings ({', '.join(f'{k}: {a!r} then, {b!r} now' for k, (a, b) in changed.items())}): "
                "resume with the same values, or set resume=False to start over")
    step_loss = DistributedDataParallel(LossModule(model, loss_fn), device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else functools.partial(loss_fn, model)
    writer = MetricsWriter(output_dir / "metrics.jsonl", resume_step=state["global_step"] if resume_from else None) if main else None
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
                metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm, foreach=True)
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
            if main and evaluate is not None and config.eval_every and step % config.eval_every == 0 and step != total_steps:
                log({"step": step, **{f"eval/{k}": v for k, v in _evaluate(model, evaluate, autocast).items()}})
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                meta = {"algorithm": algorithm, "global_step": step, "samples_seen": samples, "num_train": num_train, "config": asdict(config)}
                if main:
                    save_checkpoint(checkpoint_root / f"checkpoint-{step:08d}", model=model, optimizer=optimizer, scheduler=scheduler, state=meta)
                    prune_checkpoints(checkpoint_root, keep=config.keep_checkpoints)
                if world > 1:
                    dist.barrier()
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
        # Wall-clock figures go beside the metrics, so that metrics.jsonl is identical across runs with one seed.
        (output_dir / "timing.json").write_text(json.dumps({"step": step, "train_seconds": seconds, "samples_per_second": speed,
                                                            "processes": world}) + "\n")
        writer.close()
        save_pretrained_model(output_dir, model, tokenizer)
    if world > 1:
        dist.barrier()
    return TrainResult(str(output_dir), step, samples, seconds, speed, last)


def _mean_metrics(pending: list[dict[str, torch.Tensor]], world: int) -> dict[str, float]:
    """The mean of each metric over the steps in ``pending`` and, in a data-parallel run, over the processes."""
    keys = list(pending[0])
    means = torch.stack([torch.stack([m[k].float() for m in pending]).mean() for k in keys])
    if world > 1:
        dist.all_reduce(means)
        means /= world
    return dict(zip(keys, means.tolist()))


def _evaluate(model: nn.Module, evaluate: Callable[[nn.Module], dict[str, float]], autocast: torch.autocast) -> dict[str, float]:
    model.eval()
    try:
        with torch.inference_mode(), autocast:
            return evaluate(model)
    finally:
        model.train()


def save_pretrained_model(output_dir: Path, model: nn.Module, tokenizer: Any) -> None:
    """Save ``model`` and ``tokenizer`` as a Hugging Face directory loadable offline.

    Weights are written as safetensors (the only format of transformers 5, the default since 4.35).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config") and hasattr(model, "merge_and_unload"):
        # LoRA: the adapters alone go to adapter/ (peft's format); the model saved beside them has
        # them merged in, so every loader here reads it like any other Hugging Face directory.
        model.save_pretrained(output_dir / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
