"""Loading causal language models and their tokenizers, offline only.

``load_causal_lm(None)`` returns the embedded default (a small GPT-2 trained on the
project's synthetic reviews by :mod:`rlhf_envs.lm.build_embedded`); any local Hugging Face
causal-LM directory works in its place. Two names are reserved for the shipped models
(:data:`EMBEDDED_MODELS`): ``"embedded"`` (the default) and ``"embedded-llama"``, its
Llama-architecture twin (same tokenizer and corpus, about the same size; built with
``python -m rlhf_envs.lm.build_embedded --arch llama``). A local directory of either name is
reached as ``./embedded-llama``. Nothing is ever fetched from the Hub
(``local_files_only=True``), and each way a directory can be unusable raises an
error that says what is wrong and how to fix it.

Tokenizers come back with ``padding_side="left"`` (prompts are batched for
generation). The embedded tokenizer prepends ``<|endoftext|>`` (its BOS) when it
encodes text; append ``tokenizer.eos_token_id`` yourself where a text must end.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

EMBEDDED_MODEL_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "embedded"
EMBEDDED_LLAMA_DIR: Path = EMBEDDED_MODEL_DIR.with_name("embedded-llama")
EMBEDDED_MODELS: dict[str, Path] = {"embedded": EMBEDDED_MODEL_DIR, "embedded-llama": EMBEDDED_LLAMA_DIR}
"""The names ``--model-path`` (and every ``path`` argument here) accepts for the models the package ships."""

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    "spiece.model")
_CAUSAL_CLASSES = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def resolve_model_path(path: str | Path | None) -> Path:
    """The directory ``path`` names: ``None`` or ``"embedded"`` is the embedded default, ``"embedded-llama"``
    its Llama twin (:data:`EMBEDDED_MODELS`), anything else a local directory."""
    if path is None:
        return EMBEDDED_MODEL_DIR
    if isinstance(path, str) and path in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[path]
    return Path(path).expanduser()


def _model_dir(path: str | Path | None) -> Path:
    """The directory to load from; ``None`` is the embedded default (see :func:`resolve_model_path`)."""
    directory = resolve_model_path(path)
    if not directory.is_dir():
        arch = " --arch llama" if directory == EMBEDDED_LLAMA_DIR else ""
        hint = (f" The embedded model is missing: rebuild it with `python -m rlhf_envs.lm.build_embedded{arch}`."
                if directory in EMBEDDED_MODELS.values() else "")
        raise FileNotFoundError(
            f"Model directory {str(directory)!r} does not exist.{hint} Pass a local Hugging Face "
            "model directory (with config.json, weights and tokenizer files), or None for the "
            "embedded default; models are never downloaded.")
    return directory


def _check_remote_code(directory: Path, trust_remote_code: bool) -> dict:
    """The raw config.json; refuses ``auto_map`` (custom code) unless trusted."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} has no config.json, so it is not a Hugging Face model directory. "
            "Save the model with `model.save_pretrained(path)`.")
    raw = json.loads(config_file.read_text())
    if "auto_map" in raw and not trust_remote_code:
        raise ValueError(
            f"{str(config_file)!r} has auto_map {raw['auto_map']!r}: loading it runs Python code "
            "shipped with the model. Read that code, then pass trust_remote_code=True "
            "(`--trust-remote-code` on the command line) to allow it.")
    return raw


def check_remote_code(path: str | Path | None, *, trust_remote_code: bool = False) -> None:
    """Refuse a model directory whose config.json has ``auto_map`` (code shipped with the model).

    For loaders that do not go through :func:`load_causal_lm` (e.g. sequence-classification
    reward models): transformers would otherwise fall back silently to its own class for a known
    ``model_type``, or run the shipped code when asked to. Raises ``FileNotFoundError`` or
    ``ValueError`` naming the fix.
    """
    _check_remote_code(_model_dir(path), trust_remote_code)


def _check_causal(config: PretrainedConfig, raw: dict, directory: Path) -> None:
    """Refuses configs that are not decoder-only causal LMs."""
    what = f"{str(directory)!r} (model_type={config.model_type!r}, architectures={config.architectures})"
    fix = "Pass a causal language model such as GPT-2, Llama or Qwen (an *ForCausalLM / *LMHeadModel)."
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{what} is an encoder-decoder model; a decoder-only causal LM is needed. {fix}")
    if "AutoModelForCausalLM" in raw.get("auto_map", {}):
        return
    if config.architectures and not any(
            a in _CAUSAL_CLASSES or a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures):
        raise ValueError(f"{what} is not a causal language model (e.g. a sequence-classification "
                         f"or masked-LM checkpoint). {fix}")
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{what}: model type {config.model_type!r} has no causal-LM head in "
                         f"transformers. {fix}")
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise ValueError(f"{what} is an encoder-only (bidirectional) model and cannot generate text "
                         f"left to right. {fix}")


def load_tokenizer(path: str | Path | None = None, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer in ``path`` (``None``: the embedded default), with left padding.

    Raises if the directory has no tokenizer or the tokenizer has no pad token.
    """
    directory = _model_dir(path)
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"No tokenizer in {str(directory)!r} (expected one of {list(_TOKENIZER_FILES)}). Save the "
            "tokenizer next to the model with `tokenizer.save_pretrained(path)`.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"No usable tokenizer in {str(directory)!r} ({err}). Save one next to the model with "
            "`tokenizer.save_pretrained(path)`.") from err
    if tokenizer.pad_token is None:
        raise ValueError(
            f"The tokenizer in {str(directory)!r} has no pad token, which batched prompts need. "
            "Set one and save it: `tokenizer.pad_token = tokenizer.eos_token; "
            "tokenizer.save_pretrained(path)`.")
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(path: str | Path | None = None, *, trust_remote_code: bool = False,
                   dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a local directory (``None``: the embedded default).

    The model is in eval mode with weights in ``dtype``; the tokenizer pads on the left.
    Raises ``FileNotFoundError`` for a missing directory, config, weights or tokenizer and
    ``ValueError`` for a non-causal config, untrusted remote code or a missing pad token.
    """
    directory = _model_dir(path)
    raw = _check_remote_code(directory, trust_remote_code)
    config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=trust_remote_code)
    _check_causal(config, raw, directory)
    if not any((directory / name).is_file() for name in _WEIGHT_FILES):
        raise FileNotFoundError(
            f"{str(directory)!r} has config.json but no weights (expected one of {list(_WEIGHT_FILES)}). "
            "Save the model with `model.save_pretrained(path)`.")
    tokenizer = load_tokenizer(directory, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True,
                                                 trust_remote_code=trust_remote_code, dtype=dtype)
    model.eval()
    n_embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embeddings:
        raise ValueError(
            f"The tokenizer in {str(directory)!r} has {len(tokenizer)} tokens but the model embeds only "
            f"{n_embeddings}. Resize and save the model: `model.resize_token_embeddings(len(tokenizer)); "
            "model.save_pretrained(path)`.")
    return model, tokenizer
