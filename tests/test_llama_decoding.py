"""The sampler's lean Llama decoder (rlhf_envs.lm.llama_decoding) against the generic Hugging Face path."""

from __future__ import annotations

import pytest
import torch

from rlhf_envs.lm.llama_decoding import llama_decoder_weights
from rlhf_envs.lm.sampling import SamplingConfig, generate


def _model(kind: str):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    shape = dict(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                      "rope_theta": 10000.0})).eval()
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**shape, tie_word_embeddings=False)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**shape)).eval()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("cfg", [SamplingConfig(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.95),
                                 SamplingConfig(max_new_tokens=12, greedy=True)])
def test_lean_decoder_gives_the_generic_paths_tokens(kind: str, cfg: SamplingConfig) -> None:
    model = _model(kind)
    assert llama_decoder_weights(model, 64) is not None
    prompt_ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 0, 0, 13, 14], [0, 15, 16, 17, 18]])
    prompt_mask = prompt_ids != 0

    def sample():
        return generate(model, prompt_ids, prompt_mask, cfg, eos_token_id=2, pad_token_id=0,
                        generator=torch.Generator().manual_seed(3))

    lean = sample()
    hook = model.register_forward_pre_hook(lambda module, args: None)  # a hook: the generic path
    assert llama_decoder_weights(model, 64) is None
    generic = sample()
    hook.remove()
    assert torch.equal(lean.response_ids, generic.response_ids)
    assert torch.equal(lean.response_mask, generic.response_mask)
    torch.testing.assert_close(lean.logprobs, generic.logprobs, atol=1e-5, rtol=1e-5)


def test_models_it_does_not_reproduce_take_the_generic_path() -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    assert llama_decoder_weights(qwen3, 16) is None  # q/k norms
    mistral = _model("mistral")
    mistral.config.sliding_window = 8
    assert llama_decoder_weights(mistral, 16) is None  # a window shorter than the sequences
    assert llama_decoder_weights(mistral, 8) is not None
