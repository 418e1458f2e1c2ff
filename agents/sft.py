"""Supervised fine-tuning (SFT): maximise the likelihood of demonstrations' completions.

The loss is the mean cross-entropy over completion tokens (and the EOS after them); prompt
tokens condition but are not trained on. Data: JSONL lines ``{"prompt", "completion"}``
(:func:`agents.data.read_sft`). :func:`train_sft` reads top to bottom: load, tokenise once, hold
out ``eval_fraction``, and run the shared loop of :mod:`agents.lm_common` (checkpoints, exact
resume, metrics JSONL). Logged names: ``loss``, ``grad_norm``, ``lr``, ``eval/loss``,
``eval/perplexity``, ``eval/unigram_loss`` (the held-out tokens' loss under a unigram model,
the baseline to beat).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from agents.data import TokenizedSequences, read_sft, tokenize_sft
from agents.lm_common import LMTrainConfig, TrainResult, fuse_gelu, held_out_split, run_training, start_run
from agents.lora import with_lora
from rlhf_envs.lm.loading import load_causal_lm
from rlhf_envs.lm.packing import PackedBatch, pack_sequences
from rlhf_envs.lm.padded import batch_sequences, split_lm_head, target_logits
from rlhf_envs.lm.views import packed_view


@dataclass
class SFTConfig(LMTrainConfig):
    """Hyper-parameters of :func:`train_sft`; the shared fields are documented on :class:`LMTrainConfig`."""

    output_dir: str = field(default="runs/sft", metadata={"help": "the fine-tuned model (a Hugging Face directory), "
                                                                  "metrics.jsonl and checkpoints/ go here"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak AdamW learning rate"})


def sft_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood (nats per token) of ``targets [N]`` under ``logits [N, V]``."""
    return F.cross_entropy(logits.float(), targets)


def train_sft(config: SFTConfig) -> TrainResult:
    """Fine-tune ``config.model_path`` on ``config.data_path``; the result is saved in ``config.output_dir``."""
    device = start_run(config)
    records = read_sft(config.data_path)
    model, tokenizer = load_causal_lm(config.model_path, trust_remote_code=config.trust_remote_code)
    model = with_lora(model, config)
    data = tokenize_sft(tokenizer, records, config.max_length)
    # a conversation gives one example per assistant turn: held out together, by conversation
    train_idx, eval_idx = held_out_split(len(data.input_ids), config.eval_fraction, config.seed,
                                         groups=data.record_index)
    return fit_sequences(config, "sft", model, tokenizer, data, train_idx, eval_idx, device)


def unigram_loss(train_targets: list[torch.Tensor], eval_targets: list[torch.Tensor], vocab_size: int) -> float:
    """Cross-entropy (nats per token) of ``eval_targets`` under a unigram model of ``train_targets``.

    The baseline a language model must beat to have learned anything about context: token
    frequencies alone, add-one (Laplace) smoothed over ``vocab_size`` so that an unseen token costs
    a finite amount. Both arguments are lists of 1-D int64 target tensors.
    """
    counts = torch.bincount(torch.cat(train_targets), minlength=vocab_size).double() + 1.0
    log_p = counts.log() - counts.sum().log()
    return float(-log_p[torch.cat(eval_targets)].mean())


def fit_sequences(config: LMTrainConfig, algorithm: str, model: torch.nn.Module, tokenizer, data: TokenizedSequences,
                  train_idx: list[int], eval_idx: list[int], device: torch.device) -> TrainResult:
    """Train ``model`` on the tokens after each sequence's prompt (SFT; pretraining with a prompt of BOS alone).

    The shared loop of :mod:`agents.lm_common` runs it; held out (``eval_idx``) it logs ``eval/loss``,
    ``eval/perplexity`` and ``eval/unigram_loss``, the same tokens' loss under a unigram model of the
    training targets (:func:`unigram_loss`): a loss no lower than that one means nothing was learned.
    """
    fuse_gelu(model)
    model.to(device)
    pad_id = tokenizer.pad_token_id
    completion = [ids[max(int(n), 1):] for ids, n in zip(data.input_ids, data.prompt_lengths)]
    baseline = unigram_loss([completion[i] for i in train_idx], [completion[i] for i in eval_idx],
                            max(model.get_input_embeddings().num_embeddings, len(tokenizer))) if eval_idx else None

    # GPT-2 and Llama-family models without active dropout take a packed forward (no padding,
    # rlhf_envs.lm.views); other models take Hugging Face's forward on right-padded batches.
    packed = packed_view(model.train()) is not None
    split = None if packed else split_lm_head(model)

    def collate(indices: list[int]) -> tuple:
        if packed:
            batch = pack_sequences([data.input_ids[i] for i in indices],
                                   drop_last=True)  # the last token predicts nothing
            predictor, targets, _ = batch.targets(data.prompt_lengths[indices].tolist())
            return batch.to(device), predictor.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        return batch_sequences([data.input_ids[i] for i in indices], data.prompt_lengths[indices], pad_id, device)

    def logits_and_targets(model: torch.nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch[0], PackedBatch):
            packed_batch, predictor, targets = batch
            return packed_batch.target_logits(packed_view(model), predictor), targets
        logits, targets, _ = target_logits(model, split, *batch)
        return logits, targets

    def loss_fn(model: torch.nn.Module, batch: tuple) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return sft_loss(*logits_and_targets(model, batch)), {}

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        total, count = 0.0, 0
        for start in range(0, len(eval_idx), config.batch_size):
            logits, targets = logits_and_targets(model, collate(eval_idx[start : start + config.batch_size]))
            total += float(F.cross_entropy(logits, targets, reduction="sum"))
            count += len(targets)
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "unigram_loss": baseline}

    return run_training(
        config,
        algorithm=algorithm,
        model=model,
        tokenizer=tokenizer,
        num_train=len(train_idx),
        collate=lambda indices: collate([train_idx[i] for i in indices]),
        loss_fn=loss_fn,
        evaluate=evaluate if eval_idx else None,
        device=device,
        # the loss is a mean over target tokens: data-parallel shares are weighed by their targets
        example_weights=[len(completion[i]) for i in train_idx],
    )
