"""Evaluate checkpoints: gold reward, proxy reward, KL to a reference, win rates and Elo.

Every model answers the same held-out prompts once (same sampler, same settings). Scoring runs
through the TextBandit machinery itself (:func:`rlhf_envs.text_bandit.score_responses` with the
reference as the env's ``ref_model`` and the gold reward as its reward model).

The KL to the reference, ``KL(pi || ref)`` over whole responses, is reported two ways, both
averaged over prompts and both unbiased for the same quantity:

- ``kl_to_<ref>``: at every position of each sampled response, the exact KL between the two
  next-token distributions (a sum over the vocabulary, the env's ``exact`` estimator), summed over
  the response. By the chain rule its mean over sampled responses is the sequence-level KL; it
  averages out the choice of each token, so its standard error is several times smaller than k1's
  (:mod:`rlhf_envs.kl`). The pipeline's KL budget and its snapshot choice use this one.
- ``kl_to_<ref>_k1``: the sampled log-ratio ``log pi(y|x) - log ref(y|x)`` summed over the
  response (the k1 estimate the agents train against).

Each comes with its standard error over prompts (``..._stderr``).

``repetition`` is the share of responses in which one word runs four or more times in a row ("my
my my my"): the mark of a policy that has collapsed into a loop, which a mean KL or reward can hide.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from agents.elo import elo_ratings, win_rate
from rlhf_envs.lm.loading import load_causal_lm
from rlhf_envs.lm.sampling import Generation, SamplingConfig, generate, processed_logprobs, response_logprobs
from rlhf_envs.lm.views import packed_view
from rlhf_envs.lm.views import response_hidden as packed_response_hidden
from rlhf_envs.text_bandit import score_responses
from rlhf_envs.text_common import TextTask, response_hidden
from rlhf_envs.validation import check_config_fields


@dataclass
class EvalConfig:
    """What to evaluate and how."""

    models: dict = field(default_factory=dict, metadata={"help": "name -> local causal-LM directory, e.g. {\"sft\": "
                                                                 "\"runs/p/sft\"}"})
    reference: str = field(default="sft", metadata={"help": "name (in models) of the reference for KL and win rates"})
    gold_reward: str = field(default="sentiment", metadata={"help": "reward plugin that judges (the gold reward)"})
    reward_model_path: str | None = field(default=None, metadata={"help": "a learned reward model directory: reported "
                                                                          "as the proxy reward"})
    prompts: list | None = field(default=None, metadata={"help": "evaluation prompts; None = corpus prompts from "
                                                                 "prompt_seed"})
    n_prompts: int = field(default=256, metadata={"help": "how many distinct corpus prompts when prompts is None"})
    prompt_seed: int = field(default=12345, metadata={"help": "seed of the corpus prompts (the grammar has about "
                                                              "1,500 distinct openings, so another seed's training "
                                                              "prompts may include some; rlhf pipeline keeps its "
                                                              "evaluation prompts out of training)"})
    max_new_tokens: int = field(default=24, metadata={"help": "longest response"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of every model"})
    seed: int = field(default=0, metadata={"help": "sampling seed (each model samples with the same one)"})
    batch_size: int = field(default=128, metadata={"help": "prompts per generation batch"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        check_config_fields(self)
        if len(self.models) < 1:
            raise ValueError("EvalConfig.models is empty: give name=PATH pairs of model directories")
        if self.reference not in self.models:
            raise ValueError(f"EvalConfig.reference {self.reference!r} is not one of the models {sorted(self.models)}")
        if self.n_prompts < 1 or self.batch_size < 1:
            raise ValueError(f"n_prompts and batch_size must be positive, got {self.n_prompts} and {self.batch_size}")


@dataclass
class ModelSamples:
    """One model's answers: texts and per-prompt judgements."""

    responses: list[str]
    gold: np.ndarray
    kl: np.ndarray
    proxy: np.ndarray | None
    kl_k1: np.ndarray | None = None
    """per response, the sampled log-ratio summed (``kl`` itself is the task's estimator; see the module docstring)."""


def sample_and_score(task: TextTask, model, config: EvalConfig, proxy=None) -> ModelSamples:
    """Sample one response per prompt of ``task`` and score it (gold reward, KL to the task's reference).

    With ``task.kl_estimator == "exact"`` the model's full next-token distributions along each
    response come from one teacher-forced forward after sampling (the sampler keeps only the
    sampled tokens' log-probs), so ``kl`` is the per-position exact KL summed over the response.
    """
    generator = torch.Generator().manual_seed(config.seed)
    exact = task.kl_estimator == "exact"
    responses, gold, kl, kl_k1 = [], [], [], []
    n = len(task.prompts)
    for start in range(0, n, config.batch_size):
        idx = np.arange(start, min(start + config.batch_size, n))
        prompt_ids, prompt_mask = task.prompt_ids[idx], task.prompt_mask[idx]
        with torch.inference_mode():
            gen = generate(model, prompt_ids, prompt_mask, task.sampling, eos_token_id=task.eos_token_id,
                           pad_token_id=task.pad_token_id, generator=generator)
        width = task.max_new_tokens
        tokens = torch.full((len(idx), width), task.pad_token_id, dtype=torch.long)
        tokens[:, :gen.response_ids.shape[1]] = gen.response_ids
        logprobs = torch.zeros(len(idx), width)
        logprobs[:, :gen.logprobs.shape[1]] = gen.logprobs
        full = None
        if exact:
            full = torch.zeros(len(idx), width, task.vocab_size)
            full[:, :gen.response_ids.shape[1]] = _full_logprobs(model, prompt_ids, prompt_mask, gen, task.sampling)
        _, info = score_responses(task, idx, tokens.numpy(), (logprobs, full))
        responses.extend(info["response"].tolist())
        gold.append(info["score"])
        kl.append(info["kl"])
        kl_k1.append((info["logprobs"] - info["ref_logprobs"]).sum(-1))
    proxy_scores = None
    if proxy is not None:
        proxy_scores = np.asarray(proxy.score(list(task.prompts), responses), dtype=np.float64)
    return ModelSamples(responses, np.concatenate(gold), np.concatenate(kl), proxy_scores, np.concatenate(kl_k1))


@torch.inference_mode()
def _full_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, gen: Generation,
                   cfg: SamplingConfig) -> torch.Tensor:
    """``[B, T, V]`` the model's processed next-token log-distributions along ``gen``'s responses (0 past them).

    A GPT-2 or Llama-family model runs its packed forward (no padding, the LM head only where a
    response token is predicted); any other model :func:`rlhf_envs.lm.sampling.response_logprobs`.
    """
    view = packed_view(model)
    if view is None:
        full = response_logprobs(model, prompt_ids, prompt_mask, gen.response_ids, gen.response_mask, cfg,
                                 return_full=True)[1]
        return full.masked_fill(~gen.response_mask[..., None], 0.0)
    hidden = (response_hidden if view.path == "gpt2" else packed_response_hidden)(
        view, prompt_ids, prompt_mask, gen.response_ids, gen.response_mask)
    picked = processed_logprobs(view.logits(hidden).float(), cfg)
    full = picked.new_zeros(gen.response_mask.shape + picked.shape[-1:])
    full[gen.response_mask] = picked
    return full


_LOOP = re.compile(r"\b(\w+)(?:\W+\1\b){3}", re.IGNORECASE)


def repetition_rate(responses: list[str]) -> float:
    """Share of ``responses`` in which one word runs four or more times in a row (case-insensitive)."""
    return sum(bool(_LOOP.search(r)) for r in responses) / len(responses) if responses else 0.0


def _mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def evaluate_models(config: EvalConfig) -> dict:
    """Rows per model (gold, proxy, KL to reference, win rate vs reference, Elo) and the samples."""
    from rlhf_envs.corpus import distinct_prompts
    from rlhf_envs.rewards import make_reward_model

    prompts = config.prompts or distinct_prompts(config.n_prompts, config.prompt_seed)
    task = TextTask(config.models[config.reference], config.gold_reward, prompts, beta=0.0, kl_estimator="exact",
                    max_new_tokens=config.max_new_tokens, temperature=config.temperature)
    proxy = make_reward_model("learned", path=config.reward_model_path) if config.reward_model_path else None
    samples: dict[str, ModelSamples] = {}
    for name, path in tqdm(config.models.items(), desc="evaluate", disable=not config.progress):
        model = task.ref_model if name == config.reference else load_causal_lm(path)[0]
        samples[name] = sample_and_score(task, model, config, proxy)
    ref = samples[config.reference]
    elo = elo_ratings({name: s.gold for name, s in samples.items()}) if len(samples) > 1 else {config.reference: 1000.0}
    rows = []
    for name, s in samples.items():
        kl, kl_stderr = _mean_and_stderr(s.kl)
        kl_k1, kl_k1_stderr = _mean_and_stderr(s.kl_k1)
        rows.append({
            "model": name,
            "gold_reward": float(s.gold.mean()),
            "proxy_reward": None if s.proxy is None else float(s.proxy.mean()),
            f"kl_to_{config.reference}": kl,
            f"kl_to_{config.reference}_stderr": kl_stderr,
            f"kl_to_{config.reference}_k1": kl_k1,
            f"kl_to_{config.reference}_k1_stderr": kl_k1_stderr,
            f"win_rate_vs_{config.reference}": win_rate(s.gold, ref.gold),
            "elo": elo[name],
            "repetition": repetition_rate(s.responses),
        })
    examples = [{"prompt": p, **{name: s.responses[i] for name, s in samples.items()}} for i,
                p in enumerate(prompts[:8])]
    return {"rows": rows, "elo": elo, "examples": examples, "n_prompts": len(prompts), "reference": config.reference}


def write_eval(result: dict, path: Path) -> Path:
    """Save an evaluation as JSON (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    return path
