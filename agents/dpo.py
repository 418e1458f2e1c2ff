"""Direct Preference Optimization (DPO) and its IPO and conservative (cDPO) variants.

With ``h = (log pi(y_w|x) - log pi(y_l|x)) - (log pi_ref(y_w|x) - log pi_ref(y_l|x))`` (sequence
log-probs summed over response tokens, EOS included), the per-pair losses are

- ``sigmoid`` (DPO, Rafailov et al. 2023): ``-log sigmoid(beta * h)``
- ``cdpo`` (conservative DPO: labels flipped with probability ``label_smoothing``):
  ``-(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h)``
- ``ipo`` (Azar et al. 2023, with summed log-probs as in the paper): ``(h - 1 / (2 beta))^2``

chosen from :data:`DPO_LOSSES`. The reference model's log-probs are computed once, before
training, in one no-grad pass over the data and cached; by default the reference is the initial
policy itself, so no second model is held in memory (a separate ``ref_model_path`` is loaded for
that pass and freed). Chosen and rejected responses go through the policy in one concatenated
forward, and the LM head is applied only at response positions. Logged names follow TRL:
``rewards/chosen``, ``rewards/rejected`` (``beta`` times the policy-reference log-ratio),
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``loss``.
Data: JSONL lines ``{"prompt", "chosen", "rejected"}``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from agents.data import prompt_key, read_preferences, tokenize_pairs
from agents.distributed import distributed
from agents.lm_common import (
    LMTrainConfig,
    TrainResult,
    disable_dropout,
    fuse_gelu,
    held_out_split,
    run_training,
    start_run,
)
from agents.lora import add_lora
from rlhf_envs.lm.loading import load_causal_lm
from rlhf_envs.lm.packing import PackedBatch, pack_sequences
from rlhf_envs.lm.padded import batch_sequences, split_lm_head, target_logits
from rlhf_envs.lm.views import packed_view


def sigmoid_loss(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO: ``-log sigmoid(beta * logits)`` per pair (``label_smoothing`` must be 0)."""
    return -F.logsigmoid(beta * logits)


def cdpo_loss(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Conservative DPO: the DPO loss with preference labels flipped with probability ``label_smoothing``."""
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)


def ipo_loss(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """IPO: ``(logits - 1 / (2 beta))^2`` per pair (``label_smoothing`` must be 0)."""
    return (logits - 1.0 / (2.0 * beta)) ** 2


DPO_LOSSES: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": sigmoid_loss,
    "cdpo": cdpo_loss,
    "ipo": ipo_loss,
}


@dataclass
class DPOConfig(LMTrainConfig):
    """Hyper-parameters of :func:`train_dpo`; shared fields are documented on :class:`LMTrainConfig`."""

    output_dir: str = field(default="runs/dpo", metadata={"help": "the tuned policy (a Hugging Face directory), "
                                                                  "metrics.jsonl and checkpoints/ go here"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak AdamW learning rate"})
    batch_size: int = field(default=32, metadata={"help": "preference pairs per optimizer step"})
    beta: float = field(default=0.1, metadata={"help": "strength of the implicit KL penalty to the reference (DPO's "
                                                       "beta)"})
    loss_type: str = field(default="sigmoid", metadata={"help": f"one of {sorted(DPO_LOSSES)}: sigmoid = DPO, cdpo = "
                                                                "conservative DPO, ipo = IPO"})
    label_smoothing: float = field(default=0.0, metadata={"help": "cdpo's epsilon: assumed probability that a "
                                                                  "preference label is flipped, in (0, 0.5)"})
    ref_model_path: str | None = field(default=None, metadata={"help": "reference model directory; None = the initial "
                                                                       "policy (model_path)"})
    disable_dropout: bool = field(default=True, metadata={"help": "turn dropout off, so policy and reference "
                                                                  "log-probs are comparable"})
    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in DPO_LOSSES:
            raise ValueError(f"DPOConfig.loss_type must be one of {sorted(DPO_LOSSES)}, got {self.loss_type!r}")
        if not self.beta > 0:
            raise ValueError(f"DPOConfig.beta must be > 0, got {self.beta!r}")
        if self.loss_type == "cdpo" and not 0.0 < self.label_smoothing < 0.5:
            raise ValueError("DPOConfig.label_smoothing must be in (0, 0.5) for loss_type='cdpo', got "
                             f"{self.label_smoothing!r}")
        if self.lora_r and self.ref_model_path is not None:
            raise ValueError("DPOConfig.lora_r > 0 uses the policy with its adapters off as the reference; "
                             "leave ref_model_path unset (None)")
        if self.loss_type != "cdpo" and self.label_smoothing != 0.0:
            raise ValueError(
                f"DPOConfig.label_smoothing={self.label_smoothing!r} only applies to conservative DPO: "
                f"set loss_type='cdpo' or label_smoothing=0")


def sequence_logps(
    model: torch.nn.Module,
    split: tuple[torch.nn.Module, torch.nn.Module] | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
) -> torch.Tensor:
    """``[B]`` float32: the summed log-prob (nats) of each row's response tokens (see
    :func:`agents.lm_common.target_logits`)."""
    logits, targets, rows = target_logits(model, split, input_ids, attention_mask, target_mask)
    token_logps = -F.cross_entropy(logits, targets, reduction="none")
    return torch.zeros(input_ids.shape[0], device=token_logps.device).index_add_(0, rows, token_logps)


def dpo_metrics(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    beta: float
) -> dict[str, torch.Tensor]:
    """TRL's logged quantities for ``[B]`` sequence log-probs (detached means)."""
    chosen = beta * (policy_chosen - ref_chosen).detach()
    rejected = beta * (policy_rejected - ref_rejected).detach()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }


def _collate(data: Any, indices: list[int], packed: bool, pad_id: int, device: torch.device) -> tuple:
    """The pairs of ``indices``: packed as a prefix tree (each distinct prefix once: a prompt shared by
    several pairs runs once for all of them), or right-padded with every chosen sequence before
    every rejected one."""
    if packed:
        rows = [2 * i + k for i in indices for k in (0, 1)]
        # a response's last token predicts nothing: it leaves the forward
        batch = pack_sequences([data.input_ids[r] for r in rows], drop_last=True)
        targets = batch.distinct_targets(data.prompt_lengths[rows].tolist())
        return (batch.to(device), *(t.to(device, non_blocking=True) for t in targets))
    rows = [2 * i for i in indices] + [2 * i + 1 for i in indices]
    return batch_sequences([data.input_ids[r] for r in rows], data.prompt_lengths[rows], pad_id, device)


def _logps(model: torch.nn.Module, split: tuple | None, batch: tuple) -> torch.Tensor:
    """``[2B]`` summed response log-probs: every chosen response, then every rejected one."""
    if isinstance(batch[0], PackedBatch):
        packed, *targets = batch
        return packed.sequence_logps(packed_view(model), *targets).view(-1, 2).T.reshape(-1)
    return sequence_logps(model, split, *batch)


def _reference_order(data: Any, n: int, packed: bool) -> list[int]:
    """The order the reference pass takes the ``n`` pairs in (any order gives the same log-probs).

    Pairs sorted by their longer sequence: each batch is padded to nearly its own length (36% less
    time in this pass on the corpus pairs of benchmarks/bench_trainers.py, before the packed path).
    Packed, pairs of one prompt come together (prompts ordered by their longest pair), so that the
    prompt runs once for all of them (the prefix tree of rlhf_envs.lm.packing).
    """
    prompt_of = [tuple(data.input_ids[2 * i][: int(data.prompt_lengths[2 * i])].tolist()) for i in range(n)]
    longest = [max(len(data.input_ids[2 * i]), len(data.input_ids[2 * i + 1])) for i in range(n)]
    order = sorted(range(n), key=longest.__getitem__)
    if packed:
        by_prompt: dict[tuple, list[int]] = {}
        for i in order:
            by_prompt.setdefault(prompt_of[i], []).append(i)
        order = [i for group in sorted(by_prompt.values(), key=lambda g: longest[g[-1]]) for i in group]
    return order


def _reference_logps(config: DPOConfig, model: torch.nn.Module, data: Any, n: int, pad_id: int,
                     device: torch.device, autocast: torch.autocast) -> torch.Tensor:
    """``[n, 2]`` the reference's summed (chosen, rejected) response log-probs, computed once before training.

    The reference is ``model`` itself (with its LoRA adapters off) or ``config.ref_model_path``.
    """
    adapters_off = model.disable_adapter() if config.lora_r else contextlib.nullcontext()
    if config.ref_model_path is None:
        reference = model
    else:
        reference = load_causal_lm(config.ref_model_path, trust_remote_code=config.trust_remote_code)[0].to(device)
        fuse_gelu(reference)
    reference.eval()
    # GPT-2 and Llama-family models without active dropout take a packed forward (rlhf_envs.lm.views);
    # others Hugging Face's.
    packed = packed_view(reference) is not None
    split = None if packed else split_lm_head(reference)
    ref_logps = torch.zeros(n, 2, device=device)
    order = _reference_order(data, n, packed)
    # Data parallel: each process runs every world-th batch of this pass, and a sum over the processes
    # (zeros elsewhere) gives each of them the whole table.
    rank, world = distributed()
    with torch.inference_mode(), autocast, adapters_off:
        for first in range(rank * 2 * config.batch_size, n, world * 2 * config.batch_size):
            indices = order[first : first + 2 * config.batch_size]
            logps = _logps(reference, split, _collate(data, indices, packed, pad_id, device))
            ref_logps[indices] = logps.view(2, -1).T
    if world > 1:
        dist.all_reduce(ref_logps)
    return ref_logps


def train_dpo(config: DPOConfig) -> TrainResult:
    """Tune ``config.model_path`` on the preference pairs in ``config.data_path``; saved in ``config.output_dir``."""
    device = start_run(config)
    records = read_preferences(config.data_path)
    model, tokenizer = load_causal_lm(config.model_path, trust_remote_code=config.trust_remote_code)
    fuse_gelu(model)
    if config.disable_dropout:
        disable_dropout(model)
    if config.lora_r:
        model = add_lora(model, config)
    model.to(device)
    data = tokenize_pairs(tokenizer, records, config.max_length)
    pad_id = tokenizer.pad_token_id
    loss_of = DPO_LOSSES[config.loss_type]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)

    start = time.perf_counter()
    ref_logps = _reference_logps(config, model, data, len(records), pad_id, device, autocast)
    ref_seconds = time.perf_counter() - start

    packed = packed_view(model.train()) is not None
    split = None if packed else split_lm_head(model)
    train_idx, eval_idx = held_out_split(len(records), config.eval_fraction, config.seed,
                                         groups=[prompt_key(r["prompt"]) for r in records])

    def loss_and_metrics(model: torch.nn.Module, indices: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps = _logps(model, split, _collate(data, indices, packed, pad_id, device))
        policy_chosen, policy_rejected = logps.chunk(2)
        ref = ref_logps[indices]
        logits = (policy_chosen - policy_rejected) - (ref[:, 0] - ref[:, 1])
        loss = loss_of(logits, config.beta, config.label_smoothing).mean()
        return loss, dpo_metrics(policy_chosen, policy_rejected, ref[:, 0], ref[:, 1], config.beta)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        sums: dict[str, float] = {}
        for first in range(0, len(eval_idx), config.batch_size):
            indices = eval_idx[first : first + config.batch_size]
            loss, metrics = loss_and_metrics(model, indices)
            for key, value in {"loss": loss, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(value) * len(indices)
        return {key: value / len(eval_idx) for key, value in sums.items()}

    result = run_training(
        config,
        algorithm="dpo_lora" if config.lora_r else "dpo",
        model=model,
        tokenizer=tokenizer,
        num_train=len(train_idx),
        collate=lambda indices: [train_idx[i] for i in indices],
        loss_fn=loss_and_metrics,
        evaluate=evaluate if eval_idx else None,
        device=device,
        extra_seconds=ref_seconds,
    )
    result.metrics["reference_seconds"] = ref_seconds
    return result
