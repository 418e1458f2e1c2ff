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
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from agents.data import read_preferences, tokenize_pairs
from rlhf_envs.lm.packing import PackedBatch, pack_sequences
from agents.lm_common import (
    LMTrainConfig,
    TrainResult,
    batch_sequences,
    disable_dropout,
    distributed,
    fuse_gelu,
    held_out_split,
    run_training,
    start_run,
    split_lm_head,
    target_logits,
)
from rlhf_envs.lm.loading import load_causal_lm
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

    output_dir: str = field(default="runs/dpo", metadata={"help": "the tuned policy (a Hugging Face directory), metrics.jsonl and checkpoints/ go here"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak AdamW learning rate"})
    batch_size: int = field(default=32, metadata={"help": "preference pairs per optimizer step"})
    beta: float = field(default=0.1, metadata={"help": "strength of the implicit KL penalty to the reference (DPO's beta)"})
    loss_type: str = field(default="sigmoid", metadata={"help": f"one of {sorted(DPO_LOSSES)}: sigmoid = DPO, cdpo = conservative DPO, ipo = IPO"})
    label_smoothing: float = field(default=0.0, metadata={"help": "cdpo's epsilon: assumed probability that a preference label is flipped, in (0, 0.5)"})
    ref_model_path: str | None = field(default=None, metadata={"help": "reference model directory; None = the initial policy (model_path)"})
    disable_dropout: bool = field(default=True, metadata={"help": "turn dropout off, so policy and reference log-probs are comparable"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (needs the peft package: pip install 'rlhf-gym[lora]'); 0 = full fine-tuning. With LoRA only the adapters train, the reference is the same weights with the adapters off, and the saved model has them merged in"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (the update is lora_alpha / lora_r * B A)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA adapters' input"})
    lora_target_modules: str | None = field(default=None, metadata={"help": "comma-separated module names to adapt (e.g. c_attn,c_proj); None = peft's default for the architecture"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in DPO_LOSSES:
            raise ValueError(f"DPOConfig.loss_type must be one of {sorted(DPO_LOSSES)}, got {self.loss_type!r}")
        if not self.beta > 0:
            raise ValueError(f"DPOConfig.beta must be > 0, got {self.beta!r}")
        if self.loss_type == "cdpo" and not 0.0 < self.label_smoothing < 0.5:
            raise ValueError(f"DPOConfig.label_smoothing must be in (0, 0.5) for loss_type='cdpo', got {self.label_smoothing!r}")
        if not isinstance(self.lora_r, int) or self.lora_r < 0:
            raise ValueError(f"DPOConfig.lora_r must be an integer >= 0 (0 = full fine-tuning), got {self.lora_r!r}")
        if self.lora_r and not self.lora_alpha > 0:
            raise ValueError(f"DPOConfig.lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"DPOConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
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
    """``[B]`` float32: the summed log-prob (nats) of each row's response tokens (see :func:`agents.lm_common.target_logits`)."""
    logits, targets, rows = target_logits(model, split, input_ids, attention_mask, target_mask)
    token_logps = -F.cross_entropy(logits, targets, reduction="none")
    return torch.zeros(input_ids.shape[0], device=token_logps.device).index_add_(0, rows, token_logps)


def dpo_metrics(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
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


def add_lora(model: torch.nn.Module, config: DPOConfig) -> torch.nn.Module:
    """``model`` wrapped by peft with LoRA adapters (rank ``config.lora_r``); only the adapters train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("DPOConfig.lora_r > 0 needs the peft package: pip install 'rlhf-gym[lora]' (or pip install peft)") from err
    targets = [t.strip() for t in config.lora_target_modules.split(",") if t.strip()] if config.lora_target_modules else None
    # GPT-2 keeps its projections in transformers' Conv1D ([in, out] weights): peft must be told.
    conv1d = getattr(model.config, "model_type", None) == "gpt2"
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM", fan_in_fan_out=conv1d)
    try:
        return get_peft_model(model, lora)
    except ValueError as err:
        raise ValueError(f"LoRA could not wrap {type(model).__name__}: {err}; set DPOConfig.lora_target_modules") from err


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

    def collate(indices: list[int], packed: bool) -> tuple:
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

    def logps_of(model: torch.nn.Module, split: tuple | None, batch: tuple) -> torch.Tensor:
        """``[2B]`` summed response log-probs: every chosen response, then every rejected one."""
        if isinstance(batch[0], PackedBatch):
            packed, *targets = batch
            return packed.sequence_logps(packed_view(model), *targets).view(-1, 2).T.reshape(-1)
        return sequence_logps(model, split, *batch)

    start = time.perf_counter()
    adapters_off = model.disable_adapter() if config.lora_r else contextlib.nullcontext()
    if config.ref_model_path is None:
        reference = model
    else:
        reference = load_causal_lm(config.ref_model_path, trust_remote_code=config.trust_remote_code)[0].to(device)
        fuse_gelu(reference)
    reference.eval()
    # GPT-2 and Llama-family models without active dropout take a packed forward (rlhf_envs.lm.views);
    # others Hugging Face's.
    ref_packed = packed_view(reference) is not None
    ref_split = None if ref_packed else split_lm_head(reference)
    ref_logps = torch.zeros(len(records), 2, device=device)
    # The pass may take the pairs in any order (a sequence's log-probs do not depend on the others).
    # Pairs sorted by their longer sequence: each batch is padded to nearly its own length (36% less
    # time in this pass on the corpus pairs of benchmarks/bench_trainers.py, before the packed path).
    # Packed, pairs of one prompt come together (prompts ordered by their longest pair), so that the
    # prompt runs once for all of them (the prefix tree of rlhf_envs.lm.packing).
    prompt_of = [tuple(data.input_ids[2 * i][: int(data.prompt_lengths[2 * i])].tolist()) for i in range(len(records))]
    longest = [max(len(data.input_ids[2 * i]), len(data.input_ids[2 * i + 1])) for i in range(len(records))]
    order = sorted(range(len(records)), key=longest.__getitem__)
    if ref_packed:
        by_prompt: dict[tuple, list[int]] = {}
        for i in order:
            by_prompt.setdefault(prompt_of[i], []).append(i)
        order = [i for group in sorted(by_prompt.values(), key=lambda g: longest[g[-1]]) for i in group]
    # Data parallel: each process runs every world-th batch of this pass, and a sum over the processes
    # (zeros elsewhere) gives each of them the whole table.
    rank, world = distributed()
    with torch.inference_mode(), autocast, adapters_off:
        for first in range(rank * 2 * config.batch_size, len(records), world * 2 * config.batch_size):
            indices = order[first : first + 2 * config.batch_size]
            logps = logps_of(reference, ref_split, collate(indices, ref_packed))
            ref_logps[indices] = logps.view(2, -1).T
    if world > 1:
        dist.all_reduce(ref_logps)
    del reference, ref_split
    ref_seconds = time.perf_counter() - start

    packed = packed_view(model.train()) is not None
    split = None if packed else split_lm_head(model)
    train_idx, eval_idx = held_out_split(len(records), config.eval_fraction, config.seed, groups=[r["prompt"] for r in records])

    def loss_and_metrics(model: torch.nn.Module, indices: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps = logps_of(model, split, collate(indices, packed))
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
