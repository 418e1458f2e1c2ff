"""``rlhf task-pipeline``: SFT on demonstrations, then GRPO, and RLHF PPO beside it, on a task with an exact checker.

Stages, each in its own folder of ``output_dir``:

1. ``sft/``: the task's base model (``rlhf_envs/assets/arithmetic``) fine-tuned on ``n_demonstrations``
   problems of the training split with their exact answers;
2. ``grpo/``: :func:`agents.grpo.train_grpo` from the SFT model on ``TextArithmetic-v0``'s training
   problems (verifier reward, group sampling);
3. ``ppo/``: :func:`agents.lm_ppo.train_lm_ppo` from the same SFT model, the same prompts and the same
   verifier (``reward_model="verifier"``) with a value head, for comparison (``run_ppo``);
4. evaluation on held-out problems (never in the training split nor in the base model's corpus):
   pass@1 and pass@k (``eval_k`` samples at temperature 1), greedy accuracy, mean response length, KL to
   SFT; ``report.md``, ``summary.json`` and ``accuracy_vs_samples.png`` (training accuracy against the
   number of sampled responses).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlhf_envs.validation import check_config_fields

__all__ = ["TaskPipelineConfig", "run_task_pipeline"]

TASKS = ("arithmetic",)


@dataclass
class TaskPipelineConfig:
    """Settings of :func:`run_task_pipeline`; the defaults run in minutes on a 2-core CPU."""

    task: str = field(default="arithmetic", metadata={"help": "the verifiable task: arithmetic (TextArithmetic-v0)"})
    output_dir: str = field(default="runs/task_pipeline", metadata={"help": "run folder"})
    seed: int = field(default=0, metadata={"help": "seed of every stage"})
    n_demonstrations: int = field(default=4000, metadata={"help": "SFT demonstrations (training-split problems and "
                                                                  "answers)"})
    sft_epochs: int = field(default=1, metadata={"help": "SFT passes over the demonstrations"})
    sft_learning_rate: float = field(default=1e-4, metadata={"help": "SFT peak learning rate"})
    n_train_prompts: int = field(default=4000, metadata={"help": "training-split problems GRPO and PPO draw from"})
    n_eval_prompts: int = field(default=400, metadata={"help": "held-out problems evaluated"})
    eval_k: int = field(default=8, metadata={"help": "samples per held-out problem (pass@1 and pass@k)"})
    max_new_tokens: int = field(default=6, metadata={"help": "longest response, EOS included"})
    rl_episodes: int = field(default=12800, metadata={"help": "responses GRPO (and PPO) train on"})
    batch_size: int = field(default=128, metadata={"help": "responses per rollout"})
    group_size: int = field(default=8, metadata={"help": "GRPO responses per prompt"})
    grpo_learning_rate: float = field(default=3e-5, metadata={"help": "GRPO learning rate"})
    warmup_iterations: int = field(default=20, metadata={"help": "GRPO learning-rate warm-up iterations"})
    loss_type: str = field(default="dapo", metadata={"help": "GRPO loss aggregation: grpo, dr_grpo or dapo"})
    advantage: str = field(default="grpo", metadata={"help": "GRPO advantage: grpo, rloo or reinforce_pp"})
    beta: float = field(default=0.0, metadata={"help": "GRPO KL coefficient (0: no reference pass)"})
    run_ppo: bool = field(default=True,
                          metadata={"help": "also train RLHF PPO from SFT on the same prompts and reward"})
    ppo_learning_rate: float = field(default=3e-5, metadata={"help": "PPO learning rate"})
    ppo_beta: float = field(default=0.0, metadata={"help": "PPO KL coefficient"})
    torch_threads: int | None = field(default=1, metadata={"help": "torch threads (1 is robust on a shared machine)"})
    progress: bool = field(default=False, metadata={"help": "show progress bars"})

    def __post_init__(self):
        check_config_fields(self)
        if self.task not in TASKS:
            raise ValueError(f"TaskPipelineConfig.task={self.task!r} is unknown; choose one of {list(TASKS)}")
        for name in ("n_demonstrations", "sft_epochs", "n_train_prompts", "n_eval_prompts", "eval_k", "rl_episodes",
                     "batch_size", "group_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"TaskPipelineConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        self.grpo_config("unused")  # GRPO's own checks (loss_type, group_size, ...) before anything runs

    def grpo_config(self, model_path: str):
        from agents.grpo import GRPOConfig

        env_kwargs = {"n_prompts": self.n_train_prompts, "prompt_seed": self.seed}
        return GRPOConfig(model_path=model_path, env_kwargs=env_kwargs,
                          output_dir=str(Path(self.output_dir) / "grpo"), seed=self.seed,
                          total_episodes=self.rl_episodes, batch_size=self.batch_size, group_size=self.group_size,
                          learning_rate=self.grpo_learning_rate, warmup_iterations=self.warmup_iterations,
                          max_new_tokens=self.max_new_tokens,
                          loss_type=self.loss_type, advantage=self.advantage, beta=self.beta,
                          torch_threads=self.torch_threads, progress=self.progress)


def _sft_stage(config: TaskPipelineConfig, out: Path, base: str) -> dict:
    from agents.data import write_jsonl
    from agents.sft import SFTConfig, train_sft
    from rlhf_envs.text_arithmetic import demonstrations

    # demonstrations use another draw than the RL prompts (seed + 1); both are training-split problems
    write_jsonl(out / "data" / "sft.jsonl", demonstrations(config.n_demonstrations, config.seed + 1))
    result = train_sft(SFTConfig(model_path=base, data_path=str(out / "data" / "sft.jsonl"),
                                 output_dir=str(out / "sft"), seed=config.seed, num_epochs=config.sft_epochs,
                                 learning_rate=config.sft_learning_rate, batch_size=64, max_length=32,
                                 eval_fraction=0.0, torch_threads=config.torch_threads, progress=config.progress))
    return {"seconds": result.train_seconds}


def _ppo_stage(config: TaskPipelineConfig, out: Path, sft: str) -> dict:
    from agents.lm_ppo import LMPPOConfig, train_lm_ppo
    from rlhf_envs.text_arithmetic import make_problems

    result = train_lm_ppo(LMPPOConfig(
        model_path=sft, reward_model="verifier", prompts=make_problems(config.n_train_prompts, config.seed, "train"),
        output_dir=str(out / "ppo"), seed=config.seed, total_episodes=config.rl_episodes,
        batch_size=config.batch_size, num_minibatches=1, ppo_epochs=1, learning_rate=config.ppo_learning_rate,
        max_new_tokens=config.max_new_tokens, beta=config.ppo_beta, torch_threads=config.torch_threads,
        progress=config.progress))
    return {"seconds": result.seconds, "history": [{"samples": h["episodes"], "accuracy": h["objective/scores"]}
                                                   for h in result.history]}


def _evaluate(config: TaskPipelineConfig, models: dict[str, str], sft: str) -> dict[str, dict]:
    from agents.verifiable import evaluate_verifiable
    from rlhf_envs.lm.loading import load_causal_lm
    from rlhf_envs.rewards import make_reward_model
    from rlhf_envs.text_arithmetic import make_problems

    problems = make_problems(config.n_eval_prompts, config.seed + 1000, "test")
    reward = make_reward_model("verifier")
    ref, _ = load_causal_lm(sft)
    rows = {}
    for name, path in models.items():
        model, tokenizer = load_causal_lm(path)
        rows[name] = evaluate_verifiable(model, tokenizer, problems, reward, k=config.eval_k,
                                         max_new_tokens=config.max_new_tokens, seed=config.seed, ref_model=ref)
    return rows


def _plot(path: Path, curves: dict[str, list[dict]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, points in curves.items():
        ax.plot([p["samples"] for p in points], [p["accuracy"] for p in points], label=name)
    ax.set_xlabel("responses sampled")
    ax.set_ylabel("training accuracy (mean verifier score)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _report(out: Path, rows: dict[str, dict], summary: dict) -> Path:
    k = next(iter(rows.values()))["k"]
    lines = ["# Task pipeline: arithmetic", "", f"Held-out problems: {next(iter(rows.values()))['n_prompts']}, "
             f"{k} samples each at temperature 1.", "",
             f"| model | pass@1 | pass@{k} | greedy | mean length | KL to SFT |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['pass@1']:.3f} | {r[f'pass@{k}']:.3f} | {r['greedy_accuracy']:.3f} | "
                     f"{r['response_length']:.2f} | {r.get('kl', 0.0):.3f} |")
    lines += ["", f"Stage seconds: {json.dumps(summary['seconds'])}; total {summary['total_seconds']:.0f} s.", "",
              "![accuracy against samples](accuracy_vs_samples.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def run_task_pipeline(config: TaskPipelineConfig) -> dict:
    """Run every stage (module docstring) and return the summary (also written to ``summary.json``)."""
    from agents.grpo import train_grpo
    from rlhf_envs.text_arithmetic import ASSET_DIR

    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    started = time.perf_counter()
    base, sft = str(ASSET_DIR), str(out / "sft")
    seconds = {"sft": _sft_stage(config, out, base)["seconds"]}
    t0 = time.perf_counter()
    grpo = train_grpo(config.grpo_config(sft))
    seconds["grpo"] = time.perf_counter() - t0
    curves = {f"GRPO ({config.loss_type})": [{"samples": h["completions"], "accuracy": h["objective/scores"]}
                                             for h in grpo.history]}
    models = {"base": base, "sft": sft, "grpo": str(out / "grpo" / "policy")}
    if config.run_ppo:
        t0 = time.perf_counter()
        curves["RLHF PPO"] = _ppo_stage(config, out, sft)["history"]
        seconds["ppo"] = time.perf_counter() - t0
        models["ppo"] = str(out / "ppo" / "policy")
    t0 = time.perf_counter()
    rows = _evaluate(config, models, sft)
    seconds["evaluation"] = time.perf_counter() - t0
    _plot(out / "accuracy_vs_samples.png", curves)
    summary = {"evaluation": rows, "seconds": {k: round(v, 1) for k, v in seconds.items()},
               "total_seconds": round(time.perf_counter() - started, 1), "curves": curves,
               "grpo_gain_pass@1": rows["grpo"]["pass@1"] - rows["sft"]["pass@1"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _report(out, rows, summary)
    return summary
