"""GRPO family on TextArithmetic-v0: the task pipeline's gain, TRL's GRPOTrainer side by side, length bias,
and zero-variance groups.

Sections, per seed (``--seeds``):

1. **Task pipeline** (:func:`agents.task_pipeline.run_task_pipeline`, PPO beside GRPO): held-out pass@1
   of SFT and of GRPO, the gain, and the pipeline's wall time.
2. **Ours against TRL 1.16's GRPOTrainer**, from that seed's SFT model: the same prompts (the
   pipeline's training problems), G, batch, max completion length, steps, learning rate (constant),
   ``loss_type="dapo"`` with clip 0.2 / 0.28 on both sides, beta 0, one update per generation, no
   dynamic sampling (TRL has none), fp32 on CPU, one torch thread. Timed end to end (generation,
   scoring, update): ours the training loop of ``train_grpo`` (its env and model set-up excluded),
   TRL ``trainer.train()`` (the trainer's construction excluded); imports and one untimed step of each
   side come first.
   Both are then evaluated with the same held-out pass@1. The two sides run interleaved in one process,
   their order alternating by seed, so both see the same machine load; ``os.getloadavg()`` is recorded
   before and after every timed run.
3. **Length bias**: ``grpo``, ``dr_grpo`` and ``dapo`` losses from the same SFT model, same seeds:
   held-out mean response length and pass@1 (``dapo`` with its dynamic sampling).
4. **Zero-variance groups**: their fraction over training per loss type, and under ``dapo`` the
   fraction of trained sequences that came from such groups (0 when dynamic sampling drops them).

    python -m benchmarks.bench_grpo                 # -> benchmarks/results/grpo.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import print_table, write_json

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SECTIONS = ("pipeline", "trl", "bias")


def _pipeline(seed: int, out: Path, episodes: int, lr: float) -> dict:
    from agents.task_pipeline import TaskPipelineConfig, run_task_pipeline

    config = TaskPipelineConfig(output_dir=str(out / f"pipeline-{seed}"), seed=seed, rl_episodes=episodes,
                                grpo_learning_rate=lr)
    summary = run_task_pipeline(config)
    ev = summary["evaluation"]
    return {"seed": seed, "sft_pass@1": ev["sft"]["pass@1"], "grpo_pass@1": ev["grpo"]["pass@1"],
            "ppo_pass@1": ev.get("ppo", {}).get("pass@1"), "gain_points": 100 * summary["grpo_gain_pass@1"],
            "sft_pass@8": ev["sft"]["pass@8"], "grpo_pass@8": ev["grpo"]["pass@8"],
            "grpo_kl_to_sft": ev["grpo"].get("kl"), "total_seconds": summary["total_seconds"],
            "stage_seconds": summary["seconds"]}


def _held_out(path: str, seed: int, n: int = 400) -> dict:
    from agents.verifiable import evaluate_verifiable
    from rlhf_envs.lm.loading import load_causal_lm
    from rlhf_envs.rewards import make_reward_model
    from rlhf_envs.text_arithmetic import make_problems

    model, tokenizer = load_causal_lm(path)
    return evaluate_verifiable(model, tokenizer, make_problems(n, seed + 1000, "test"), make_reward_model("verifier"),
                               k=8, seed=seed)


def _ours(sft: str, out: Path, seed: int, settings: dict, **overrides) -> tuple[float, int, list[dict]]:
    from agents.grpo import GRPOConfig, train_grpo

    config = GRPOConfig(model_path=sft, env_kwargs={"n_prompts": settings["n_prompts"], "prompt_seed": seed},
                        output_dir=str(out), seed=seed, total_episodes=settings["steps"] * settings["batch"],
                        batch_size=settings["batch"], group_size=settings["group"], learning_rate=settings["lr"],
                        warmup_iterations=settings["warmup"],
                        max_new_tokens=settings["max_new_tokens"], progress=False, torch_threads=1,
                        **{"loss_type": "dapo", "dynamic_sampling": False, "cliprange_high": 0.28, **overrides})
    result = train_grpo(config)  # result.seconds: the training loop, its set-up (env, model) excluded
    return result.seconds, result.completions, result.history


def _trl(sft: str, out: Path, seed: int, settings: dict) -> tuple[float, int]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    from rlhf_envs.lm.loading import load_tokenizer
    from rlhf_envs.rewards import make_reward_model
    from rlhf_envs.text_arithmetic import make_problems

    verifier = make_reward_model("verifier")

    def reward(prompts, completions, **kwargs):
        return verifier.score(list(prompts), list(completions)).tolist()

    prompts = make_problems(settings["n_prompts"], seed, "train")
    args = TRLConfig(output_dir=str(out), seed=seed, use_cpu=True, bf16=False, gradient_checkpointing=False,
                     per_device_train_batch_size=settings["batch"], num_generations=settings["group"],
                     generation_batch_size=settings["batch"], max_completion_length=settings["max_new_tokens"],
                     max_steps=settings["steps"], learning_rate=settings["lr"],
                     lr_scheduler_type="constant_with_warmup",
                     warmup_steps=settings["warmup"],
                     loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0, num_iterations=1,
                     temperature=1.0, logging_steps=10_000, save_strategy="no", report_to="none",
                     disable_dropout=True, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(sft), reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=load_tokenizer(sft))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(str(out / "policy"))
    load_tokenizer(sft).save_pretrained(str(out / "policy"))
    return seconds, settings["steps"] * settings["batch"]


def _versus_trl(seed: int, sft: str, out: Path, settings: dict) -> dict:
    sides = ("ours", "trl") if seed % 2 == 0 else ("trl", "ours")
    row: dict = {"seed": seed, "order": "/".join(sides)}
    for side in sides:
        load_before = os.getloadavg()
        if side == "ours":
            seconds, completions, _ = _ours(sft, out / f"ours-{seed}", seed, settings)
            policy = str(out / f"ours-{seed}" / "policy")
        else:
            seconds, completions = _trl(sft, out / f"trl-{seed}", seed, settings)
            policy = str(out / f"trl-{seed}" / "policy")
        row[f"{side}_completions_per_s"] = completions / seconds
        row[f"{side}_seconds"] = seconds
        row[f"{side}_pass@1"] = _held_out(policy, seed)["pass@1"]
        row[f"{side}_loadavg"] = [round(x, 2) for x in (*load_before, *os.getloadavg())]
    row["speedup"] = row["ours_completions_per_s"] / row["trl_completions_per_s"]
    return row


def _length_bias(seed: int, sft: str, out: Path, settings: dict) -> list[dict]:
    rows = []
    for loss_type in LOSS_TYPES:
        overrides = {"loss_type": loss_type, "dynamic_sampling": None, "cliprange_high": None}
        seconds, completions, history = _ours(sft, out / f"{loss_type}-{seed}", seed, settings, **overrides)
        ev = _held_out(str(out / f"{loss_type}-{seed}" / "policy"), seed)
        rows.append({"seed": seed, "loss_type": loss_type, "pass@1": ev["pass@1"],
                     "response_length": ev["response_length"],
                     "train_length_first": history[0]["tokens/response_length_mean"],
                     "train_length_last": history[-1]["tokens/response_length_mean"],
                     "zero_variance_frac_mean": float(np.mean([h["groups/zero_variance_frac"] for h in history])),
                     "zero_variance_frac_curve": [h["groups/zero_variance_frac"] for h in history],
                     "trained_zero_variance_frac_mean": float(np.mean(
                         [h["groups/trained_zero_variance_frac"] for h in history])),
                     "completions_sampled": completions, "seconds": seconds})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100, help="GRPO steps of every RL run (pipeline included)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--warmup", type=int, default=20,
                        help="learning-rate warm-up iterations (ours; TRL: warmup_steps)")
    parser.add_argument("--trl-steps", type=int, default=40, help="steps of the TRL comparison (both sides)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_grpo"))
    parser.add_argument("--name", default="grpo")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                        help="what to run; without 'pipeline' the SFT models of an earlier run in --out are reused")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # imported before any timed region: neither side pays it
    import transformers  # noqa: F401
    import trl

    settings = {"steps": args.steps, "batch": args.batch, "group": args.group, "lr": args.lr, "max_new_tokens": 6,
                "n_prompts": 4000, "warmup": args.warmup}
    trl_settings = {**settings, "steps": args.trl_steps, "warmup": min(args.warmup, args.trl_steps // 2)}
    pipeline, versus, bias = [], [], []
    for seed in args.seeds:
        if "pipeline" in args.sections:
            pipeline.append(_pipeline(seed, args.out, args.steps * args.batch, args.lr))
        sft = str(args.out / f"pipeline-{seed}" / "sft")
        if "trl" in args.sections:
            if not versus:  # one untimed step of each side first: first-call costs (kernels, caches) paid by neither
                _ours(sft, args.out / "trl" / "warm-ours", seed, {**trl_settings, "steps": 1, "warmup": 0})
                _trl(sft, args.out / "trl" / "warm-trl", seed, {**trl_settings, "steps": 1, "warmup": 0})
            versus.append(_versus_trl(seed, sft, args.out / "trl", trl_settings))
        if "bias" in args.sections:
            bias.extend(_length_bias(seed, sft, args.out / "bias", settings))
    print_table("Task pipeline (held-out pass@1, 8 samples at T=1)", [
        {k: r[k] for k in ("seed", "sft_pass@1", "grpo_pass@1", "ppo_pass@1", "gain_points", "total_seconds")}
        for r in pipeline])
    print_table("Ours vs TRL GRPOTrainer (same settings, interleaved)", [
        {k: r[k] for k in ("seed", "ours_completions_per_s", "trl_completions_per_s", "speedup", "ours_pass@1",
                           "trl_pass@1")} for r in versus])
    print_table("Length bias (held-out)", [{k: r[k] for k in ("seed", "loss_type", "pass@1", "response_length",
                                                             "train_length_first", "train_length_last",
                                                             "zero_variance_frac_mean",
                                                             "trained_zero_variance_frac_mean")} for r in bias])
    targets = {"of_seeds": len(args.seeds)}
    if pipeline:
        targets["gain_at_least_15_points"] = sum(r["gain_points"] >= 15 for r in pipeline)
        targets["pipeline_within_600_s"] = sum(r["total_seconds"] <= 600 for r in pipeline)
    if versus:
        targets["speedup_at_least_3x"] = sum(r["speedup"] >= 3 for r in versus)
        targets["accuracy_equal_or_better_than_trl"] = sum(r["ours_pass@1"] >= r["trl_pass@1"] for r in versus)
    if bias:
        targets["dapo_trained_zero_variance_frac"] = max(r["trained_zero_variance_frac_mean"] for r in bias
                                                         if r["loss_type"] == "dapo")
    print_table("Targets (seeds meeting each)", [targets])
    write_json(args.name, {"settings": {**settings, "trl_steps": args.trl_steps, "seeds": args.seeds,
                                        "sections": args.sections},
                           "trl_version": trl.__version__, "pipeline": pipeline, "versus_trl": versus,
                           "length_bias": bias, "targets": targets, "loadavg_end": os.getloadavg()})


if __name__ == "__main__":
    main()
