"""The lean GPT-2 forward: same logits as Hugging Face, same generations as the generic path, same log-probs."""

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rlhf_envs.lm.decoding import GPT2Decoder, PromptKVCache
from rlhf_envs.lm.gpt2 import ViewCache, gpt2_view
from rlhf_envs.lm.kernels import GeluTanh
from rlhf_envs.lm.sampling import SamplingConfig, generate, positions_from_mask, response_logprobs
from rlhf_envs.lm.segments import SegmentLayout
from rlhf_envs.text_common import TextTask
from tests.tiny_models import tiny_causal_lm

EOS, PAD = 256, 257
PROMPTS = ["the cat", "a", "hello there, cat", "zz top"]


def _gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=258, bos_token_id=EOS,
                        eos_token_id=EOS, pad_token_id=PAD, **overrides)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_causal_lm()[1]


def _prompts(tokenizer, texts=PROMPTS):
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return batch["input_ids"], batch["attention_mask"].bool()


def _generic(model: torch.nn.Module):
    """A no-op forward pre-hook: the model is no longer eligible, so it runs through Hugging Face's forward."""
    return model.register_forward_pre_hook(lambda module, args: None)


def _hf_last_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask.long(), position_ids=positions_from_mask(mask)).logits[:, -1]


def test_view_only_for_plain_eval_gpt2():
    model = _gpt2()
    assert gpt2_view(model) is not None
    assert gpt2_view(_gpt2(activation_function="relu")) is None
    handle = _generic(model)
    assert gpt2_view(model) is None
    handle.remove()
    model.transformer.h[1].mlp.train()
    assert gpt2_view(model) is None
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    assert gpt2_view(llama.eval()) is None


@pytest.mark.parametrize("overrides", [{}, {"scale_attn_by_inverse_layer_idx": True}])
def test_prefill_and_every_decode_step_match_hf_logits(tokenizer, overrides):
    model = _gpt2(**overrides)
    ids, mask = _prompts(tokenizer)
    assert not mask.all(), "the batch must be left-padded"
    decoder = GPT2Decoder(gpt2_view(model), ids, mask, max_new_tokens=6)
    with torch.inference_mode():
        logits = decoder.prefill()
    torch.testing.assert_close(logits, _hf_last_logits(model, ids, mask), atol=1e-5, rtol=0)
    tokens_gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        tokens = torch.randint(0, 256, (len(PROMPTS),), generator=tokens_gen)
        ids = torch.cat([ids, tokens[:, None]], 1)
        mask = torch.cat([mask, torch.ones(len(PROMPTS), 1, dtype=torch.bool)], 1)
        with torch.inference_mode():
            logits = decoder.step(tokens)
        torch.testing.assert_close(logits, _hf_last_logits(model, ids, mask), atol=1e-5, rtol=0)


def test_dropping_rows_keeps_the_others_exact(tokenizer):
    model = _gpt2()
    ids, mask = _prompts(tokenizer)
    decoder = GPT2Decoder(gpt2_view(model), ids, mask, max_new_tokens=3)
    keep = torch.tensor([0, 2])
    tokens = torch.tensor([65, 66, 67, 68])
    with torch.inference_mode():
        decoder.prefill()
        decoder.step(tokens)
        decoder.keep_rows(keep)
        logits = decoder.step(tokens[keep])
    ids = torch.cat([ids, tokens[:, None], tokens[:, None]], 1)[keep]
    mask = torch.cat([mask, torch.ones(4, 2, dtype=torch.bool)], 1)[keep]
    torch.testing.assert_close(logits, _hf_last_logits(model, ids, mask), atol=1e-5, rtol=0)


def _eos_logit(model: GPT2LMHeadModel, logit: float) -> GPT2LMHeadModel:
    """Make EOS's logit exactly ``logit`` in every context (``ln_f``'s output is zero-mean, so it is orthogonal to
    the all-ones vector: with ``ln_f.bias = 0.1`` and ``wte[EOS] = c`` everywhere, ``h . wte[EOS] = 0.1 * c * D``)."""
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(0.1)
        model.transformer.wte.weight[EOS].fill_(logit / (0.1 * model.config.n_embd))
    return model


@pytest.mark.parametrize("cfg, eos_logit", [(SamplingConfig(max_new_tokens=10, greedy=True), None),
                                            (SamplingConfig(max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9),
                                             1.0),
                                            (SamplingConfig(max_new_tokens=10, temperature=1.3), 3.0)])
def test_generations_identical_to_generic_path_and_logprobs_to_teacher_forcing(tokenizer, cfg, eos_logit):
    model = _gpt2(seed=3) if eos_logit is None else _eos_logit(_gpt2(seed=3), eos_logit)
    ids, mask = _prompts(tokenizer, PROMPTS * 4)

    def run(eos):
        return generate(model, ids, mask, cfg, eos_token_id=eos, pad_token_id=PAD,
                        generator=torch.Generator().manual_seed(7))

    # Greedy decoding of a random model repeats one token per prompt: taking the most frequent one as EOS
    # ends some rows at once and others never.
    eos = EOS if eos_logit is not None else int(run(EOS).response_ids.flatten().mode().values)
    fast = run(eos)
    assert len(fast.response_mask.sum(-1).unique()) > 1, "rows must end at different steps (rows leave the batch)"
    handle = _generic(model)
    generic = run(eos)
    handle.remove()
    torch.testing.assert_close(fast.response_ids, generic.response_ids, atol=0, rtol=0)
    torch.testing.assert_close(fast.response_mask, generic.response_mask, atol=0, rtol=0)
    torch.testing.assert_close(fast.logprobs, generic.logprobs, atol=1e-5, rtol=0)
    with torch.no_grad():
        forced = response_logprobs(model, ids, mask, fast.response_ids, fast.response_mask, cfg)
    torch.testing.assert_close(fast.logprobs, forced, atol=1e-5, rtol=0)


def test_reads_the_live_parameters(tokenizer):
    model = _gpt2()
    ids, mask = _prompts(tokenizer)
    cfg = SamplingConfig(max_new_tokens=4, greedy=True)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(3.0)
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))
    with torch.inference_mode():
        logits = GPT2Decoder(gpt2_view(model), ids, mask, 4).prefill()
    torch.testing.assert_close(logits, _hf_last_logits(model, ids, mask), atol=1e-5, rtol=0)
    fast = generate(model, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD)
    _generic(model)
    generic = generate(model, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(fast.response_ids, generic.response_ids)


def test_other_architectures_take_the_generic_path(tokenizer):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                         bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)).eval()
    ids, mask = _prompts(tokenizer)
    gen = generate(llama, ids, mask, SamplingConfig(max_new_tokens=5, greedy=True), eos_token_id=EOS, pad_token_id=PAD)
    running_ids, running_mask = ids, mask
    for t in range(gen.response_ids.shape[1]):
        expected = _hf_last_logits(llama, running_ids, running_mask).argmax(-1)
        alive = gen.response_mask[:, t]
        assert torch.equal(gen.response_ids[alive, t], expected[alive])
        running_ids = torch.cat([running_ids, gen.response_ids[:, t : t + 1]], 1)
        running_mask = torch.cat([running_mask, torch.ones(len(PROMPTS), 1, dtype=torch.bool)], 1)


def _reference_logprobs(task, index, response_ids, response_mask):
    """What the env must report: teacher-forced log-probs through Hugging Face's forward at the policy's temperature."""
    handle = _generic(task.ref_model)
    try:
        return response_logprobs(task.ref_model, task.prompt_ids[index], task.prompt_mask[index], response_ids,
                                 response_mask, task.ref_sampling, return_full=True)
    finally:
        handle.remove()


@pytest.mark.parametrize("cache_bytes", [256 * 2**20, 0])
def test_reference_scoring_equals_teacher_forced_hf(tokenizer, monkeypatch, cache_bytes):
    monkeypatch.setattr("rlhf_envs.text_common.PROMPT_CACHE_BYTES", cache_bytes)
    task = TextTask(model=(_gpt2(seed=1), tokenizer), reward_model=lambda p, r: [0.0] * len(p), prompts=PROMPTS,
                    max_new_tokens=6, temperature=0.7)
    index = torch.tensor([2, 0, 1, 3, 2, 1])
    response_ids = torch.randint(0, 256, (6, 6), generator=torch.Generator().manual_seed(0))
    response_ids[0, 2], response_ids[1, 0], response_ids[3, 4] = EOS, EOS, EOS
    response_mask = task.response_mask(response_ids)
    response_ids = response_ids.masked_fill(~response_mask, PAD)
    for _ in range(2):
        ref, full = task.ref_logprobs(index, response_ids, response_mask, full=True)
        expected, expected_full = _reference_logprobs(task, index, response_ids, response_mask)
        torch.testing.assert_close(ref, expected, atol=1e-5, rtol=0)
        inside = response_mask[..., None].expand_as(full)
        torch.testing.assert_close(full[inside], expected_full[inside], atol=1e-5, rtol=0)
        assert (full[~inside] == 0).all() and (ref[~response_mask] == 0).all()
        picked_only, none = task.ref_logprobs(index, response_ids, response_mask, full=False)  # the k1/k2/k3 path
        assert none is None
        torch.testing.assert_close(picked_only, expected, atol=1e-5, rtol=0)
        assert (picked_only[~response_mask] == 0).all()
        assert (task._ref_prompt_cache is not None) == (cache_bytes > 0)
        with torch.no_grad():
            task.ref_model.transformer.wte.weight.mul_(1.5)


@pytest.mark.parametrize("cache_bytes", [256 * 2**20, 0])
def test_cache_prompts_fills_the_reference_prompt_cache_ahead_of_steps(tokenizer, monkeypatch, cache_bytes):
    monkeypatch.setattr("rlhf_envs.text_common.PROMPT_CACHE_BYTES", cache_bytes)
    task = TextTask(model=(_gpt2(seed=3), tokenizer), reward_model=lambda p, r: [0.0] * len(p), prompts=PROMPTS,
                    max_new_tokens=5, temperature=0.8)
    assert task.cache_prompts(batch_size=3) == (cache_bytes > 0)  # 3 does not divide the prompt count
    if cache_bytes:
        assert bool(task._ref_prompt_cache.ready.all())
    index = torch.arange(len(PROMPTS))
    response_ids = torch.randint(0, 256, (len(PROMPTS), 5), generator=torch.Generator().manual_seed(1))
    response_mask = task.response_mask(response_ids)
    response_ids = response_ids.masked_fill(~response_mask, PAD)
    ref, _ = task.ref_logprobs(index, response_ids, response_mask, full=False)
    expected, _ = _reference_logprobs(task, index, response_ids, response_mask)
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cache_bytes", [256 * 2**20, 0])
def test_reference_scoring_exact_when_rows_share_the_attention_grid(tokenizer, monkeypatch, cache_bytes):
    """Many responses of very different lengths: short ones are packed beside long ones in a grid row."""
    monkeypatch.setattr("rlhf_envs.text_common.PROMPT_CACHE_BYTES", cache_bytes)
    task = TextTask(model=(_gpt2(seed=2), tokenizer), reward_model=lambda p, r: [0.0] * len(p), prompts=PROMPTS,
                    max_new_tokens=12, temperature=0.9)
    gen = torch.Generator().manual_seed(3)
    index = torch.randint(0, len(PROMPTS), (24,), generator=gen)
    response_ids = torch.randint(0, 256, (24, 12), generator=gen)
    response_ids[torch.arange(24), torch.randint(0, 12, (24,), generator=gen)] = EOS
    response_ids[:3] = torch.randint(0, 256, (3, 12), generator=gen)  # three run to the end
    response_mask = task.response_mask(response_ids)
    response_ids = response_ids.masked_fill(~response_mask, PAD)
    lengths = task.prompt_mask[index].sum(1) + response_mask[:, 1:].sum(1)
    layout = SegmentLayout(task.prompt_mask[index].sum(1).numpy(), response_mask[:, 1:].sum(1).numpy())
    assert layout.rows < 20 and layout.width == int(lengths.max())  # rows are shared
    ref, _ = task.ref_logprobs(index, response_ids, response_mask, full=False)
    expected, _ = _reference_logprobs(task, index, response_ids, response_mask)
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=0)


def test_segment_layout_places_every_segment_once_inside_its_row():
    rng = np.random.default_rng(0)
    for _ in range(50):
        past, new = rng.integers(0, 8, 40), rng.integers(0, 30, 40)
        layout = SegmentLayout(past, new)
        keys = np.zeros((layout.rows, layout.width), dtype=int)
        queries = np.zeros((layout.rows, layout.q_width), dtype=int)
        for b in range(40):
            keys[layout.row[b], layout.k_offset[b] : layout.k_offset[b] + past[b] + new[b]] += 1
            queries[layout.row[b], layout.q_offset[b] : layout.q_offset[b] + new[b]] += 1
        assert keys.max() <= 1 and keys.sum() == (past + new).sum()
        assert queries.max() <= 1 and queries.sum() == new.sum()
        assert layout.width == (past + new).max() and layout.rows <= 40
        allowed = layout.allowed()[:, 0]
        used = queries.astype(bool)
        assert allowed[used].sum() == sum(
            n * p + n * (n + 1) // 2 for p, n in zip(past, new)
        )  # past keys + causal new keys
        # a query cell no token uses reads its row's first key alone (a finite softmax under bf16 autocast)
        assert (allowed[~used].sum(-1) == 1).all() and allowed[~used][:, 0].all()


def test_prompt_cache_fills_lazily_and_empties_on_parameter_change(tokenizer):
    model = _gpt2()
    ids, mask = _prompts(tokenizer)
    view = gpt2_view(model)
    cache = PromptKVCache(ids, mask)
    with torch.no_grad():
        _, hidden = cache.get(view, torch.tensor([1, 1]))
        assert cache.ready.tolist() == [False, True, False, False]
        torch.testing.assert_close(
            view.logits(hidden[0]), _hf_last_logits(model, ids[1:2], mask[1:2])[0], atol=1e-5, rtol=0
        )
        model.transformer.h[0].ln_1.bias.add_(0.3)
        _, hidden = cache.get(view, torch.tensor([3]))
        assert cache.ready.tolist() == [False, False, False, True]
        torch.testing.assert_close(view.logits(hidden), _hf_last_logits(model, ids[3:], mask[3:]), atol=1e-5, rtol=0)
        model.lm_head.weight.data = model.lm_head.weight.data * 1.5  # new storage, same Parameter (tied to wte)
        _, hidden = cache.get(view, torch.tensor([2]))
        assert cache.ready.tolist() == [False, False, True, False]
        torch.testing.assert_close(view.logits(hidden), _hf_last_logits(model, ids[2:3], mask[2:3]), atol=1e-5, rtol=0)


def test_view_cache_follows_hooks_dropout_and_replaced_parameters():
    model = _gpt2()
    cache = ViewCache(model)
    view = cache.get()
    assert view is not None and cache.get() is view  # kept between calls
    handle = model.register_forward_pre_hook(lambda module, args: None)
    assert cache.get() is None  # a hook: Hugging Face's forward must run
    handle.remove()
    assert cache.get() is view
    model.train()  # GPT-2's default dropout (0.1) is now active
    assert cache.get() is None
    model.eval()
    new_weight = torch.nn.Parameter(model.transformer.h[0].mlp.c_fc.weight.detach() * 2)
    model.transformer.h[0].mlp.c_fc.weight = new_weight
    rebuilt = cache.get()
    assert rebuilt is not view and rebuilt.layers[0].fc_w is new_weight
    model.transformer.h[1].attn = type(model.transformer.h[1].attn)(model.config, layer_idx=1).eval()
    replaced = cache.get()
    assert replaced is not rebuilt and replaced.layers[1].attn_w is model.transformer.h[1].attn.c_attn.weight


def test_token_env_reference_exact_over_staggered_episodes_and_compactions():
    """TextToken's rolling cache (rows restart at different steps; the lean forward reads only the
    last ``P + T`` slots; full buffers are compacted): every reported reference log-prob equals
    Hugging Face's teacher-forced one for that episode's prompt and response so far."""
    import gymnasium as gym

    import rlhf_envs  # noqa: F401  (registers the envs)

    model, tokenizer = tiny_causal_lm(seed=4)
    T, n, vocab = 4, 5, 258
    envs = gym.make_vec("TextToken-v0", num_envs=n, model=(model, tokenizer), prompts=PROMPTS, max_new_tokens=T)
    task, episodes = envs.unwrapped.task, envs.unwrapped._episodes
    assert task.reference_view() is not None, "the lean forward must be the one under test"
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    responses: list[list[int]] = [[] for _ in range(n)]
    compactions = 0
    for _ in range(70):
        before = episodes.cache.layers[0].length
        actions = np.where(rng.random(n) < 0.3, EOS, rng.integers(0, 256, n))
        prompt_index = episodes.prompt_index.copy()
        envs.set_policy_logprobs(np.full((n, vocab), -np.log(vocab), dtype=np.float32))
        _, _, terminated, _, info = envs.step(actions)
        compactions += episodes.cache.layers[0].length < before
        for row in range(n):
            responses[row].append(int(actions[row]))
            prompt = task.prompt_ids[prompt_index[row]][task.prompt_mask[prompt_index[row]]]
            response = torch.tensor(responses[row])
            with torch.no_grad():
                logits = model(torch.cat([prompt, response])[None]).logits[0, len(prompt) - 1 : -1]
            expected = torch.log_softmax(logits, -1).gather(-1, response[:, None])[:, 0].numpy()
            np.testing.assert_allclose(info["ref_logprobs"][row, : len(response)], expected, atol=1e-5, rtol=0)
            if terminated[row]:
                responses[row] = []
    assert compactions >= 2


def test_training_gelu_matches_torch_tanh_gelu_and_its_gradient():
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(GeluTanh.apply, (x[::40].detach().clone().requires_grad_(),))
    ours = GeluTanh.apply(x)
    theirs = torch.nn.functional.gelu(x, approximate="tanh")
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    grad = torch.randn_like(x)
    torch.testing.assert_close(
        torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(theirs, x, grad)[0], atol=1e-12, rtol=1e-12
    )
    x32 = x.detach().float().requires_grad_()
    torch.testing.assert_close(
        torch.autograd.grad(GeluTanh.apply(x32), x32, grad.float())[0],
        torch.autograd.grad(torch.nn.functional.gelu(x32, approximate="tanh"), x32, grad.float())[0],
        atol=2e-6,
        rtol=1e-5,
    )
