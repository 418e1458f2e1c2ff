"""``rlhf pipeline``: the InstructGPT recipe end to end, plus DPO beside it, with a report.

    base --SFT--> sft --sample K, gold-rank--> preferences --RM--> rm (the proxy)
    sft --PPO against rm, KL to sft--> ppo          sft --DPO on the same preferences--> dpo

Preferences come from the standard synthetic-human-feedback setup: the SFT model answers each
prompt K times and the gold reward (VADER sentiment, human-rated word valences) ranks the
answers. PPO optimises the learned proxy; evaluation judges with the gold reward, so the report
shows proxy against gold reward and both against KL (over-optimisation).

With ``corpus_paths`` (``rlhf pipeline --corpus FILE...``) the base model is first pretrained on the
user's text (stage ``pretrain``, :mod:`agents.pretrain`), and the demonstrations and prompts are cut
out of the same text (:mod:`agents.text_corpus` documents how). After every stage a check says
whether it learned (:mod:`agents.stage_checks`): a stage that did not is announced on the console,
at the top of ``report.md`` and in ``summary.json``'s ``stages``, with the figure and what to change.

The run folder::

    data/{sft,rankings,preferences}.jsonl   the generated data
    pretrain/ sft/ rm/ dpo/ ppo/policy/     models (Hugging Face dirs, safetensors), each with metrics.jsonl
    eval.json  curves.json  report.md  *.png

Under ``torchrun`` every training stage runs data parallel (each trainer splits its own work);
rank 0 alone writes the data, samples the preferences, evaluates and writes the report, and the
other processes wait for its files where a stage reads them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from agents.data import write_jsonl
from agents.distributed import distributed, is_main_process, join_process_group
from agents.pipeline_selection import candidates, over_optimisation_curves, select_within_budget
from agents.trackers import REPORT_TO_HELP, parse_report_to
from rlhf_envs.compat import renamed_fields
from rlhf_envs.validation import check_config_fields


@renamed_fields(beta="ppo_beta", target_kl="kl_budget", curve_points="dpo_checkpoints")
@dataclass
class PipelineConfig:
    """Every knob of ``rlhf pipeline``; the defaults run the embedded model in minutes on a CPU."""

    output_dir: str = field(default="runs/pipeline", metadata={"help": "the run folder"})
    model_path: str | None = field(default=None, metadata={"help": "base causal LM directory or a shipped model's name "
                                                           "(embedded, embedded-llama); None = the embedded default"})
    seed: int = field(default=0, metadata={"help": "seed of every stage"})
    demonstrations_path: str | None = field(default=None, metadata={"help": "SFT demonstrations {prompt, completion} "
                                                                            "or {messages} (JSONL, .jsonl.gz, "
                                                                            "parquet or a datasets folder); None = "
                                                                            "drawn from the embedded corpus"})
    prompts_path: str | None = field(default=None, metadata={"help": "prompts for preferences, PPO, validation and "
                                                                     "evaluation, rows {prompt} (JSONL, .jsonl.gz, "
                                                                     "parquet or a datasets folder); None = corpus "
                                                                     "prompts. Either way each distinct prompt goes "
                                                                     "to one of the four"})
    corpus_paths: list | None = field(default=None, metadata={"help": "plain-text files (--corpus FILE...): pretrain "
                                                                      "a base model on them and cut the "
                                                                      "demonstrations and prompts out of them "
                                                                      "(agents.text_corpus), in place of "
                                                                      "demonstrations_path and prompts_path"})
    corpus_recipe: bool = field(default=True, metadata={"help": "with corpus_paths, set the settings left at their "
                                                                "defaults to the corpus recipe's "
                                                                "(agents.text_corpus.CORPUS_RECIPE)"})
    pretrain_size: str = field(default="small", metadata={"help": "with corpus_paths, the size preset of the new "
                                                                  "GPT-2 (agents.pretrain.SIZES); with model_path "
                                                                  "too, that model is pretrained further instead"})
    pretrain_steps: int = field(default=600, metadata={"help": "with corpus_paths, pretraining's optimizer steps (64 "
                                                               "passages each)"})
    gold_reward: str = field(default="sentiment", metadata={"help": "reward plugin that ranks the SFT answers and "
                                                                    "judges the evaluation: the gold reward"})
    n_demonstrations: int = field(default=3000, metadata={"help": "SFT demonstrations drawn from the corpus"})
    sft_epochs: int = field(default=1, metadata={"help": "SFT epochs"})
    sft_learning_rate: float = field(default=5e-4, metadata={"help": "SFT learning rate"})
    n_preference_prompts: int = field(default=1500, metadata={"help": "prompts the SFT model answers K times for "
                                                                      "preferences"})
    k_responses: int = field(default=4, metadata={"help": "K responses per prompt, ranked by the gold reward "
                                                          "(InstructGPT uses 4 to 9)"})
    rm_epochs: int = field(default=2, metadata={"help": "reward-model epochs"})
    rm_learning_rate: float = field(default=5e-4, metadata={"help": "reward-model learning rate"})
    ppo_episodes: int = field(default=4096, metadata={"help": "responses PPO samples in total"})
    ppo_batch_size: int = field(default=64, metadata={"help": "responses per PPO rollout"})
    ppo_learning_rate: float = field(default=5e-5, metadata={"help": "PPO learning rate"})
    ppo_max_approx_kl: float = field(default=0.01, metadata={"help": "stop a PPO update at the first minibatch whose "
                                                                     "approximate KL to the rollout policy exceeds "
                                                                     "this (nats per token)"})
    ppo_beta: float = field(default=0.1, metadata={"help": "initial KL coefficient of PPO"})
    kl_budget: float | None = field(default=4.0, metadata={"help": "KL budget to SFT (nats per response): PPO's "
                                                                   "controller aims below it, and the reported PPO "
                                                                   "and DPO models are the latest within it on "
                                                                   "validation prompts; None = fixed PPO beta, final "
                                                                   "models, no budget"})
    kl_setpoint_fraction: float = field(default=0.6, metadata={"help": "the adaptive controller aims at this fraction "
                                                                       "of kl_budget (its setpoint): the KL it "
                                                                       "steers swings about +-25% between "
                                                                       "iterations, and on prompts no stage trained "
                                                                       "on it reads higher than on PPO's own, so "
                                                                       "aiming below the budget keeps the reported "
                                                                       "policy within it"})
    kl_horizon: float = field(default=256.0, metadata={"help": "episodes over which the adaptive controller moves "
                                                               "beta (short runs need a short horizon)"})
    dpo_epochs: int = field(default=2, metadata={"help": "DPO epochs"})
    dpo_beta: float = field(default=1.0, metadata={"help": "DPO's beta, the strength of its implicit KL penalty (on "
                                                           "the embedded model, 0.1 let some answers collapse into a "
                                                           "repeated word, 11-22 nats from SFT)"})
    dpo_learning_rate: float = field(default=3e-4, metadata={"help": "DPO learning rate"})
    dpo_loss: str = field(default="sigmoid", metadata={"help": "DPO loss: sigmoid (DPO), ipo or cdpo (conservative "
                                                               "DPO)"})
    dpo_label_smoothing: float = field(default=0.0, metadata={"help": "cdpo's epsilon, the assumed rate of flipped "
                                                                      "labels, in (0, 0.5); 0 for sigmoid and ipo"})
    max_new_tokens: int = field(default=24, metadata={"help": "longest response everywhere"})
    n_eval_prompts: int = field(default=256, metadata={"help": "distinct held-out prompts of the final evaluation (no "
                                                               "stage trains on them)"})
    ppo_snapshots: int = field(default=8, metadata={"help": "PPO policies saved at even intervals: the KL-guarded "
                                                            "choice of the reported model picks among them, and the "
                                                            "gold-vs-KL curve shows them"})
    dpo_checkpoints: int = field(default=4, metadata={"help": "intermediate DPO checkpoints: the KL-guarded choice of "
                                                              "the reported model picks among them and the final "
                                                              "one, and the gold-vs-KL curve shows them"})
    torch_threads: int | None = field(default=None, metadata={"help": "torch intra-op threads; None = torch's default"})
    resume: bool = field(default=False,
                         metadata={"help": "keep stages already finished in output_dir and run the rest"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    report_to: list[str] = field(default_factory=lambda: ["none"], metadata={"help": REPORT_TO_HELP + "; each stage "
                                                                                                      "is its own run",
                                                                                                      "nargs": "+"})

    def __post_init__(self):
        check_config_fields(self)
        self.report_to = parse_report_to(self.report_to, "PipelineConfig")
        for name in ("n_demonstrations", "sft_epochs", "n_preference_prompts", "rm_epochs", "ppo_episodes",
                     "ppo_batch_size", "dpo_epochs", "max_new_tokens", "n_eval_prompts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PipelineConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.k_responses, int) or self.k_responses < 2:
            raise ValueError("PipelineConfig.k_responses must be >= 2 (a ranking needs two responses), got "
                             f"{self.k_responses!r}")
        if self.ppo_episodes < self.ppo_batch_size:
            raise ValueError(f"ppo_episodes {self.ppo_episodes} < ppo_batch_size {self.ppo_batch_size}: PPO would not "
                             "run one iteration")
        if not 0.0 < self.kl_setpoint_fraction <= 1.0:
            raise ValueError("PipelineConfig.kl_setpoint_fraction must be in (0, 1], got "
                             f"{self.kl_setpoint_fraction!r}")
        for name in ("ppo_snapshots", "dpo_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"PipelineConfig.{name} must be an integer >= 0, got {value!r}")
        self._check_stage_values()
        from rlhf_envs.lm.loading import resolve_model_path
        from rlhf_envs.rewards import available_reward_models

        if self.gold_reward not in available_reward_models():
            raise ValueError(f"PipelineConfig.gold_reward {self.gold_reward!r} is not a reward plugin; known: "
                             f"{available_reward_models()} (register one with rlhf_envs.register_reward_model)")
        if self.model_path is not None and not (resolve_model_path(self.model_path) / "config.json").is_file():
            raise FileNotFoundError(f"model_path {self.model_path!r} is not a Hugging Face model directory (no "
                                    "config.json)")
        for name in ("demonstrations_path", "prompts_path"):
            value = getattr(self, name)
            if value is not None and not Path(value).exists():
                raise FileNotFoundError(f"PipelineConfig.{name} {value!r} does not exist: give a JSONL, .jsonl.gz or "
                                        "parquet file or a datasets folder")
        if self.corpus_paths is not None:
            self._check_corpus()
        if self.prompts_path is not None:
            _prompt_splits(self)  # too few distinct prompts fails here, before anything is written

    def _check_corpus(self) -> None:
        """``corpus_paths``: the recipe's settings, then a corpus that is text and big enough for the splits asked
        for (:func:`agents.text_corpus.check_corpus`), before anything is written."""
        from agents.text_corpus import check_corpus

        check_corpus(self, _prompt_splits)

    def _check_stage_values(self) -> None:
        """Build each stage's config from these values now, so a bad ``beta``, learning rate or DPO loss
        fails before the first stage runs (and before anything is written), not hours later."""
        from agents.dpo import DPOConfig
        from agents.lm_ppo import LMPPOConfig
        from agents.reward_model import RewardModelConfig
        from agents.sft import SFTConfig

        try:
            SFTConfig(data_path="-", learning_rate=self.sft_learning_rate)
            RewardModelConfig(data_path="-", learning_rate=self.rm_learning_rate)
            LMPPOConfig(reward_model="learned", reward_model_path="-", total_episodes=self.ppo_episodes,
                        batch_size=self.ppo_batch_size, learning_rate=self.ppo_learning_rate,
                        max_new_tokens=self.max_new_tokens, beta=self.ppo_beta, kl_setpoint=self.kl_budget)
            DPOConfig(data_path="-", learning_rate=self.dpo_learning_rate, beta=self.dpo_beta, loss_type=self.dpo_loss,
                      label_smoothing=self.dpo_label_smoothing)
        except ValueError as err:
            raise ValueError(f"PipelineConfig: {err} (set through the pipeline's sft_/rm_/ppo_/dpo_ options)") from err


_N_VALIDATION_PROMPTS = 256
_N_PPO_CORPUS_PROMPTS = 512


def _prompt_splits(config: PipelineConfig) -> tuple[list[str], list[str], list[str], list[str]]:
    """Prompts for preferences, PPO, the KL-guarded choice of the PPO and DPO models (validation) and the
    evaluation, with no prompt in two of them.

    The distinct prompts of ``prompts_path`` or ``corpus_paths`` (or of embedded-corpus draws: the review
    grammar has about 1,500 distinct openings, so prompts drawn with different seeds would overlap) are
    shuffled with the seed and dealt out: ``n_eval_prompts`` to the evaluation (at most a quarter of them) and 256 to
    validation (at most a sixth), each once; of the rest, a third to PPO and two thirds to
    preferences. Those two take the draws (or lines) of their prompts, so a frequent prompt stays
    frequent there: preferences up to ``n_preference_prompts`` of them, PPO all (512 from the corpus).
    """
    if config.corpus_paths is not None:
        from agents.text_corpus import corpus_examples

        draws, source = corpus_examples(config.corpus_paths, config.seed)[1], f"the corpus {config.corpus_paths}"
    elif config.prompts_path is None:
        from rlhf_envs.corpus import make_prompts

        # enough draws that the preference and PPO shares (about 40% and 20% of the draws) fill their quotas
        n_draws = 4 * (config.n_preference_prompts + _N_PPO_CORPUS_PROMPTS)
        draws, source = make_prompts(n_draws, seed=config.seed + 2), "the corpus"
    else:
        from agents.data import read_prompts

        draws, source = read_prompts(config.prompts_path), config.prompts_path
    rng = np.random.default_rng(config.seed)
    distinct = list(dict.fromkeys(draws))
    distinct = [distinct[i] for i in rng.permutation(len(distinct))]
    n_eval = min(config.n_eval_prompts, len(distinct) // 4)
    n_val = min(_N_VALIDATION_PROMPTS, len(distinct) // 6)
    rest = distinct[n_eval + n_val:]
    n_ppo = len(rest) // 3
    if min(n_eval, n_val, n_ppo) < 1:
        raise ValueError(f"{source} has {len(distinct)} distinct prompts: give at least 6 (each goes to one of the "
                         f"preference, PPO, validation and evaluation splits)")
    ppo_set, pref_set = set(rest[:n_ppo]), set(rest[n_ppo:])
    shuffled = [draws[i] for i in rng.permutation(len(draws))]
    pref = [p for p in shuffled if p in pref_set][:config.n_preference_prompts]
    ppo = [p for p in shuffled if p in ppo_set]
    if config.prompts_path is None and config.corpus_paths is None:
        ppo = ppo[:_N_PPO_CORPUS_PROMPTS]
    return pref, ppo, distinct[n_eval:n_eval + n_val], distinct[:n_eval]


def _demonstrations_avoiding(n: int, seed: int, held_out: set[str]) -> list[dict[str, str]]:
    """``n`` corpus demonstrations whose prompt is none of ``held_out`` (the validation and evaluation prompts)."""
    from rlhf_envs.corpus import make_demonstrations

    draws = 2 * n
    while True:
        kept = [d for d in make_demonstrations(draws, seed=seed) if d["prompt"] not in held_out]
        if len(kept) >= n:
            return kept[:n]
        draws *= 2


def _stage(out: Path, name: str, config: PipelineConfig) -> bool:
    """True when stage ``name`` must run (it has not finished, or we are not resuming).

    Rank 0 decides (and clears the stage's folder) and tells the other processes of a data-parallel run.
    """
    run = True
    if is_main_process():
        done = out / name / "DONE"
        if config.resume and done.is_file():
            print(f"[pipeline] {name}: already done, kept")
            run = False
        elif (out / name).exists():
            shutil.rmtree(out / name)
    return _from_rank_zero(run)


def _from_rank_zero(value: Any) -> Any:
    """Rank 0's ``value`` on every process (a barrier too); ``value`` itself when training alone."""
    if distributed()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _mark_done(out: Path, name: str, info: dict) -> None:
    if is_main_process():
        (out / name / "DONE").write_text(json.dumps(info) + "\n")


def make_preferences(model_path: str, prompts: list[str], config: PipelineConfig,
                     seed: int) -> tuple[list[dict], list[dict], dict]:
    """The SFT model answers every prompt K times; the gold reward ranks the answers.

    Returns ``(rankings, pairs, stats)``: rankings ``{"prompt", "responses": [best..worst]}`` (prompts whose
    K answers all tie are dropped: they say nothing), and pairs (best vs worst) for DPO.
    """
    from agents.evaluate import EvalConfig, sample_and_score
    from rlhf_envs.text_common import TextTask

    k = config.k_responses
    repeated = [p for p in prompts for _ in range(k)]
    task = TextTask(model_path, config.gold_reward, repeated, beta=0.0, max_new_tokens=config.max_new_tokens)
    samples = sample_and_score(task, task.ref_model, EvalConfig(models={"sft": model_path}, seed=seed, batch_size=256,
                                                                max_new_tokens=config.max_new_tokens, progress=False))
    rankings, pairs = [], []
    gold = samples.gold.reshape(len(prompts), k)
    dropped_ties = 0
    for i, prompt in enumerate(prompts):
        answers = samples.responses[i * k:(i + 1) * k]
        # A ranking claims every earlier answer beats every later one, so answers that tie on the gold
        # reward (VADER gives 0 to many short answers) cannot both stay: keep the first of each score.
        ranked, scores = [], []
        for j in np.argsort(-gold[i], kind="stable"):
            if scores and gold[i][j] == scores[-1]:
                dropped_ties += 1
                continue
            ranked.append(answers[j])
            scores.append(float(gold[i][j]))
        if len(ranked) < 2:
            continue
        rankings.append({"prompt": prompt, "responses": ranked, "gold": scores})
        pairs.append({"prompt": prompt, "chosen": ranked[0], "rejected": ranked[-1]})
    stats = {"prompts": len(prompts), "rankings_kept": len(rankings), "tied_answers_dropped": dropped_ties,
             "mean_gold": float(gold.mean())}
    return rankings, pairs, stats


def _pretrain_stage(config: PipelineConfig, out: Path) -> None:
    """Stage 0 (with ``corpus_paths``): the base model, pretrained on the corpus."""
    from agents.pretrain import PretrainConfig, train_pretrain

    result = train_pretrain(PretrainConfig(
        corpus_paths=config.corpus_paths, model_path=config.model_path, output_dir=str(out / "pretrain"),
        seed=config.seed, size=config.pretrain_size, max_steps=config.pretrain_steps, progress=config.progress))
    _mark_done(out, "pretrain", result.metrics)


def _sft_stage(config: PipelineConfig, out: Path, base: str, held_out: set[str]) -> None:
    """Stage 1: SFT of the base model on demonstrations (drawn avoiding the validation and evaluation prompts)."""
    from agents.sft import SFTConfig, train_sft

    if config.corpus_paths is not None:
        from agents.text_corpus import corpus_examples

        demonstrations = [d for d in corpus_examples(config.corpus_paths, config.seed)[0]
                          if d["prompt"] not in held_out][:config.n_demonstrations]
    elif config.demonstrations_path is None:
        demonstrations = _demonstrations_avoiding(config.n_demonstrations, config.seed + 1, held_out)
    else:
        from agents.data import read_sft

        demonstrations = read_sft(config.demonstrations_path)[:config.n_demonstrations]
    if is_main_process():
        write_jsonl(out / "data" / "sft.jsonl", demonstrations)
    _from_rank_zero(None)  # the other processes read the file rank 0 wrote
    result = train_sft(SFTConfig(model_path=base, data_path=str(out / "data" / "sft.jsonl"),
                                 output_dir=str(out / "sft"),
                                 seed=config.seed, num_epochs=config.sft_epochs, learning_rate=config.sft_learning_rate,
                                 batch_size=32, max_length=64, progress=config.progress,
                                 report_to=config.report_to))
    _mark_done(out, "sft", result.metrics)


def _preferences_stage(config: PipelineConfig, out: Path, sft: str, prompts: list[str]) -> None:
    """Stage 2: the SFT model answers ``prompts`` K times; the gold reward ranks the answers (rank 0 alone)."""
    if is_main_process():  # the others wait for its files
        rankings, pairs, stats = make_preferences(sft, prompts, config, seed=config.seed + 3)
        (out / "preferences").mkdir(parents=True)
        write_jsonl(out / "data" / "rankings.jsonl", rankings)
        write_jsonl(out / "data" / "preferences.jsonl", pairs)
        _mark_done(out, "preferences", stats)
    _from_rank_zero(None)


def _rm_stage(config: PipelineConfig, out: Path, sft: str) -> None:
    """Stage 3: the Bradley-Terry reward model on the K-way rankings, from the SFT model."""
    from agents.reward_model import RewardModelConfig, train_reward_model

    result = train_reward_model(RewardModelConfig(
        model_path=sft, data_path=str(out / "data" / "rankings.jsonl"), output_dir=str(out / "rm"), seed=config.seed,
        num_epochs=config.rm_epochs, learning_rate=config.rm_learning_rate, batch_size=16, max_length=64,
        eval_fraction=0.1, progress=config.progress, report_to=config.report_to))
    _mark_done(out, "rm", result.metrics)


def _ppo_stage(config: PipelineConfig, out: Path, sft: str, rm: str, prompts: list[str], n_iterations: int) -> None:
    """Stage 4: RLHF PPO from SFT against the learned reward, the controller aiming below the KL budget."""
    from agents.lm_ppo import LMPPOConfig, train_lm_ppo

    snapshot_every = max(1, n_iterations // config.ppo_snapshots) if config.ppo_snapshots else 0
    result = train_lm_ppo(LMPPOConfig(
        model_path=sft, reward_model="learned", reward_model_path=rm, prompts=prompts, output_dir=str(out / "ppo"),
        seed=config.seed, total_episodes=config.ppo_episodes, batch_size=config.ppo_batch_size,
        learning_rate=config.ppo_learning_rate, max_new_tokens=config.max_new_tokens, beta=config.ppo_beta,
        kl_horizon=config.kl_horizon,
        kl_setpoint=None if config.kl_budget is None else config.kl_budget * config.kl_setpoint_fraction,
        max_approx_kl=config.ppo_max_approx_kl, snapshot_every=snapshot_every, progress=config.progress,
        report_to=config.report_to))
    _mark_done(out, "ppo", result.history[-1])


def _dpo_stage(config: PipelineConfig, out: Path, sft: str) -> None:
    """Stage 5: DPO from SFT on the best-vs-worst pairs, with intermediate checkpoints for the KL-guarded choice."""
    from agents.dpo import DPOConfig, train_dpo

    n_pairs = sum(1 for _ in open(out / "data" / "preferences.jsonl"))
    steps = max(1, config.dpo_epochs * n_pairs // 32)
    result = train_dpo(DPOConfig(
        model_path=sft, data_path=str(out / "data" / "preferences.jsonl"), output_dir=str(out / "dpo"),
        seed=config.seed,
        num_epochs=config.dpo_epochs, learning_rate=config.dpo_learning_rate, beta=config.dpo_beta,
        loss_type=config.dpo_loss, label_smoothing=config.dpo_label_smoothing, batch_size=32, max_length=64,
        eval_fraction=0.0, checkpoint_every=max(1, steps // config.dpo_checkpoints) if config.dpo_checkpoints else 0,
        keep_checkpoints=max(1, config.dpo_checkpoints), progress=config.progress, report_to=config.report_to))
    _mark_done(out, "dpo", result.metrics)


def _evaluate_and_report(config: PipelineConfig, out: Path, base: str, splits: tuple[list[str], ...],
                         n_iterations: int, timings: dict[str, float], statuses: dict[str, dict]) -> dict:
    """Stages 6-7: the KL-guarded choice of the reported models, the evaluation, ``summary.json`` and the report."""
    from agents.evaluate import EvalConfig, evaluate_models, write_eval
    from agents.reports import write_report

    sft, rm = str(out / "sft"), str(out / "rm")
    _, _, validation_prompts, eval_prompts = splits
    t = time.perf_counter()
    selections = select_within_budget(out, sft, config, validation_prompts, candidates(out, sft, n_iterations))
    models = {"base": base, "sft": sft, "ppo": selections["ppo"]["path"], "dpo": selections["dpo"]["path"]}
    eval_config = EvalConfig(models=models, reference="sft", reward_model_path=rm, prompts=eval_prompts,
                             gold_reward=config.gold_reward, max_new_tokens=config.max_new_tokens, seed=config.seed,
                             progress=config.progress)
    evaluation = evaluate_models(eval_config)
    write_eval(evaluation, out / "eval.json")
    curves = over_optimisation_curves(out, sft, rm, config, eval_prompts[:128])
    write_eval(curves, out / "curves.json")
    timings["eval"] = time.perf_counter() - t

    rm_metrics = json.loads((out / "rm" / "DONE").read_text())
    summary = {
        **_stage_summary(statuses),
        "rm_heldout_accuracy": rm_metrics.get("eval/accuracy"),
        "ppo_win_rate_vs_sft": _row(evaluation, "ppo")["win_rate_vs_sft"],
        "ppo_kl_to_sft": _row(evaluation, "ppo")["kl_to_sft"],
        "dpo_win_rate_vs_sft": _row(evaluation, "dpo")["win_rate_vs_sft"],
        "dpo_kl_to_sft": _row(evaluation, "dpo")["kl_to_sft"],
        "kl_budget": config.kl_budget,
        "ppo_selected": selections["ppo"]["selected"],
        "dpo_selected": selections["dpo"]["selected"],
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "total_seconds": round(sum(timings.values()), 1),
        "preferences": json.loads((out / "preferences" / "DONE").read_text()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(out, config, evaluation, curves, summary)
    return summary


def run_pipeline(config: PipelineConfig) -> dict:
    """Run every stage and write the report; returns the summary (also in ``summary.json``).

    Stages (each skipped when ``resume`` finds it done): :func:`_pretrain_stage` (with ``corpus_paths``),
    :func:`_sft_stage`, :func:`_preferences_stage`, :func:`_rm_stage`, :func:`_ppo_stage`, :func:`_dpo_stage`,
    then :func:`_evaluate_and_report` on rank 0. Each stage's check (:mod:`agents.stage_checks`) runs when it
    ends; a gold reward that leaves fewer than 2 rankings stops the run after preferences, with the report.
    """
    from agents.distributed import check_divides_among_processes
    from agents.stage_checks import announce, stage_status
    from rlhf_envs.lm.loading import EMBEDDED_MODEL_DIR

    check_divides_among_processes(config.ppo_batch_size, "ppo_batch_size")  # before any stage runs
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        join_process_group(torch.device("cpu"))
    out = Path(config.output_dir)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        (out / "pipeline_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    base = str(out / "pretrain") if config.corpus_paths is not None else config.model_path or str(EMBEDDED_MODEL_DIR)
    sft, rm = str(out / "sft"), str(out / "rm")
    n_iterations = max(1, config.ppo_episodes // config.ppo_batch_size)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    splits = _prompt_splits(config)
    pref_prompts, ppo_prompts, validation_prompts, eval_prompts = splits
    stages = {"pretrain": lambda: _pretrain_stage(config, out)} if config.corpus_paths is not None else {}
    stages |= {
        "sft": lambda: _sft_stage(config, out, base, set(validation_prompts) | set(eval_prompts)),
        "preferences": lambda: _preferences_stage(config, out, sft, pref_prompts),
        "rm": lambda: _rm_stage(config, out, sft),
        "ppo": lambda: _ppo_stage(config, out, sft, rm, ppo_prompts, n_iterations),
        "dpo": lambda: _dpo_stage(config, out, sft),
    }
    statuses: dict[str, dict] = {}
    for name, run_stage in stages.items():
        if _stage(out, name, config):
            run_stage()
        timings[name] = time.perf_counter() - t
        t = time.perf_counter()
        if is_main_process():
            statuses[name] = stage_status(name, json.loads((out / name / "DONE").read_text()), statuses)
            announce(name, statuses[name])
        if name == "preferences" and _from_rank_zero(is_main_process() and _rankings_kept(out) < 2):
            return _stop_without_rankings(config, out, list(stages), statuses, timings) if is_main_process() else {}
    if not is_main_process():  # evaluation and the report are rank 0's; the others are done
        _from_rank_zero(None)
        return {}
    summary = _evaluate_and_report(config, out, base, splits, n_iterations, timings, statuses)
    _from_rank_zero(None)
    return summary


def _row(evaluation: dict, name: str) -> dict:
    return next(r for r in evaluation["rows"] if r["model"] == name)


def _rankings_kept(out: Path) -> int:
    return json.loads((out / "preferences" / "DONE").read_text())["rankings_kept"]


def _stage_summary(statuses: dict[str, dict]) -> dict:
    """The run's status (``ok``, or ``failed-to-learn`` when a stage did not learn), its warnings, each stage's
    finding."""
    from agents.stage_checks import FAILED, OK, warnings_of

    failed = any(s["status"] == FAILED for s in statuses.values())
    return {"status": FAILED if failed else OK, "warnings": warnings_of(statuses), "stages": statuses}


def _stop_without_rankings(config: PipelineConfig, out: Path, stages: list[str], statuses: dict[str, dict],
                           timings: dict[str, float]) -> dict:
    """The gold reward tied (nearly) every prompt's answers: no reward model, PPO or DPO can train. Write the
    summary and a report that says so, and return the summary."""
    from agents.reports import write_stopped_report
    from agents.stage_checks import NOT_RUN

    statuses |= {name: {"status": NOT_RUN} for name in stages if name not in statuses}
    summary = {**_stage_summary(statuses), "stopped_after": "preferences",
               "seconds": {k: round(v, 1) for k, v in timings.items()},
               "total_seconds": round(sum(timings.values()), 1),
               "preferences": json.loads((out / "preferences" / "DONE").read_text())}
    summary["warnings"].append(f"the run stopped after preferences: {_rankings_kept(out)} rankings kept, a reward "
                               "model "
                               "needs at least 2 (one to train on, one held out); rm, ppo and dpo did not run.")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_stopped_report(out, config, summary)
    return summary
