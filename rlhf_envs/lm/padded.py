"""The generic Hugging Face path on right-padded batches: for models the packed forwards do not cover.

Sequences are right-padded to the longest; the LM head runs only where a target is predicted when the model
splits into a body and a head (:func:`split_lm_head`).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["batch_sequences", "pad", "response_target_mask", "split_lm_head", "target_logits"]


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
    return input_ids.to(device, non_blocking=True), attention_mask.to(device,
                                                                      non_blocking=True), target_mask.to(device,
                                                                                                         non_blocking=True)
