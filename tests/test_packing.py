"""Packed training batches (rlhf_envs.lm.packing): the same log-probs, rewards and gradients as one sequence at a
time."""

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

import rlhf_envs.lm.packing
from rlhf_envs.lm.gpt2 import gpt2_view
from rlhf_envs.lm.packing import pack_sequences

PAD = 1


def _config(**overrides) -> GPT2Config:
    base = dict(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=50, bos_token_id=0, eos_token_id=0,
                pad_token_id=PAD, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2Config(**{**base, **overrides})


def _sequences() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, 50, (5,), generator=g)

    def rand(n: int) -> torch.Tensor:
        return torch.randint(2, 50, (n,), generator=g)

    answer = rand(3)
    return [
        torch.cat([prompt, rand(4)]), torch.cat([prompt, rand(7)]),  # a shared prompt
        rand(3), rand(9), rand(6),  # nothing shared (beyond chance)
        torch.cat([prompt, prompt]), prompt.clone(),  # one sequence is the other's prefix
        *[torch.cat([prompt, rand(2)])] * 3,  # identical sequences
        # the beginning of the prompt, then answer tokens, shared
        torch.cat([prompt[:3], answer, rand(2)]), torch.cat([prompt[:3], answer, rand(4)]),
    ]


STARTS = [5, 5, 1, 2, 1, 5, 4, 5, 5, 5, 3, 3]


def _distinct_prefixes(sequences: list[torch.Tensor]) -> int:
    return len({tuple(seq[:n].tolist()) for seq in sequences for n in range(1, len(seq) + 1)})


@pytest.fixture(params=["segments", "rows", "wide"])
def layout(request, monkeypatch):
    """Attention on the segment layout (several sequences per grid row, the CPU default), one causal row per
    sequence, or ("wide") rows too wide for the segment layout without gradients (a reference pass then takes causal
    rows)."""
    if request.param == "rows":
        monkeypatch.setattr(rlhf_envs.lm.packing, "SEGMENT_ATTENTION_BYTES", 0)
    if request.param == "wide":
        monkeypatch.setattr(rlhf_envs.lm.packing, "SEGMENT_INFERENCE_WIDTH", 0)
    return request.param


def test_segment_layout_shares_rows_and_keeps_sequences_apart():
    batch = pack_sequences(_sequences())
    seg = batch.segments
    assert seg is not None and seg.rows < len(batch.sequences)
    width = seg.allowed.shape[-1]
    allowed = seg.allowed[:, 0].reshape(-1, width)  # [R * W, W]: query cell -> the key cells of its row it may read
    for index in batch.index:
        for j, token in enumerate(index.tolist()):
            cell = int(seg.owner[token])  # the cell whose output this token takes: it sees its sequence up to itself
            assert seg.gather.view(-1, width)[cell // width][allowed[cell]].tolist() == index[: j + 1].tolist()


def test_each_distinct_prefix_is_laid_out_once():
    sequences = _sequences()
    batch = pack_sequences(sequences)
    assert len(batch.tokens) == _distinct_prefixes(sequences) == (5 + 4 + 7) + (3 + 9 + 6) + 5 + 2 + (3 + 2 + 4)
    for seq, index in zip(batch.sequences, batch.index):
        assert torch.equal(batch.tokens[index], seq)
        assert torch.equal(batch.positions[index], torch.arange(len(seq)))
    for token, cell in enumerate(batch.owner.tolist()):  # each token takes its output from a row that has it
        assert batch.grid.reshape(-1)[cell] == token


@pytest.mark.parametrize("seed", range(5))
def test_prefix_tree_on_random_batches(seed):
    """Few distinct tokens, so that sequences share prefixes of every length (and some are equal)."""
    g = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(0, 3, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g) for _ in range(40)]
    for drop_last in (False, True):
        batch = pack_sequences(sequences, drop_last=drop_last)
        cut = [seq[:-1] if drop_last and len(seq) > 1 else seq for seq in sequences]
        assert len(batch.tokens) == _distinct_prefixes(cut)
        for seq, index in zip(cut, batch.index):
            assert torch.equal(batch.tokens[index], seq)
            assert torch.equal(batch.positions[index], torch.arange(len(seq)))


def test_drop_last_leaves_each_last_token_out_and_keeps_it_a_target():
    sequences = _sequences()
    batch, full = pack_sequences(sequences, drop_last=True), pack_sequences(sequences)
    # each sequence less its last token: the prefix tree of the cut sequences (the prompt's fifth token,
    # which the shorter of prompt + prompt and prompt ends on, is still packed for the longer one)
    assert len(batch.tokens) == _distinct_prefixes([seq[:-1] for seq in sequences]) == \
        (5 + 3 + 6) + (2 + 8 + 5) + 4 + 1 + (3 + 1 + 3)
    for seq, index in zip(batch.sequences, batch.index):
        assert torch.equal(batch.tokens[index], seq[:-1])
    (predictor, targets, sequence), (full_predictor, full_targets,
                                     full_sequence) = batch.targets(STARTS), full.targets(STARTS)
    assert torch.equal(targets, full_targets) and torch.equal(sequence, full_sequence)
    assert torch.equal(batch.tokens[predictor], full.tokens[full_predictor])  # the same predicting tokens
    with pytest.raises(ValueError, match="drop_last"):
        batch.last_index(PAD)
    one = pack_sequences([torch.tensor([7]), torch.tensor([3, 4])],
                         drop_last=True)  # a one-token sequence keeps its token
    assert sorted(one.tokens.tolist()) == [3, 7] and one.targets([1, 1])[1].tolist() == [4]


@pytest.mark.parametrize("drop_last", [False, True])
def test_logprobs_and_gradients_equal_one_sequence_at_a_time(layout, drop_last):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(_config()).train()  # train mode: no dropout to apply, so the lean path is exact
    view = gpt2_view(model)
    assert view is not None
    batch = pack_sequences(_sequences(), drop_last=drop_last)
    starts = STARTS
    targets = batch.distinct_targets(starts)
    assert len(targets[0]) < len(targets[1])  # shared predicting tokens run the LM head once
    packed = batch.sequence_logps(view, *targets)
    packed.sum().backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    alone = []
    for seq, start in zip(batch.sequences, starts):
        logits = model(input_ids=seq[None]).logits[0]
        alone.append(-F.cross_entropy(logits[start - 1 : -1], seq[start:], reduction="sum"))
    alone = torch.stack(alone)
    alone.sum().backward()
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():  # a reference pass: in-place GELU, and attention as the layout says
        torch.testing.assert_close(batch.sequence_logps(view, *targets), alone.detach(),
                                   atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_autocast_stays_finite(layout):
    """Under bf16 autocast the additive mask's float32 minimum becomes -inf: a grid cell no token uses must
    still allow one key, or its softmax is NaN and the NaN reaches every gradient through the backward pass."""
    batch = pack_sequences(_sequences())
    assert batch.segments.allowed.any(-1).all()  # every query cell, used or not, may read some key
    torch.manual_seed(0)
    model = GPT2LMHeadModel(_config()).train()
    view = gpt2_view(model)
    targets = batch.distinct_targets(STARTS)
    exact = batch.sequence_logps(view, *targets).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = batch.sequence_logps(view, *targets)
    low.sum().backward()
    assert torch.isfinite(low).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(low.float(), exact, atol=0.5, rtol=0.05)


def test_rewards_pool_where_hugging_face_pools(layout):
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(_config(num_labels=1)).eval()
    view = gpt2_view(model)
    assert view is not None and view.score is not None and view.lm_head is None
    sequences = [torch.tensor([3, 4, 5, PAD]), torch.tensor([3, 4, 6]), torch.tensor([PAD, PAD]), torch.tensor([7])]
    batch = pack_sequences(sequences)
    with torch.no_grad():
        hidden = view.final_norm(batch.hidden(view)[batch.last_index(PAD)])
        packed = F.linear(hidden, view.score)[:, 0]
        alone = torch.stack([model(input_ids=seq[None]).logits[0, 0] for seq in batch.sequences])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_view_only_without_active_dropout():
    torch.manual_seed(0)
    assert gpt2_view(GPT2LMHeadModel(_config()).train()) is not None
    with_dropout = GPT2LMHeadModel(_config(resid_pdrop=0.1))
    assert gpt2_view(with_dropout.train()) is None
    assert gpt2_view(with_dropout.eval()) is not None


EMPTY = torch.tensor([], dtype=torch.long)


@pytest.mark.parametrize("sequences", [[], [EMPTY], [torch.tensor([3]), EMPTY]])
def test_empty_input_is_an_error(sequences):
    with pytest.raises(ValueError, match="pack_sequences"):
        pack_sequences(sequences)
