"""Every LM algorithm against the exact KL-regularised optimum of ``TextBanditExact-v0``.

The env's responses can be enumerated (9,331 per prompt), so :mod:`rlhf_envs.text_solver` gives
``pi*``, ``J* = beta log Z`` and, for each trained policy, the exact ``E[r]``, ``KL(pi || pi_ref)``,
``KL(pi || pi*)`` and the fraction of the achievable gain it closed,
``(J(pi) - J(pi_ref)) / (J* - J(pi_ref))``. Nothing here is sampled except the training itself.

1. The exact reward-KL frontier, and at each benchmarked ``beta`` one point per algorithm and seed:
   RLHF PPO (:mod:`agents.lm_ppo`, the true reward, k1 in the reward), DPO (:mod:`agents.dpo`, on
   ``N`` pairs drawn from the reference and labelled by Bradley-Terry on the true reward, DPO's beta
   = the env's) and SFT on best-of-n samples of the reference (:mod:`agents.sft`).
2. DPO's ``KL(pi || pi*)`` against the number of pairs ``N``.
3. The KL estimators (k1, k2, k3, exact) summed over a response: their mean and spread against the
   exact ``KL(pi || pi_ref)`` of PPO's trained policy, by enumeration (the estimator *in the reward*);
   and *in the loss* (GRPO's use): the gradient of ``E_{y ~ pi (detached)}[sum_t k_t]`` against the
   exact gradient of ``KL(pi || pi_ref)``, as a cosine and a norm ratio.

Another algorithm joins by adding a ``train(enum, beta, seed, workdir) -> policy LM`` to
:data:`TRAINERS` (GRPO, RLOO, ...); :func:`frontier_point` scores any trained policy.

    python -m benchmarks.bench_frontier           # writes results/frontier.json and results/frontier.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, print_table, write_json
from rlhf_envs.text_bandit_exact import (
    MAX_NEW_TOKENS,
    PROMPTS,
    REFERENCE_DIR,
    TextBanditExactEnv,
    true_score,
)
from rlhf_envs.text_solver import (
    Enumeration,
    enumerate_env,
    estimator_moments,
    frontier,
    objective,
    solve,
)

TARGET = 0.95
BETAS = (0.5, 1.0)
SEEDS = (0, 1, 2)
DPO_PAIRS = (1000, 4000, 16000, 64000)
DPO_POINT_PAIRS = 16000
"""pairs of the DPO points on the frontier; the N curve (at the first beta, first seed) goes to 64000."""
BEST_OF_N = 16


def _load(path: Path) -> torch.nn.Module:
    from rlhf_envs.lm import load_causal_lm

    return load_causal_lm(path)[0]


def sample_reference(enum: Enumeration, rng: np.random.Generator, per_prompt: int) -> np.ndarray:
    """``[X, per_prompt]`` indices of responses drawn exactly from pi_ref (one row per prompt)."""
    probs = np.exp(enum.ref_logprobs)
    probs /= probs.sum(1, keepdims=True)
    return np.stack([rng.choice(len(enum.texts), per_prompt, p=row) for row in probs])


def train_ppo(enum: Enumeration, beta: float, seed: int, workdir: Path) -> torch.nn.Module:
    """RLHF PPO on the true reward at fixed ``beta`` (k1 KL in the reward).

    The learning rate is annealed to 0: near the optimum a constant one leaves the policy jittering
    with the sampling noise (closed gain 0.92-0.95 after 100-200 iterations at 2e-3 to 5e-3, beta 0.5).
    ``gae_lambda=1``: the value head is then only a baseline, and its bias does not bias the update.
    """
    from agents.lm_ppo import LMPPOConfig, train_lm_ppo

    config = LMPPOConfig(model_path=str(REFERENCE_DIR), reward_model=true_score, prompts=PROMPTS,
                         max_new_tokens=MAX_NEW_TOKENS, beta=beta, output_dir=str(workdir), seed=seed,
                         total_episodes=512 * 120, batch_size=512, learning_rate=4e-3, anneal_lr=True,
                         gae_lambda=1.0, max_approx_kl=None, progress=False, torch_threads=1)
    train_lm_ppo(config)
    return _load(workdir / "policy")


def write_dpo_pairs(enum: Enumeration, n_pairs: int, seed: int, path: Path) -> None:
    """``n_pairs`` reference pairs (spread evenly over the prompts), the first preferred with
    probability ``sigmoid(r1 - r2)`` under the true reward, as JSONL ``prompt/chosen/rejected``."""
    rng = np.random.default_rng(seed)
    per_prompt = max(1, n_pairs // len(enum.prompts))
    first, second = sample_reference(enum, rng, per_prompt), sample_reference(enum, rng, per_prompt)
    with open(path, "w") as f:
        for x, prompt in enumerate(enum.prompts):
            for a, b in zip(first[x], second[x]):
                p_first = 1.0 / (1.0 + np.exp(enum.rewards[x, b] - enum.rewards[x, a]))
                chosen, rejected = (a, b) if rng.random() < p_first else (b, a)
                f.write(json.dumps({"prompt": prompt, "chosen": enum.texts[chosen],
                                    "rejected": enum.texts[rejected]}) + "\n")


def train_dpo(enum: Enumeration, beta: float, seed: int, workdir: Path, n_pairs: int = DPO_POINT_PAIRS
              ) -> torch.nn.Module:
    """DPO (DPO's beta = ``beta``) on ``n_pairs`` Bradley-Terry-labelled reference pairs."""
    from agents.dpo import DPOConfig
    from agents.dpo import train_dpo as run_dpo

    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "pairs.jsonl"
    write_dpo_pairs(enum, n_pairs, seed, data)
    steps = max(200, 2 * n_pairs // 64)  # two epochs: more steps barely move KL(pi || pi*) (0.64 -> 0.59 at N = 16000)
    run_dpo(DPOConfig(model_path=str(REFERENCE_DIR), data_path=str(data), output_dir=str(workdir / "model"),
                      beta=beta, learning_rate=1e-3, batch_size=64, max_steps=steps, max_length=16,
                      eval_fraction=0.0, seed=seed, progress=False, torch_threads=1, log_every=50))
    return _load(workdir / "model")


def train_sft_best_of_n(enum: Enumeration, beta: float, seed: int, workdir: Path, n: int = BEST_OF_N
                        ) -> torch.nn.Module:
    """SFT on the best (true reward) of ``n`` reference samples, 1024 examples per prompt; ``beta`` unused."""
    from agents.sft import SFTConfig, train_sft

    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = workdir / "best_of_n.jsonl"
    with open(data, "w") as f:
        for x, prompt in enumerate(enum.prompts):
            draws = sample_reference(enum, rng, 1024 * n)[x].reshape(1024, n)
            for row in draws:
                best = row[np.argmax(enum.rewards[x, row])]
                f.write(json.dumps({"prompt": prompt, "completion": enum.texts[best]}) + "\n")
    train_sft(SFTConfig(model_path=str(REFERENCE_DIR), data_path=str(data), output_dir=str(workdir / "model"),
                        learning_rate=1e-3, batch_size=64, num_epochs=3, max_length=16, eval_fraction=0.0,
                        seed=seed, progress=False, torch_threads=1, log_every=50))
    return _load(workdir / "model")


TRAINERS: dict[str, Callable[[Enumeration, float, int, Path], torch.nn.Module]] = {
    "rlhf_ppo": train_ppo,
    "dpo": train_dpo,
    f"sft_best_of_{BEST_OF_N}": train_sft_best_of_n,
}
"""Algorithm name -> ``train(enum, beta, seed, workdir)`` returning the trained policy LM."""


def estimator_loss_gradients(enum: Enumeration, policy: torch.nn.Module, reference: torch.nn.Module
                             ) -> list[dict]:
    """Each estimator put in the loss, exactly: cosine and norm ratio of its gradient against ``grad KL(pi || pi_ref)``.

    The loss is ``sum_y pi(y) sum_t k_t(y)`` with ``pi(y)`` detached (the responses are samples of the
    current policy), summed over prompts; the true gradient differentiates ``sum_y pi(y) log(pi(y) / pi_ref(y))``.
    """
    from rlhf_envs.kl import kl_k1, kl_k2, kl_k3
    from rlhf_envs.text_solver import token_logprobs

    params = [p for p in policy.parameters() if p.requires_grad]
    losses: dict[str, torch.Tensor] = {"true": torch.zeros(()), "k1": torch.zeros(()), "k2": torch.zeros(()),
                                       "k3": torch.zeros(())}
    tokens, mask = enum.tokens, enum.mask
    for ids in enum.prompt_ids:
        ref = token_logprobs(reference, ids, tokens, enum.sampling).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        prompt = torch.tensor(ids).expand(len(tokens), len(ids))
        inputs = torch.cat([prompt, tokens[:, :-1]], dim=1)
        logits = policy(input_ids=inputs, attention_mask=torch.ones_like(inputs), use_cache=False).logits
        logp = torch.log_softmax(logits[:, len(ids) - 1:].float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        logp, ref = logp.masked_fill(~mask, 0.0), ref.masked_fill(~mask, 0.0)
        seq = logp.sum(-1)
        weight = seq.detach().exp()
        losses["true"] = losses["true"] + (seq.exp() * (seq - ref.sum(-1))).sum()
        for name, estimator in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
            losses[name] = losses[name] + (weight * estimator(logp, ref).masked_fill(~mask, 0.0).sum(-1)).sum()
    grads = {name: torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])
             for name, loss in losses.items()}
    true = grads.pop("true")
    return [{"estimator": name, "cosine_to_true_gradient": float(torch.nn.functional.cosine_similarity(g, true, 0)),
             "norm_ratio": float(g.norm() / true.norm())} for name, g in grads.items()]


def frontier_point(enum: Enumeration, algorithm: str, policy: Any, beta: float, seed: int, seconds: float) -> dict:
    """One trained policy scored exactly at ``beta``: a row of the results table."""
    obj = objective(enum, policy, beta)
    return {"algorithm": algorithm, "beta": beta, "seed": seed, "reward": obj.expected_reward, "kl": obj.kl_ref,
            "value": obj.value, "optimal_value": obj.optimal_value, "kl_to_optimum": obj.kl_to_optimum,
            "gain_closed": obj.gain_closed, "train_seconds": seconds}


def _summary(points: list[dict]) -> list[dict]:
    rows = []
    for algorithm in dict.fromkeys(p["algorithm"] for p in points):
        for beta in dict.fromkeys(p["beta"] for p in points):
            runs = [p for p in points if p["algorithm"] == algorithm and p["beta"] == beta]
            if runs:
                rows.append({"algorithm": algorithm, "beta": beta, "seeds": len(runs),
                             "gain_closed_min": min(r["gain_closed"] for r in runs),
                             "gain_closed_median": statistics.median(r["gain_closed"] for r in runs),
                             "kl_to_optimum_median": statistics.median(r["kl_to_optimum"] for r in runs),
                             f"seeds_at_{TARGET}": sum(r["gain_closed"] >= TARGET for r in runs),
                             "median_train_s": statistics.median(r["train_seconds"] for r in runs)})
    return rows


def plot(curve: list[dict], points: list[dict], dpo_curve: list[dict], path: Path) -> None:
    """Left: the exact frontier with every trained policy on it; right: DPO's KL(pi || pi*) against N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot([c["kl"] for c in curve], [c["reward"] for c in curve], "k-", label="exact optimum pi* (frontier)")
    markers = dict(zip(dict.fromkeys(p["algorithm"] for p in points), "os^Dvx"))
    for beta, color in zip(dict.fromkeys(p["beta"] for p in points), ("tab:blue", "tab:orange", "tab:green")):
        star = next(c for c in curve if c["beta"] == beta)
        left.plot(star["kl"], star["reward"], "*", color=color, markersize=14)
        for algorithm, marker in markers.items():
            mine = [p for p in points if p["beta"] == beta and p["algorithm"] == algorithm]
            left.plot([p["kl"] for p in mine], [p["reward"] for p in mine], marker, color=color, alpha=0.8,
                      label=f"{algorithm}, beta={beta}", linestyle="none")
    left.set_xlabel("KL(pi || pi_ref) (nats, exact)")
    left.set_ylabel("E[r] (exact)")
    left.set_title("TextBanditExact-v0: trained policies against the optimum")
    left.legend(fontsize=7)
    for beta in dict.fromkeys(d["beta"] for d in dpo_curve):
        rows = [d for d in dpo_curve if d["beta"] == beta]
        right.loglog([d["n_pairs"] for d in rows], [d["kl_to_optimum"] for d in rows], "o-", label=f"beta={beta}")
    right.axhline(0.1, color="grey", linestyle=":", label="0.1 nats")
    right.set_xlabel("preference pairs N")
    right.set_ylabel("KL(pi_DPO || pi*) (nats)")
    right.set_title("DPO data efficiency")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--betas", type=float, nargs="+", default=list(BETAS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--algorithms", nargs="+", default=list(TRAINERS), choices=list(TRAINERS))
    parser.add_argument("--dpo-pairs", type=int, nargs="+", default=list(DPO_PAIRS))
    parser.add_argument("--quick", action="store_true", help="one beta, one seed, small N (a smoke run, not for the "
                                                             "README)")
    args = parser.parse_args(argv)
    if args.quick:
        args.betas, args.seeds, args.dpo_pairs = args.betas[:1], args.seeds[:1], args.dpo_pairs[:2]
    torch.set_num_threads(1)
    enum = enumerate_env(TextBanditExactEnv())
    curve = frontier(enum, list(np.geomspace(0.15, 8.0, 40)) + args.betas)
    curve.sort(key=lambda c: c["kl"])
    results: dict = {"env": "TextBanditExact-v0", "responses_per_prompt": len(enum.texts), "prompts": enum.prompts,
                     "target_gain_closed": TARGET, "betas": args.betas, "seeds": args.seeds, "frontier": curve}
    print_table("Exact optimum at the benchmarked betas", [
        {"beta": b, "J*": (s := solve(enum, b)).optimal_value, "J(pi_ref)": s.reference_value,
         "E*[r]": s.expected_reward, "KL(pi*||ref)": s.kl_ref} for b in args.betas])

    points, moments, gradients, dpo_curve = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_frontier_") as tmp:
        for beta in args.betas:
            for seed in args.seeds:
                for name in args.algorithms:
                    start = time.perf_counter()
                    policy = TRAINERS[name](enum, beta, seed, Path(tmp) / f"{name}_{beta}_{seed}")
                    points.append(frontier_point(enum, name, policy, beta, seed, time.perf_counter() - start))
                    print_table("", [points[-1]])
                    if name == "rlhf_ppo" and seed == args.seeds[0]:
                        env = TextBanditExactEnv(beta=beta)
                        moments += [{"policy": f"rlhf_ppo beta={beta}", "estimator": k, **v}
                                    for k, v in estimator_moments(env, policy).items()]
                        gradients += [{"policy": f"rlhf_ppo beta={beta}", **row} for row in
                                      estimator_loss_gradients(enum, policy, env.unwrapped.task.ref_model)]
            if "dpo" in args.algorithms:
                for n_pairs in args.dpo_pairs:
                    policy = train_dpo(enum, beta, args.seeds[0], Path(tmp) / f"dpo_n{n_pairs}_{beta}", n_pairs)
                    obj = objective(enum, policy, beta)
                    dpo_curve.append({"beta": beta, "n_pairs": n_pairs, "kl_to_optimum": obj.kl_to_optimum,
                                      "gain_closed": obj.gain_closed})
    summary = _summary(points)
    print_table("Fraction of the achievable gain closed, (J - J_ref) / (J* - J_ref)", summary)
    print_table(f"DPO: KL(pi || pi*) against preference pairs N (seed {args.seeds[0]})", dpo_curve)
    print_table("KL estimators in the reward: summed over a response, exact mean and spread under the policy", moments)
    print_table("KL estimators in the loss: gradient against the exact gradient of KL(pi || pi_ref)", gradients)
    below = {}
    for beta in dict.fromkeys(d["beta"] for d in dpo_curve):
        hits = [d["n_pairs"] for d in dpo_curve if d["beta"] == beta and d["kl_to_optimum"] < 0.1]
        below[str(beta)] = min(hits) if hits else None
    results.update(points=points, summary=summary, dpo_pairs_curve=dpo_curve, dpo_n_below_0_1_nats=below,
                   kl_estimators_in_reward=moments, kl_estimators_in_loss=gradients)
    png = RESULTS_DIR / ("frontier_quick.png" if args.quick else "frontier.png")
    plot(curve, points, dpo_curve, png)
    results["figure"] = str(png.relative_to(RESULTS_DIR.parent.parent))
    write_json("frontier_quick" if args.quick else "frontier", results)
    return results


if __name__ == "__main__":
    main()
