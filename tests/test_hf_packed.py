"""The packed path of Llama-family models (rlhf_envs.lm.hf_packed) against Hugging Face's padded forward.

Tiny Llama, Qwen2, Qwen3 and Mistral configs are built here: tied and untied embeddings, grouped-query
attention, rope scaling, attention biases, a sliding window shorter than the sequences.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from rlhf_envs.lm.hf_packed import HFPackedView
from rlhf_envs.lm.packing import pack_sequences
from rlhf_envs.lm.views import packed_view

VOCAB = 61


def _config(kind: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    shape = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {
        "llama-tied-gqa": lambda: LlamaConfig(**shape, num_key_value_heads=2, tie_word_embeddings=True),
        "llama-untied-rope-linear": lambda: LlamaConfig(**shape, num_key_value_heads=4, tie_word_embeddings=False,
                                                        rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                         "rope_theta": 10000.0}),
        "llama-yarn-mqa": lambda: LlamaConfig(**shape, num_key_value_heads=1, tie_word_embeddings=False,
                                              rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 500.0,
                                                               "original_max_position_embeddings": 32}),
        "qwen2-bias-gqa": lambda: Qwen2Config(**shape, num_key_value_heads=2, tie_word_embeddings=True),
        "qwen3-qknorm": lambda: Qwen3Config(**shape, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False),
        "mistral-window": lambda: MistralConfig(**shape, num_key_value_heads=2, sliding_window=5,
                                                tie_word_embeddings=False),
    }[kind]()


KINDS = ["llama-tied-gqa", "llama-untied-rope-linear", "llama-yarn-mqa", "qwen2-bias-gqa", "qwen3-qknorm",
         "mistral-window"]


def _model(kind: str, classifier: bool = False):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = _config(kind)
    if classifier:
        config.num_labels = 1
        return AutoModelForSequenceClassification.from_config(config).train()
    return AutoModelForCausalLM.from_config(config).train()


def _sequences(seed: int = 0) -> tuple[list[torch.Tensor], list[int]]:
    """Prompt + response sequences (pad-free ids >= 3); pairs share prompts, some share response starts."""
    g = torch.Generator().manual_seed(seed)
    seqs, starts = [], []
    for _ in range(4):
        prompt = torch.randint(3, VOCAB, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g)
        common = torch.randint(3, VOCAB, (int(torch.randint(0, 3, (1,), generator=g)),), generator=g)
        for _ in range(2):
            tail = torch.randint(3, VOCAB, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g)
            seqs.append(torch.cat([prompt, common, tail]))
            starts.append(len(prompt))
    return seqs, starts


def _padded_logps(model, seqs: list[torch.Tensor], starts: list[int]) -> torch.Tensor:
    """Each sequence's summed log-prob of its tokens from ``starts[s]`` on, from HF's right-padded forward."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    logps = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)
    out = []
    for i, (s, start) in enumerate(zip(seqs, starts)):
        out.append(logps[i, start - 1 : len(s) - 1].gather(-1, s[start:, None]).sum())
    return torch.stack(out)


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("drop_last", [True, False])
def test_packed_logps_and_gradients_match_padded(kind: str, drop_last: bool) -> None:
    model = _model(kind)
    view = packed_view(model)
    assert isinstance(view, HFPackedView)
    seqs, starts = _sequences()
    batch = pack_sequences(seqs, drop_last=drop_last)
    assert len(batch.tokens) < sum(len(s) for s in seqs)  # shared prefixes run once
    packed = batch.sequence_logps(view, *batch.distinct_targets(starts))
    weights = torch.linspace(0.5, 1.5, len(seqs))
    (packed * weights).sum().backward()
    packed_grads = _grads(model)
    padded = _padded_logps(model, seqs, starts)
    (padded * weights).sum().backward()
    padded_grads = _grads(model)
    torch.testing.assert_close(packed, padded, atol=2e-5, rtol=1e-5)
    assert packed_grads.keys() == padded_grads.keys()
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_causal_rows_layout_matches_padded(kind: str) -> None:
    """The layout with one causal row per sequence (long batches, GPUs) gives the same hidden states."""
    model = _model(kind).eval()
    view = packed_view(model)
    seqs, _ = _sequences(1)
    batch = pack_sequences(seqs)
    hidden = view.packed_forward(batch.tokens, batch.positions, batch.gather, batch.owner, len(seqs))
    with torch.no_grad():
        for seq, index in zip(seqs, batch.index):
            ref = model.base_model(input_ids=seq[None]).last_hidden_state[0]
            torch.testing.assert_close(hidden[index].detach(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama-tied-gqa", "qwen2-bias-gqa", "mistral-window"])
def test_packed_rewards_and_gradients_match_padded(kind: str) -> None:
    """A sequence classifier (the reward model) scores the same packed as padded, with the same gradients."""
    model = _model(kind, classifier=True)
    view = packed_view(model)
    assert isinstance(view, HFPackedView) and view.score is not None and view.lm_head is None
    seqs, _ = _sequences(2)
    batch = pack_sequences(seqs)
    last = batch.last_index(model.config.pad_token_id)
    rewards = F.linear(view.final_norm(batch.hidden(view, last)), view.score)[:, 0]
    rewards.pow(2).sum().backward()
    packed_grads = _grads(model)
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)  # right padding with the pad id 0, as HF pools
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    padded = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    padded.pow(2).sum().backward()
    padded_grads = _grads(model)
    torch.testing.assert_close(rewards, padded, atol=2e-5, rtol=1e-5)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=2e-5, rtol=1e-4, msg=name)


def test_ppo_policy_forward_packed_matches_padded() -> None:
    from agents.lm_policy import ValueHead, policy_forward
    from rlhf_envs.lm.sampling import SamplingConfig, positions_from_mask, processed_logprobs

    model = _model("llama-tied-gqa")
    head = ValueHead(32)
    torch.nn.init.normal_(head.summary.weight)
    cfg = SamplingConfig(temperature=0.7, top_k=20)
    prompt_ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 0, 5, 6, 7]])
    prompt_mask = prompt_ids != 0
    response_ids = torch.tensor([[13, 14, 2, 0], [15, 2, 0, 0], [13, 16, 17, 18]])
    response_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    logprobs, values, _ = policy_forward(model, head, prompt_ids, prompt_mask, response_ids, response_mask, cfg)
    mask = torch.cat([prompt_mask, response_mask], 1)
    out = model(input_ids=torch.cat([prompt_ids, response_ids], 1), attention_mask=mask.long(),
                position_ids=positions_from_mask(mask), output_hidden_states=True, use_cache=False)
    full = processed_logprobs(out.logits[:, 4:-1], cfg)
    expected = full.gather(-1, response_ids[..., None])[..., 0].masked_fill(~response_mask, 0.0)
    expected_values = head(out.hidden_states[-1][:, 4:-1]).masked_fill(~response_mask, 0.0)
    torch.testing.assert_close(logprobs, expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(values, expected_values, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("prompt_cache", [True, False])
def test_env_reference_pass_matches_padded(prompt_cache: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """TextTask's reference log-probs on a Llama (the packed path, with and without the prompt cache of
    rlhf_envs.lm.hf_prompt_cache) equal HF's padded forward, also after the weights change."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import rlhf_envs.text_common
    from rlhf_envs.text_common import TextTask
    from tests.tiny_models import tiny_causal_lm

    _, tokenizer = tiny_causal_lm()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         pad_token_id=257, bos_token_id=256, eos_token_id=256)).eval()
    task = TextTask((model, tokenizer), lambda prompts, responses: [0.0] * len(prompts), ["ab", "hello", "ab"],
                    beta=0.1, max_new_tokens=6)
    index = torch.tensor([0, 1, 2, 1])
    response_ids = torch.randint(0, 256, (4, 6), generator=torch.Generator().manual_seed(0))
    response_ids[1, 3] = 256
    response_mask = task.response_mask(response_ids)
    if not prompt_cache:
        monkeypatch.setattr(rlhf_envs.text_common, "PROMPT_CACHE_BYTES", 0)
    task.ref_logprobs(index, response_ids, response_mask, full=False)  # fills the prompt cache
    with torch.no_grad():
        task.ref_model.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # a changed reference: no stale cache read
    ref, full = task.ref_logprobs(index, response_ids, response_mask, full=True)
    assert (task._ref_hf_prompt_cache is not None) == prompt_cache
    from rlhf_envs.lm.sampling import positions_from_mask

    ids = torch.cat([task.prompt_ids[index], response_ids], 1)
    mask = torch.cat([task.prompt_mask[index], response_mask], 1)
    with torch.no_grad():
        logits = task.ref_model(input_ids=ids, attention_mask=mask.long(),
                                position_ids=positions_from_mask(mask)).logits
    expected = (logits[:, task.prompt_ids.shape[1] - 1 : -1] / task.ref_sampling.temperature).log_softmax(-1)
    picked = expected.gather(-1, response_ids[..., None])[..., 0].masked_fill(~response_mask, 0.0)
    torch.testing.assert_close(ref, picked, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(full, expected.masked_fill(~response_mask[..., None], 0.0), atol=2e-5, rtol=1e-5)


def test_other_architectures_take_the_padded_path_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                     num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16))
    with caplog.at_level(logging.INFO, logger="rlhf_envs.lm"):
        assert packed_view(model) is None
        assert packed_view(model) is None
        assert packed_view(_model("llama-tied-gqa")) is not None
    padded = [r for r in caplog.records if "OPTForCausalLM" in r.getMessage()]
    assert len(padded) == 1 and padded[0].levelno == logging.WARNING and "padded" in padded[0].getMessage()


def test_attention_dropout_in_training_takes_the_padded_path() -> None:
    model = _model("llama-tied-gqa")
    model.config.attention_dropout = 0.1
    assert packed_view(model) is None
    assert packed_view(model.eval()) is not None
    assert model.config._attn_implementation != "rlhf_packed"  # restored after every packed call


def test_lora_adapters_go_through_the_packed_path() -> None:
    """peft's LoRA layers are the model's own modules: packed log-probs and adapter gradients match padded ones,
    with the adapters on and off."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model("llama-tied-gqa"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    view = packed_view(model)
    assert isinstance(view, HFPackedView)
    seqs, starts = _sequences(3)
    batch = pack_sequences(seqs, drop_last=True)
    packed = batch.sequence_logps(view, *batch.distinct_targets(starts))
    packed.sum().backward()
    packed_grads = _grads(model)
    padded = _padded_logps(model, seqs, starts)
    padded.sum().backward()
    padded_grads = _grads(model)
    torch.testing.assert_close(packed, padded, atol=2e-5, rtol=1e-5)
    assert packed_grads and all("lora" in name for name in packed_grads)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=2e-5, rtol=1e-4, msg=name)
    with torch.no_grad(), model.disable_adapter():
        off = batch.sequence_logps(view, *batch.distinct_targets(starts))
        torch.testing.assert_close(off, _padded_logps(model, seqs, starts), atol=2e-5, rtol=1e-5)
    assert not torch.allclose(off, packed.detach())


def test_embedded_llama_is_a_named_twin_of_the_default() -> None:
    """``embedded-llama`` names the shipped Llama twin: Llama architecture, the default's tokenizer, about its size."""
    from rlhf_envs.lm.loading import EMBEDDED_LLAMA_DIR, load_causal_lm, resolve_model_path

    assert resolve_model_path("embedded-llama") == EMBEDDED_LLAMA_DIR
    model, tokenizer = load_causal_lm("embedded-llama")
    default, default_tokenizer = load_causal_lm(None)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    assert tokenizer.get_vocab() == default_tokenizer.get_vocab()
    n, n_default = (sum(p.numel() for p in m.parameters()) for m in (model, default))
    assert 0.9 * n_default < n < 1.1 * n_default
    assert isinstance(packed_view(model), HFPackedView)
