"""Model-level code that the envs and the trainers share.

- :mod:`~rlhf_envs.lm.loading`: offline loading of causal LMs and tokenizers, the embedded default.
- :mod:`~rlhf_envs.lm.views`: which packed forward a model takes (:func:`packed_view`), one dispatch for all callers.
- :mod:`~rlhf_envs.lm.gpt2`: the lean GPT-2 forward over a Hugging Face model's own weights.
- :mod:`~rlhf_envs.lm.hf_packed`: the packed forward of Llama-family models, through transformers' own forward.
- :mod:`~rlhf_envs.lm.segments`: packed attention layouts and their masks.
- :mod:`~rlhf_envs.lm.decoding`: the prompt key/value table and the KV-cached decoder.
- :mod:`~rlhf_envs.lm.kernels`: GPT-2's tanh-GELU, written for CPU speed.
- :mod:`~rlhf_envs.lm.sampling`: the one sampler (greedy, temperature, top-k, top-p) and its log-probs.
- :mod:`~rlhf_envs.lm.packing`: packed training batches (a prefix tree of the batch's sequences).
- :mod:`~rlhf_envs.lm.build_embedded`: the reproducible build of the embedded model.

The names below are imported on first use, so ``import rlhf_envs.lm`` loads neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EMBEDDED_MODEL_DIR": "loading",
    "EMBEDDED_LLAMA_DIR": "loading",
    "EMBEDDED_MODELS": "loading",
    "resolve_model_path": "loading",
    "check_remote_code": "loading",
    "load_causal_lm": "loading",
    "load_tokenizer": "loading",
    "GPT2View": "gpt2",
    "HFPackedView": "hf_packed",
    "PackedForward": "views",
    "packed_view": "views",
    "gpt2_view": "gpt2",
    "SamplingConfig": "sampling",
    "generate": "sampling",
    "PackedBatch": "packing",
    "pack_sequences": "packing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
