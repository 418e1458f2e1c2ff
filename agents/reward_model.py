"""Reward-model training with the Bradley-Terry loss (InstructGPT's K-ranking form).

The model is ``AutoModelForSequenceClassification(num_labels=1)`` initialised from a causal-LM
directory (the transformer is reused, the score head is new). It reads the string ``prompt +
response`` and the reward is ``logits[:, 0]``, pooled by the model at the last non-pad token;
texts are padded on the tokenizer's padding side and position ids come from the attention mask,
so a padded text scores exactly like the same text alone. This is the format the ``learned``
reward plugin (:mod:`rlhf_envs.rewards`) scores.

Loss: for responses ranked ``y_1 > y_2 > ... > y_K`` for one prompt,
``-1/C(K,2) * sum_{i<j} log sigmoid(r(x, y_i) - r(x, y_j))``, averaged over prompts; a prompt is
one batch element and each response gets one forward pass, however many pairs it is in. K = 2
is the usual pairwise loss ``-log sigmoid(r_chosen - r_rejected)``. Data: JSONL lines
``{"prompt", "responses": [best, ..., worst]}`` or ``{"prompt", "chosen", "rejected"}``.
Logged names: ``loss``, ``accuracy`` (fraction of pairs ordered correctly), ``margin`` (mean
``r_better - r_worse``), ``grad_norm``, ``lr``; held out: ``eval/loss``, ``eval/accuracy``,
``eval/margin``, ``eval/pairs`` (how many held-out pairs the accuracy is over).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from agents.data import prompt_key, read_rankings, tokenize_rankings
from agents.distributed import is_main_process
from agents.lm_common import (
    LMTrainConfig,
    TrainResult,
    disable_dropout,
    fuse_gelu,
    held_out_split,
    model_dir,
    run_training,
    start_run,
)
from agents.lora import with_lora
from rlhf_envs.lm.loading import check_remote_code, load_tokenizer
from rlhf_envs.lm.packing import PackedBatch, pack_sequences
from rlhf_envs.lm.padded import pad
from rlhf_envs.lm.views import packed_view

NORMALIZATION_FILE = "reward_normalization.json"


@dataclass
class RewardModelConfig(LMTrainConfig):
    """Hyper-parameters of :func:`train_reward_model`; shared fields are documented on :class:`LMTrainConfig`."""

    output_dir: str = field(default="runs/rm", metadata={"help": "the reward model (a Hugging Face "
                                                                 "sequence-classification directory), metrics.jsonl "
                                                                 "and checkpoints/ go here"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak AdamW learning rate"})
    batch_size: int = field(default=32, metadata={"help": "prompts per optimizer step (each with its K ranked "
                                                          "responses)"})
    disable_dropout: bool = field(default=True, metadata={"help": "turn dropout off, so both sides of a pair are "
                                                                  "scored by the same function"})


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log sigmoid(r_chosen - r_rejected)`` over ``[N]`` pairs of scalar rewards."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


@lru_cache(maxsize=None)
def _pairs(k: int) -> tuple[list[int], list[int]]:
    better, worse = zip(*itertools.combinations(range(k), 2))
    return list(better), list(worse)


def ranking_pairs(group_sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every ordered pair within each ranked group of a flat score vector.

    ``group_sizes [B]`` are the K of each prompt (responses best first, groups back to back).
    Returns ``better [P]``, ``worse [P]`` (indices into the flat scores) and ``weight [P]`` =
    ``1 / (C(K,2) * B)``, so a weighted sum averages over pairs within a prompt and over prompts.
    """
    better, worse, weight, offset = [], [], [], 0
    for k in group_sizes:
        b, w = _pairs(k)
        better += [offset + i for i in b]
        worse += [offset + j for j in w]
        weight += [1.0 / (len(b) * len(group_sizes))] * len(b)
        offset += k
    return torch.tensor(better), torch.tensor(worse), torch.tensor(weight)


def ranking_loss(scores: torch.Tensor, better: torch.Tensor, worse: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """InstructGPT's loss: ``sum(weight * -log sigmoid(scores[better] - scores[worse]))`` (see
    :func:`ranking_pairs`)."""
    return (weight * -F.logsigmoid(scores[better] - scores[worse])).sum()


def train_reward_model(config: RewardModelConfig) -> TrainResult:
    """Train a reward model on ``config.data_path``; the result is saved in ``config.output_dir``."""
    from transformers import AutoModelForSequenceClassification

    device = start_run(config)
    records = read_rankings(config.data_path)
    path = model_dir(config.model_path)
    check_remote_code(path, trust_remote_code=config.trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code=config.trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, local_files_only=True, trust_remote_code=config.trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    fuse_gelu(model)
    if config.disable_dropout:
        disable_dropout(model)
    model = with_lora(model, config, task_type="SEQ_CLS")  # the new score head trains whole
    model.to(device)
    groups = tokenize_rankings(tokenizer, records, config.max_length)
    texts = [text for group in groups for text in group]
    # held out by prompt: the accuracy on held-out rankings is on prompts the model never trained on
    train_idx, eval_idx = held_out_split(len(records), config.eval_fraction, config.seed,
                                         groups=[prompt_key(r["prompt"]) for r in records])
    pad_id, side = tokenizer.pad_token_id, tokenizer.padding_side

    # GPT-2 and Llama-family models without active dropout take a packed forward (rlhf_envs.lm.views): the
    # batch's texts share their common first tokens (a prompt runs once for its K texts) and nothing is
    # padded (rlhf_envs.lm.packing); other models take Hugging Face's forward.
    packed = packed_view(model.train()) is not None

    def collate(indices: list[int]) -> tuple:
        pairs = ranking_pairs([len(groups[i]) for i in indices])
        if packed:
            batch = pack_sequences([seq for i in indices for seq in groups[i]])
            last = batch.last_index(model.config.pad_token_id)
            return (batch.to(device), *(t.to(device, non_blocking=True) for t in (last, *pairs)))
        seqs = [seq for i in indices for seq in groups[i]]
        input_ids = pad(seqs, pad_id, side)
        mask = pad([torch.ones_like(s) for s in seqs], 0, side)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return tuple(t.to(device, non_blocking=True) for t in (input_ids, mask, positions, *pairs))

    def rewards(model: torch.nn.Module, batch: tuple) -> tuple[torch.Tensor, ...]:
        """``[S]`` float32 rewards of the batch's texts, then ``better``, ``worse`` and ``weight``."""
        if isinstance(batch[0], PackedBatch):
            packed_batch, last, *pairs = batch
            view = packed_view(model)
            hidden = view.final_norm(packed_batch.hidden(view, last))
            return (torch.nn.functional.linear(hidden, view.score)[:, 0].float(), *pairs)
        input_ids, mask, positions, *pairs = batch
        scores = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, 0]
        return (scores.float(), *pairs)

    def scores_and_loss(model: torch.nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's ranking loss and ``r_better - r_worse`` of each of its pairs."""
        scores, better, worse, weight = rewards(model, batch)
        return ranking_loss(scores, better, worse, weight), scores[better] - scores[worse]

    def loss_fn(model: torch.nn.Module,
                batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, margins = scores_and_loss(model, batch)
        margins = margins.detach()
        return loss, {"accuracy": (margins > 0).float().mean(), "margin": margins.mean()}

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        losses, margins = [], []
        for start in range(0, len(eval_idx), config.batch_size):
            indices = eval_idx[start : start + config.batch_size]
            loss, margin = scores_and_loss(model, collate(indices))
            losses.append(float(loss) * len(indices))
            margins.append(margin)
        margin = torch.cat(margins)
        return {"loss": sum(losses) / len(eval_idx), "accuracy": float((margin > 0).float().mean()),
                "margin": float(margin.mean()),
                "pairs": float(len(margin))}

    result = run_training(
        config,
        algorithm="reward_model",
        model=model,
        tokenizer=tokenizer,
        num_train=len(train_idx),
        collate=lambda indices: collate([train_idx[i] for i in indices]),
        loss_fn=loss_fn,
        evaluate=evaluate if eval_idx else None,
        device=device,
    )
    if not is_main_process():  # in a data-parallel run rank 0 writes the normalisation, as it wrote the model
        return result
    # InstructGPT normalises the reward model so that the responses it was trained on score 0 on
    # average; we also divide by their spread, so a policy's reward (and the KL coefficient beta
    # that trades against it) has the same units whatever scale the raw logits ended up on.
    model.eval()
    scores = []
    with torch.inference_mode():
        for start in range(0, len(texts), 256):
            seqs = texts[start : start + 256]
            input_ids, mask = pad(seqs, pad_id, side), pad([torch.ones_like(t) for t in seqs], 0, side)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            scores.append(model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                position_ids=positions.to(device), use_cache=False).logits[:, 0].float().cpu())
    scores = torch.cat(scores)
    normalization = {"mean": float(scores.mean()), "std": float(scores.std().clamp(min=1e-6)), "n": len(scores)}
    (Path(config.output_dir) / NORMALIZATION_FILE).write_text(json.dumps(normalization) + "\n")
    result.metrics.update({f"normalization/{k}": v for k, v in normalization.items()})
    return result
