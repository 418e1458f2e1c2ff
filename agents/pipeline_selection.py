"""The pipeline's choice of the reported PPO and DPO models within the KL budget, and its over-optimisation curves.

Both sample the candidates: PPO's snapshots and final policy, DPO's intermediate checkpoints and final model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agents.pipeline import PipelineConfig


def candidates(out: Path, sft: str, n_iterations: int) -> dict[str, dict[str, str]]:
    """Per algorithm, the models the KL-guarded choice picks among (name -> directory), oldest first, final last.

    PPO: its snapshots and the final policy (the snapshot of the last iteration holds the final
    policy's weights: left out, sampled once as "final"). DPO: its intermediate checkpoints and the
    final model (a checkpoint of the final step likewise left out).
    """
    ppo = {snap.name: str(snap) for snap in sorted((out / "ppo" / "snapshots").glob("iter-*"))
           if snap.name != f"iter-{n_iterations:05d}"}
    ppo["final"] = str(out / "ppo" / "policy")
    timing = out / "dpo" / "timing.json"
    final_step = json.loads(timing.read_text()).get("step") if timing.is_file() else None
    dpo = {name: path for name, (path, step) in dpo_checkpoint_dirs(out, sft).items() if step != final_step}
    dpo["final"] = str(out / "dpo")
    return {"ppo": ppo, "dpo": dpo}


def select_within_budget(out: Path, sft: str, config: PipelineConfig, prompts: list[str],
                          candidates: dict[str, dict[str, str]]) -> dict[str, dict]:
    """The PPO and DPO models the evaluation reports, each chosen by KL alone on validation prompts (not the
    evaluation's).

    PPO's adaptive controller holds the KL of each training batch near its setpoint, but a single
    update can still move the policy's KL to SFT on fresh samples well past the budget (seed 0 of
    the benchmark: 3.0 to 6.2 nats in one update); DPO has no KL control at all, only beta's
    implicit one. So every candidate of ``candidates`` (per algorithm, oldest first) is sampled on
    the validation prompts, and per algorithm the latest one whose KL to SFT is within
    ``kl_budget`` with two standard errors to spare (the KL is a mean over a heavy-tailed
    distribution) is reported; the one with the lowest such bound if none is. Both methods are thus
    compared within the same budget. No reward enters the choice. Written to
    ``<algorithm>_selection.json``; each entry of the result is that file's content. Without a
    budget (``kl_budget`` None) the final models are reported and no file is written.
    """
    from agents.evaluate import EvalConfig, evaluate_models

    if config.kl_budget is None:
        return {algorithm: {"selected": "final", "path": models["final"]} for algorithm, models in candidates.items()}
    named = {f"{algorithm}:{name}": path for algorithm, models in candidates.items() for name, path in models.items()}
    result = evaluate_models(EvalConfig(models={"sft": sft, **named}, reference="sft", prompts=prompts,
                                        max_new_tokens=config.max_new_tokens, seed=config.seed + 2, progress=False))
    rows = {row["model"]: row for row in result["rows"]}
    selections = {}
    for algorithm, models in candidates.items():
        kl = {name: rows[f"{algorithm}:{name}"]["kl_to_sft"] for name in models}
        bound = {name: kl[name] + 2.0 * rows[f"{algorithm}:{name}"]["kl_to_sft_stderr"] for name in models}
        within = [name for name in models if bound[name] <= config.kl_budget]
        selected = within[-1] if within else min(bound, key=bound.get)
        selections[algorithm] = {"selected": selected, "path": models[selected], "kl_budget": config.kl_budget,
                                 "kl_to_sft_on_validation": kl, "kl_upper_bound_on_validation": bound,
                                 "n_validation_prompts": len(prompts)}
        (out / f"{algorithm}_selection.json").write_text(json.dumps(selections[algorithm], indent=2) + "\n")
    return selections


def dpo_checkpoint_dirs(out: Path, sft: str) -> dict[str, tuple[str, int]]:
    """DPO's intermediate checkpoints as loadable Hugging Face directories (``dpo/curve/<name>``), oldest
    first: name -> (directory, the checkpoint's optimizer step)."""
    from agents.checkpoint import list_checkpoints
    from rlhf_envs.lm.loading import load_causal_lm

    found = {}
    for ckpt in list_checkpoints(out / "dpo" / "checkpoints"):
        target = out / "dpo" / "curve" / ckpt.name
        if not (target / "config.json").is_file():  # a checkpoint's weights as a loadable HF directory
            from safetensors.torch import load_model

            model, tokenizer = load_causal_lm(sft)
            load_model(model, str(ckpt / "model.safetensors"))
            model.save_pretrained(target)
            tokenizer.save_pretrained(target)
        step = json.loads((ckpt / "checkpoint.json").read_text())["state"]["global_step"]
        found[ckpt.name] = (str(target), step)
    return found


def over_optimisation_curves(out: Path, sft: str, rm: str, config: PipelineConfig, prompts: list[str]) -> dict:
    """Gold reward, proxy reward and KL to SFT of intermediate PPO snapshots and DPO checkpoints."""
    from agents.evaluate import EvalConfig, evaluate_models

    models = {"sft": sft}
    for snap in sorted((out / "ppo" / "snapshots").glob("iter-*")):
        models[f"ppo@{snap.name}"] = str(snap)
    models["ppo@final"] = str(out / "ppo" / "policy")
    for name, (path, _) in dpo_checkpoint_dirs(out, sft).items():
        models[f"dpo@{name}"] = path
    models["dpo@final"] = str(out / "dpo")
    result = evaluate_models(EvalConfig(models=models, reference="sft", reward_model_path=rm, prompts=prompts,
                                        gold_reward=config.gold_reward, max_new_tokens=config.max_new_tokens,
                                        seed=config.seed + 1, progress=config.progress))
    return {"points": result["rows"]}
