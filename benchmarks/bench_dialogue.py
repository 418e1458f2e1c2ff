"""Multi-turn TextDialogue: PPO on the guess game against the exact optimum, tool use on the calculator
game, and the cost of a 64-env multi-turn step against a TextBandit step of the same tokens.

1. **Guess** (``TextDialogue-v0``, secret uniform on 1..16, at most 8 turns): the SFT task model
   and the same model after multi-turn PPO (:func:`agents.dialogue_ppo.train_dialogue_ppo`, token-level
   credit), seeds 0, 1, 2, each evaluated on ``--eval-episodes`` fresh episodes, sampling at temperature
   1 (the trained policy) and greedy. The exact optimum is binary search's expected number of turns,
   :func:`rlhf_envs.dialogue_games.optimal_guess_turns` (27/8 = 3.375). Target: mean turns of the
   solved episodes within 1.25x of it with at least 90% solved, on every seed.
2. **Calculator** (``TextDialogueTool-v0``, ``a*b`` with two-digit ``a, b``): accuracy of the same model
   with the tool and with it off (calls answered ``=?;``), SFT and after PPO with the tool on. Target:
   with the tool at least 20 points above without, after training.
3. **Step cost**: one ``TextDialogue-v0`` vector step over 64 envs from a fixed mid-episode state
   (context of 13 tokens, a 2-token turn) against one ``TextBandit-v0`` vector step over 64 envs whose
   prompts are those same 13-token contexts and whose responses are the same 2 tokens, same model, a
   trivial reward. TextBandit runs with its reference prompt cache warm (its default after a prompt's
   first step), and with the cache off. Target: at most 1.5x the cached TextBandit step.

    python -m benchmarks.bench_dialogue [--iterations 30] [--eval-episodes 512] [--repeats 30]

Writes ``benchmarks/results/dialogue.json`` (with ``os.getloadavg()`` before and after: the machine is shared).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

import gymnasium as gym
import numpy as np
import torch

import rlhf_envs  # noqa: F401  (registers the envs)
from agents.dialogue_ppo import DialoguePPOConfig, evaluate_dialogue, train_dialogue_ppo
from benchmarks.common import print_table, write_json
from rlhf_envs import text_common
from rlhf_envs.dialogue_games import CalculatorGame, GuessNumberGame, optimal_guess_turns
from rlhf_envs.lm.loading import load_causal_lm


def _guess(iterations: int, episodes: int, seeds: list[int]) -> dict:
    optimum = float(optimal_guess_turns(16))
    sft, _ = load_causal_lm(str(GuessNumberGame.model_dir))
    rows = []
    for seed in seeds:
        result = train_dialogue_ppo(DialoguePPOConfig(iterations=iterations, seed=seed))
        for name, lm in (("sft", sft), ("ppo", result.model.lm)):
            for greedy in (False, True):
                m = evaluate_dialogue(lm, episodes=episodes, seed=10_000 + seed, greedy=greedy)
                rows.append({"seed": seed, "policy": name, "decoding": "greedy" if greedy else "sample",
                             "turns_solved": m["turns_solved"], "ratio": m["turns_solved"] / optimum,
                             "turns_all": m["turns"], "ratio_all": m["turns"] / optimum, "solved": m["solved"],
                             "train_s": result.seconds if name == "ppo" else None})
    print_table(f"Guess 1..16: mean turns vs the exact optimum {optimum} (binary search)", rows)
    trained = [r for r in rows if r["policy"] == "ppo" and r["decoding"] == "sample"]
    met = [r["ratio"] <= 1.25 and r["solved"] >= 0.9 for r in trained]
    return {"optimum_turns": optimum, "iterations": iterations, "episodes_per_iteration": 64,
            "eval_episodes": episodes, "rows": rows, "target": "ratio <= 1.25 and solved >= 0.9 (ppo, sample)",
            "seeds_meeting_target": int(sum(met)), "met": all(met)}


def _calc(iterations: int, episodes: int, seeds: list[int]) -> dict:
    sft, _ = load_causal_lm(str(CalculatorGame.model_dir))
    rows = []
    for seed in seeds:
        result = train_dialogue_ppo(DialoguePPOConfig(env_id="TextDialogueTool-v0", iterations=iterations, seed=seed))
        for name, lm in (("sft", sft), ("ppo", result.model.lm)):
            acc = {tool: evaluate_dialogue(lm, "TextDialogueTool-v0", episodes=episodes, seed=20_000 + seed,
                                           game_kwargs={"tool": tool}) for tool in (True, False)}
            rows.append({"seed": seed, "policy": name, "accuracy_tool": acc[True]["score"],
                         "accuracy_no_tool": acc[False]["score"],
                         "gap_points": 100 * (acc[True]["score"] - acc[False]["score"]),
                         "turns_tool": acc[True]["turns"], "train_s": result.seconds if name == "ppo" else None})
    print_table("Calculator a*b: accuracy with the tool and without it (same model)", rows)
    met = [r["gap_points"] >= 20 for r in rows if r["policy"] == "ppo"]
    return {"iterations": iterations, "eval_episodes": episodes, "rows": rows,
            "target": "ppo accuracy_tool - accuracy_no_tool >= 20 points", "met": all(met)}


def _mid_episode_dialogue() -> tuple[object, np.ndarray, dict]:
    """A 64-env guess vector env after four invalid 2-token turns (context 13 tokens), the turn, and its state."""
    envs = gym.make_vec("TextDialogue-v0", num_envs=64, max_turns=64, max_context_tokens=31)
    tok = envs.unwrapped.task.tokenizer
    turn = np.tile(np.array(tok.convert_tokens_to_ids(["3", "9"])), (64, 1))  # "39": invalid, never ends the game
    envs.reset(seed=0)
    for _ in range(4):
        envs.set_policy_logprobs(np.full((64, 2), -1.0, dtype=np.float32))
        envs.step(turn)
    d = envs.unwrapped.dialogues
    state = {"buf": d.buf.copy(), "wrote": d.wrote.copy(), "length": d.length.copy(), "turn": d.turn.copy(),
             "games": copy.deepcopy(d.games), "cached": d.reference_kv.cached.copy()}
    return envs, turn, state


def _restore(envs, state: dict) -> None:
    d = envs.unwrapped.dialogues
    d.buf[:], d.wrote[:], d.length[:], d.turn[:] = state["buf"], state["wrote"], state["length"], state["turn"]
    d.games = copy.deepcopy(state["games"])
    d.reference_kv.cached = state["cached"].copy()


def _timed(step, prepare, repeats: int) -> float:
    times = []
    for _ in range(repeats + 2):
        prepare()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def _step_cost(repeats: int) -> dict:
    envs, turn, state = _mid_episode_dialogue()
    d = envs.unwrapped.dialogues
    lengths = set(d.length.tolist())
    obs, _ = d.observations()
    tok = envs.unwrapped.task.tokenizer
    prompts = [tok.decode(row[row != d.task.pad_token_id].tolist()) for row in obs]
    logprobs = np.full((64, 2), -1.0, dtype=np.float32)

    def dialogue_step():
        envs.set_policy_logprobs(logprobs)
        envs.step(turn)

    model = str(GuessNumberGame.model_dir)

    def no_reward(prompts: list, responses: list) -> np.ndarray:
        return np.zeros(len(responses), dtype=np.float32)

    def bandit(cached: bool):
        bandit_envs = gym.make_vec("TextBandit-v0", num_envs=64, model=model, prompts=prompts, reward_model=no_reward,
                                   max_new_tokens=2)
        assert bandit_envs.unwrapped.task.prompt_mask.sum(-1).tolist() == [13] * 64, "prompts re-encode to 13 tokens"
        bandit_envs.reset(seed=0)
        if cached:
            bandit_envs.unwrapped.task.cache_prompts()

        def step():
            bandit_envs.set_policy_logprobs(logprobs)
            bandit_envs.step(turn)

        return step

    saved = text_common.PROMPT_CACHE_BYTES
    bandit_cached = bandit(cached=True)
    text_common.PROMPT_CACHE_BYTES = 0
    try:
        bandit_uncached = bandit(cached=False)
        times = {"dialogue": [], "bandit_cached": [], "bandit_uncached": []}
        for _ in range(3):  # interleaved rounds: load on the shared machine moves all three alike
            times["dialogue"].append(_timed(dialogue_step, lambda: _restore(envs, state), repeats))
            times["bandit_cached"].append(_timed(bandit_cached, lambda: None, repeats))
            times["bandit_uncached"].append(_timed(bandit_uncached, lambda: None, repeats))
    finally:
        text_common.PROMPT_CACHE_BYTES = saved
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    rows = [{"step (64 envs, 13 + 2 tokens each)": k, "ms": v, "vs bandit cached": v / ms["bandit_cached"]}
            for k, v in ms.items()]
    print_table("One vector step: TextDialogue vs TextBandit, same tokens", rows)
    ratio = ms["dialogue"] / ms["bandit_cached"]
    return {"context_tokens": sorted(lengths), "turn_tokens": 2, "num_envs": 64, "repeats": repeats, "ms": ms,
            "ratio_vs_bandit_cached": ratio, "ratio_vs_bandit_uncached": ms["dialogue"] / ms["bandit_uncached"],
            "target": "ratio_vs_bandit_cached <= 1.5", "met": ratio <= 1.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30, help="PPO iterations (64 episodes each), guess game")
    parser.add_argument("--calc-iterations", type=int, default=20, help="PPO iterations on the calculator game")
    parser.add_argument("--eval-episodes", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per round (three rounds)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        step_cost = _step_cost(args.repeats)
    guess = _guess(args.iterations, args.eval_episodes, args.seeds)
    calc = _calc(args.calc_iterations, args.eval_episodes, args.seeds)
    write_json("dialogue", {"torch_threads": 1, "loadavg_before": list(load_before),
                            "loadavg_after": list(os.getloadavg()), "seconds": time.perf_counter() - started,
                            "guess": guess, "calc": calc, "step_cost": step_cost})


if __name__ == "__main__":
    main()
