"""LoRA for every LM trainer (SFT, reward model, DPO, RLHF PPO), through peft.

With ``lora_r > 0`` the model is wrapped by peft with LoRA adapters of that rank and only the
adapters train (and a reward model's new score head, which peft trains whole). Where a trainer needs
a reference (DPO, PPO), it is the same weights with the adapters off (peft's ``disable_adapter()``),
so no second copy of the base weights is held. The saved model has the adapters merged in, so every
loader here reads it like any other Hugging Face directory, and ``adapter/`` beside it holds the
adapters alone (peft's format, for ``PeftModel.from_pretrained`` on the base model).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

LORA_HELP = {
    "lora_r": "LoRA rank (needs the peft package: pip install 'rlhf-gym[lora]'); 0 = full fine-tuning. With LoRA only "
              "the adapters train, a reference (DPO, PPO) is the same weights with the adapters off, and the saved "
              "model has them merged in (adapter/ holds them alone)",
    "lora_alpha": "LoRA scaling numerator (the update is lora_alpha / lora_r * B A)",
    "lora_dropout": "dropout on the LoRA adapters' input",
    "lora_target_modules": "comma-separated module names to adapt (e.g. c_attn,c_proj); None = peft's default for "
                           "the architecture",
}
"""Help strings of the LoRA fields, shared by every trainer's config."""


def check_lora_fields(config: Any, owner: str) -> None:
    """Validate ``lora_r``, ``lora_alpha`` and ``lora_dropout`` of a trainer's config; raises ``ValueError``."""
    if isinstance(config.lora_r, bool) or not isinstance(config.lora_r, int) or config.lora_r < 0:
        raise ValueError(f"{owner}.lora_r must be an integer >= 0 (0 = full fine-tuning), got {config.lora_r!r}")
    if config.lora_r and not config.lora_alpha > 0:
        raise ValueError(f"{owner}.lora_alpha must be > 0, got {config.lora_alpha!r}")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise ValueError(f"{owner}.lora_dropout must be in [0, 1), got {config.lora_dropout!r}")


def add_lora(model: nn.Module, config: Any, task_type: str = "CAUSAL_LM") -> nn.Module:
    """``model`` wrapped by peft with LoRA adapters per ``config``'s ``lora_*`` fields; only the adapters train.

    ``task_type`` is peft's: ``CAUSAL_LM``, or ``SEQ_CLS`` for a reward model (its score head then trains whole).
    """
    owner = type(config).__name__
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError(f"{owner}.lora_r > 0 needs the peft package: pip install 'rlhf-gym[lora]' "
                          "(or pip install peft)") from err
    names = config.lora_target_modules
    targets = [t.strip() for t in names.split(",") if t.strip()] if names else None
    # GPT-2 keeps its projections in transformers' Conv1D ([in, out] weights): peft must be told.
    conv1d = getattr(model.config, "model_type", None) == "gpt2"
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, task_type=task_type, fan_in_fan_out=conv1d)
    try:
        return get_peft_model(model, lora)
    except ValueError as err:
        raise ValueError(f"LoRA could not wrap {type(model).__name__}: {err}; set {owner}.lora_target_modules") from err


def with_lora(model: nn.Module, config: Any, task_type: str = "CAUSAL_LM") -> nn.Module:
    """:func:`add_lora` when ``config.lora_r > 0``, else ``model`` itself."""
    return add_lora(model, config, task_type) if config.lora_r else model


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` is a peft model that can merge its adapters."""
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def merged_for_saving(model: nn.Module, directory: Path, keep_training: bool = False) -> nn.Module:
    """The model to ``save_pretrained`` into ``directory``: a LoRA model's adapters are saved to
    ``directory/adapter`` and merged in (into a copy with ``keep_training``, so that the live model keeps
    its adapters and its base weights exactly); any other model is returned as it is."""
    if not is_lora(model):
        return model
    model.save_pretrained(Path(directory) / "adapter")
    return (copy.deepcopy(model) if keep_training else model).merge_and_unload()
