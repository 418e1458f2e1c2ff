"""TextBanditExact: a text bandit small enough to enumerate, so its KL-regularised optimum is known.

Six symbols ``a``..``f`` and EOS, responses of up to five tokens (9,331 per prompt), four prompts,
a committed reference GPT-2 (about 30k parameters) and a hidden scoring rule. Every algorithm's
policy can be scored exactly against ``pi*`` with :mod:`rlhf_envs.text_solver`.

Rebuild the reference (seeded, one CPU thread, 20 s of CPU time)::

    python -m rlhf_envs.text_bandit_exact            # writes rlhf_envs/assets/text_exact/
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf_envs.text_bandit import TextBanditEnv, TextBanditVectorEnv

__all__ = ["MAX_NEW_TOKENS", "PROMPTS", "REFERENCE_DIR", "SYMBOLS", "BradleyTerryRewardModel",
           "TextBanditExactEnv", "TextBanditExactVectorEnv", "build_reference", "make_symbol_tokenizer",
           "target", "true_score"]

SYMBOLS = "abcdef"
EOS = "<eos>"
MAX_NEW_TOKENS = 5
PROMPTS = ["a", "db", "fed", "ce"]
REFERENCE_DIR: Path = Path(__file__).resolve().parent / "assets" / "text_exact"
TARGET_LENGTH = 3
LENGTH_PENALTY = 0.5


def make_symbol_tokenizer(symbols: str = SYMBOLS) -> Any:
    """A character tokenizer: one id per symbol (in order), then ``<eos>`` (also the pad token).

    No special tokens are added when encoding; characters outside ``symbols`` are dropped.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(symbols)}
    vocab[EOS] = len(symbols)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS, padding_side="left")


def target(prompt: str) -> str:
    """The hidden rule's target response to ``prompt``: ``TARGET_LENGTH`` symbols stepping through the
    alphabet from ``(sum of the prompt's symbol indices + its length) mod 6``, upwards for odd-length
    prompts, downwards for even ones (``"a" -> "bcd"``, ``"db" -> "afe"``)."""
    n = len(SYMBOLS)
    start = (sum(SYMBOLS.index(c) for c in prompt) + len(prompt)) % n
    step = 1 if len(prompt) % 2 else -1
    return "".join(SYMBOLS[(start + step * i) % n] for i in range(TARGET_LENGTH))


def true_score(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """The hidden scoring rule, float32 ``[N]`` in ``[-1.5, 3]``: one point per position that matches
    :func:`target` and ``-0.5`` per symbol of length away from ``TARGET_LENGTH``."""
    out = np.empty(len(responses), dtype=np.float32)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        matches = sum(a == b for a, b in zip(response, target(prompt)))
        out[i] = matches - LENGTH_PENALTY * abs(len(response) - TARGET_LENGTH)
    return out


def _synthetic_responses(rng: np.random.Generator, n: int) -> tuple[list[int], list[str]]:
    """``n`` (prompt index, response) draws from a seeded Markov chain: the reference's training data.

    Per prompt a Dirichlet first-symbol distribution; one shared Dirichlet transition matrix; each
    step ends the response with probability 0.3 (up to ``MAX_NEW_TOKENS`` symbols).
    """
    k = len(SYMBOLS)
    first = rng.dirichlet(np.ones(k), size=len(PROMPTS))
    transition = rng.dirichlet(np.full(k, 0.5), size=k)
    prompt_index = rng.integers(len(PROMPTS), size=n).tolist()
    responses = []
    for i in prompt_index:
        symbols = [rng.choice(k, p=first[i])] if rng.random() > 0.3 else []
        while symbols and len(symbols) < MAX_NEW_TOKENS and rng.random() > 0.3:
            symbols.append(rng.choice(k, p=transition[symbols[-1]]))
        responses.append("".join(SYMBOLS[s] for s in symbols))
    return prompt_index, responses


def build_reference(out_dir: str | Path = REFERENCE_DIR, seed: int = 0, steps: int = 600) -> tuple[Any, Any]:
    """Train the reference GPT-2 on :func:`_synthetic_responses` and save it with its tokenizer in ``out_dir``.

    Seeded, one torch thread (so the same seed gives the same weights); returns ``(model, tokenizer)``.
    The loss covers response tokens and EOS only; prompts are conditioning.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer = make_symbol_tokenizer()
        eos = tokenizer.eos_token_id
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=len(SYMBOLS) + 1, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0)
        model = GPT2LMHeadModel(config)
        rng = np.random.default_rng(seed)
        prompt_index, responses = _synthetic_responses(rng, 8192)
        width = max(len(p) for p in PROMPTS) + MAX_NEW_TOKENS + 1
        ids = torch.full((len(responses), width), eos, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        for row, (i, response) in enumerate(zip(prompt_index, responses)):
            p = tokenizer(PROMPTS[i])["input_ids"]
            r = tokenizer(response)["input_ids"][:MAX_NEW_TOKENS]
            r = r + [eos] if len(r) < MAX_NEW_TOKENS else r
            ids[row, :len(p) + len(r)] = torch.tensor(p + r)
            labels[row, len(p):len(p) + len(r)] = torch.tensor(r)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(steps):
            batch = torch.randint(len(ids), (256,), generator=generator)
            loss = model(input_ids=ids[batch], labels=labels[batch]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
    finally:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model, tokenizer


def _features(prompt_index: np.ndarray, responses: Sequence[str]) -> np.ndarray:
    """``[N, F]`` one-hot features of the learned RM, per prompt: first symbol, symbol bigrams, length.

    It cannot express "symbol s at position 2", so it is a misspecified proxy of the true rule.
    """
    k, n_prompts = len(SYMBOLS), len(PROMPTS)
    per_prompt = (k + 1) + k * k + (MAX_NEW_TOKENS + 1)
    x = np.zeros((len(responses), n_prompts * per_prompt), dtype=np.float64)
    for row, (p, text) in enumerate(zip(prompt_index, responses)):
        base = int(p) * per_prompt
        x[row, base + (SYMBOLS.index(text[0]) if text else k)] = 1.0
        for a, b in itertools.pairwise(text):
            x[row, base + k + 1 + SYMBOLS.index(a) * k + SYMBOLS.index(b)] += 1.0
        x[row, base + k + 1 + k * k + len(text)] = 1.0
    return x


class BradleyTerryRewardModel:
    """A linear reward model fitted to Bradley-Terry preferences between reference samples.

    ``n_pairs`` pairs per prompt are drawn from ``pi_ref`` (exactly, from the enumerated
    distribution); the first is preferred with probability ``sigmoid(r1 - r2)`` under
    :func:`true_score`; weights maximise the Bradley-Terry likelihood (L2 ``1e-3``) over
    :func:`_features`. ``score(prompts, responses)`` returns float32 ``[N]``.
    """

    def __init__(self, weights: np.ndarray, accuracy: float):
        self.weights = weights
        self.accuracy = accuracy
        """agreement with the true rule's preference on fresh reference pairs (no label noise)."""

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        index = np.array([PROMPTS.index(p) for p in prompts])
        return (_features(index, responses) @ self.weights).astype(np.float32)


@functools.lru_cache(maxsize=4)
def learned_reward_model(n_pairs: int = 2000, seed: int = 0) -> BradleyTerryRewardModel:
    """The :class:`BradleyTerryRewardModel` on ``n_pairs`` reference pairs per prompt (seeded, cached)."""
    from rlhf_envs.text_solver import enumerate_env

    enum = enumerate_env(TextBanditEnv(model=str(REFERENCE_DIR), reward_model=true_score, prompts=PROMPTS,
                                       max_new_tokens=MAX_NEW_TOKENS))
    rng = np.random.default_rng(seed)
    probs = np.exp(enum.ref_logprobs)
    probs /= probs.sum(1, keepdims=True)

    def draw(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = np.repeat(np.arange(len(PROMPTS)), count)
        first = np.concatenate([rng.choice(len(enum.texts), count, p=row) for row in probs])
        second = np.concatenate([rng.choice(len(enum.texts), count, p=row) for row in probs])
        return p, first, second

    p, a, b = draw(n_pairs)
    diff = enum.rewards[p, a] - enum.rewards[p, b]
    label = rng.random(len(diff)) < 1.0 / (1.0 + np.exp(-diff))
    features = torch.as_tensor(_features(p, [enum.texts[i] for i in a]) - _features(p, [enum.texts[i] for i in b]))
    sign = torch.as_tensor(np.where(label, 1.0, -1.0))
    w = torch.zeros(features.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.softplus(-sign * (features @ w)).mean() + 1e-3 * (w ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weights = w.detach().numpy()
    p, a, b = draw(1000)
    true_diff = enum.rewards[p, a] - enum.rewards[p, b]
    fitted = (_features(p, [enum.texts[i] for i in a]) - _features(p, [enum.texts[i] for i in b])) @ weights
    decided = true_diff != 0
    accuracy = float(np.mean(np.sign(fitted[decided]) == np.sign(true_diff[decided])))
    return BradleyTerryRewardModel(weights, accuracy)


def _reward(reward: str, n_preference_pairs: int, preference_seed: int) -> Any:
    if reward == "true":
        return true_score
    if reward == "learned":
        return learned_reward_model(n_preference_pairs, preference_seed)
    raise ValueError(f"reward must be 'true' (the hidden rule) or 'learned' (a Bradley-Terry RM), got {reward!r}")


def _task_kwargs(reward: str, n_preference_pairs: int, preference_seed: int, **kwargs: Any) -> dict:
    if not REFERENCE_DIR.is_dir():
        raise FileNotFoundError(f"the reference model {REFERENCE_DIR} is missing: rebuild it with "
                                "`python -m rlhf_envs.text_bandit_exact`")
    return dict(model=str(REFERENCE_DIR), reward_model=_reward(reward, n_preference_pairs, preference_seed),
                prompts=PROMPTS, max_new_tokens=MAX_NEW_TOKENS, **kwargs)


class TextBanditExactEnv(TextBanditEnv):
    """:class:`rlhf_envs.text_bandit.TextBanditEnv` on an enumerable task: its optimum is known exactly.

    ## Action Space
    ``MultiDiscrete([7] * 5)``: token ids ``0..5`` are the symbols ``a..f``, ``6`` is EOS (also the pad
    id). The response runs up to and including the first EOS, or five symbols without one.

    ## Observation Space
    ``Box(0, 6, (3,), int64)``: one of :data:`PROMPTS` (symbol strings), left-padded with EOS.

    ## Rewards
    ``score - beta * KL`` as in TextBandit. ``reward="true"``: :func:`true_score`, a hidden rule
    (one point per position matching a prompt-dependent three-symbol :func:`target`, ``-0.5`` per
    symbol of length away from three; ``[-1.5, 3]``). ``reward="learned"``: a
    :class:`BradleyTerryRewardModel` fitted to ``n_preference_pairs`` preference pairs per prompt
    drawn from the reference (``preference_seed``), a misspecified proxy of the true rule.

    The reference ``pi_ref`` is a 2-layer GPT-2 committed in ``rlhf_envs/assets/text_exact`` (built by
    :func:`build_reference` from a seeded synthetic distribution). The optimum of
    ``E[score] - beta * KL(pi || pi_ref)`` is ``pi* ∝ pi_ref exp(score / beta)``:
    :func:`rlhf_envs.text_solver.solve` computes it and :func:`rlhf_envs.text_solver.objective` the
    exact ``J`` and ``KL(pi || pi*)`` of any policy.

    ## Starting State, Episode End, Info
    As TextBandit: a prompt drawn uniformly (``options={"prompt_index": i}`` picks one); one step;
    the same ``info`` keys and the same KL mechanism (``set_policy_logprobs``).

    ## Arguments
    ``reward``, ``n_preference_pairs``, ``preference_seed`` (above); ``beta``, ``kl_estimator``,
    ``kl_setpoint``, ``kl_horizon``, ``temperature``, ``device``, ``render_mode`` as in TextBandit.

    ## Version History
    - v0: initial version.
    """

    def __init__(self, reward: str = "true", beta: float = 0.5, kl_estimator: str = "k1",
                 kl_setpoint: float | None = None, kl_horizon: float = 10000.0, temperature: float = 1.0,
                 n_preference_pairs: int = 2000, preference_seed: int = 0, device: str = "cpu",
                 render_mode: str | None = None):
        super().__init__(**_task_kwargs(reward, n_preference_pairs, preference_seed, beta=beta,
                                        kl_estimator=kl_estimator, kl_setpoint=kl_setpoint, kl_horizon=kl_horizon,
                                        temperature=temperature, device=device), render_mode=render_mode)


class TextBanditExactVectorEnv(TextBanditVectorEnv):
    """``num_envs`` TextBanditExact episodes as one batch (:class:`rlhf_envs.text_bandit.TextBanditVectorEnv`)."""

    def __init__(self, num_envs: int = 1, render_mode: str | None = None, reward: str = "true",
                 n_preference_pairs: int = 2000, preference_seed: int = 0, **kwargs: Any):
        super().__init__(num_envs, render_mode, **_task_kwargs(reward, n_preference_pairs, preference_seed, **kwargs))


if __name__ == "__main__":
    build_reference()
    print(f"wrote {REFERENCE_DIR}")
