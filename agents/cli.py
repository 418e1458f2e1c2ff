"""The ``rlhf`` command. Every sub-command's options are its config dataclass's fields."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path


DATA_PARALLEL = ("sft", "rm", "dpo", "ppo", "pipeline")
"""The sub-commands that run data parallel when launched by ``torchrun`` (see :mod:`agents.lm_common`)."""


def add_config_args(parser: argparse.ArgumentParser, config_cls, skip: tuple[str, ...] = ()) -> None:
    """One ``--field-name`` option per dataclass field, with the field's help string and default."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in skip or not f.init:
            continue
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        # argparse %-formats help strings (the subcommands' formatter appends the default itself)
        help_text = f.metadata.get('help', '').replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        base = _base_type(kind)
        if f.metadata.get("nargs"):
            parser.add_argument(flag, dest=f.name, default=default, nargs=f.metadata["nargs"], help=help_text)
        elif base is bool:
            parser.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction, help=help_text)
        elif base in (dict, list) or typing.get_origin(base) in (dict, list):
            parser.add_argument(flag, dest=f.name, default=default, type=json.loads, help=help_text + " (JSON)")
        else:
            parser.add_argument(flag, dest=f.name, default=default, type=base, help=help_text)


def _base_type(kind):
    """``X`` for ``X | None``; ``str`` for ``Any``; otherwise the type itself."""
    args = typing.get_args(kind)
    if args and type(None) in args:
        kind = next(a for a in args if a is not type(None))
    return str if kind is typing.Any else kind


def config_from_args(config_cls, args: argparse.Namespace, **overrides):
    """Build ``config_cls`` from parsed options (its ``__post_init__`` validates the values)."""
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return config_cls(**values)


def _catgrid(args: argparse.Namespace) -> int:
    import gymnasium as gym
    import numpy as np

    import rlhf_envs  # noqa: F401
    from agents.ppo import PPOConfig, train_ppo
    from agents.reports import plot_learning_curve, save_policy
    from rlhf_envs.catgrid_solver import policy_return, solve

    out = Path(args.out)
    config = config_from_args(PPOConfig, args, log_dir=str(out))
    env = gym.make(config.env_id, **config.env_kwargs)
    optimum = solve(env).optimal_return
    states = np.arange(env.observation_space.n)
    fractions: list[tuple[int, float]] = []

    def evaluate(agent, step: int) -> bool:
        fractions.append((step, policy_return(env, agent.action_probs(states)) / optimum))
        return args.stop_at is not None and fractions[-1][1] >= args.stop_at

    result = train_ppo(config, callback=evaluate)
    save_policy(out / "policy", result.agent, config)
    plot_learning_curve(out / "learning_curve.png", fractions, title=f"Our PPO on {config.env_id}",
                        ylabel="exact expected return / optimum")
    summary = {"env_id": config.env_id, "optimal_return": optimum, "final_fraction_of_optimum": fractions[-1][1],
               "env_steps": result.global_step, "wall_seconds": round(result.seconds, 3)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"run folder: {out} (metrics.csv, learning_curve.png, policy/, summary.json)")
    return 0


def _train(config_cls, train_fn_path: str, skip: tuple[str, ...] = ()):
    """A sub-command that builds ``config_cls`` from the options and calls the trainer."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        module, name = train_fn_path.split(":")
        overrides = {}
        if getattr(args, "prompts_file", None):
            from agents.data import read_prompts

            overrides["prompts"] = read_prompts(args.prompts_file)
        result = getattr(importlib.import_module(module), name)(config_from_args(config_cls, args, **overrides))
        from agents.lm_common import is_main_process

        if not is_main_process():  # data parallel: rank 0 has the held-out metrics and speaks for the run
            return 0
        summary = {k: v for k, v in vars(result).items() if k != "history"}
        if hasattr(result, "history") and result.history:
            summary["last"] = result.history[-1]
        print(json.dumps(summary, indent=2, default=str))
        return 0

    return run


def _models_arg(values: list[str]) -> dict[str, str]:
    models = {}
    for item in values:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--model takes NAME=PATH (e.g. sft=runs/pipeline/sft), got {item!r}")
        models[name] = path
    return models


def _evaluate(args: argparse.Namespace) -> int:
    from agents.evaluate import EvalConfig, evaluate_models, write_eval
    from agents.reports import print_rows

    config = config_from_args(EvalConfig, args, models=_models_arg(args.model))
    result = evaluate_models(config)
    if args.command == "elo":
        rows = sorted(({"model": k, "elo": v} for k, v in result["elo"].items()), key=lambda r: -r["elo"])
    else:
        rows = result["rows"]
    print_rows(rows)
    if args.out:
        print(f"wrote {write_eval(result, Path(args.out))}")
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from agents.pipeline import PipelineConfig, run_pipeline

    summary = run_pipeline(config_from_args(PipelineConfig, args))
    from agents.lm_common import is_main_process

    if not is_main_process():  # data parallel: rank 0 evaluated and wrote the report
        return 0
    print(json.dumps(summary, indent=2))
    print(f"report: {Path(args.output_dir) / 'report.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from agents.dpo import DPOConfig
    from agents.evaluate import EvalConfig
    from agents.lm_ppo import LMPPOConfig
    from agents.pipeline import PipelineConfig
    from agents.ppo import PPOConfig
    from agents.reward_model import RewardModelConfig
    from agents.sft import SFTConfig

    parser = argparse.ArgumentParser(prog="rlhf", description="RLHF as Gymnasium environments, and the agents that train on them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    pipe = sub.add_parser("pipeline", formatter_class=fmt,
                          help="SFT -> reward model -> PPO, and DPO beside it, on the embedded default, with a report")
    add_config_args(pipe, PipelineConfig)
    pipe.set_defaults(func=_pipeline)

    for name, cls, fn, what in [
        ("sft", SFTConfig, "agents.sft:train_sft", "supervised fine-tuning on JSONL {prompt, completion}"),
        ("rm", RewardModelConfig, "agents.reward_model:train_reward_model",
         "reward model (Bradley-Terry) on JSONL pairs {prompt, chosen, rejected} or rankings {prompt, responses}"),
        ("dpo", DPOConfig, "agents.dpo:train_dpo", "DPO / IPO / conservative DPO on JSONL preference pairs"),
    ]:
        p = sub.add_parser(name, help=what, formatter_class=fmt)
        add_config_args(p, cls)
        p.set_defaults(func=_train(cls, fn))

    ppo = sub.add_parser("ppo", formatter_class=fmt, help="RLHF PPO of a causal LM against TextBandit-v0 (KL to a frozen reference)")
    add_config_args(ppo, LMPPOConfig, skip=("prompts", "ptx_texts"))
    ppo.add_argument("--prompts-path", "--prompts-file", dest="prompts_file", default=None,
                     help="prompts: rows with a 'prompt' (a string or role/content turns) in JSONL, .jsonl.gz, parquet "
                          "or a datasets folder (default: corpus prompts)")
    ppo.set_defaults(func=_train(LMPPOConfig, "agents.lm_ppo:train_lm_ppo"))

    for name, what in [("eval", "gold reward, proxy reward, KL to the reference and win rates of checkpoints"),
                       ("elo", "Elo ratings of checkpoints from head-to-head games judged by the gold reward")]:
        p = sub.add_parser(name, help=what, formatter_class=fmt)
        add_config_args(p, EvalConfig, skip=("models", "prompts"))
        p.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="a model to evaluate (repeat)")
        p.add_argument("--out", default=None, help="also write the full result as JSON here")
        p.set_defaults(func=_evaluate)

    grid = sub.add_parser("catgrid", help="train our PPO on a CatGrid env and report the fraction of the exact optimum",
                          formatter_class=fmt)
    add_config_args(grid, PPOConfig, skip=("log_dir",))
    grid.add_argument("--out", default="runs/catgrid", help="run folder")
    grid.add_argument("--stop-at", type=float, default=None, help="stop once this fraction of the optimum is reached")
    grid.set_defaults(func=_catgrid)
    return parser


def _quiet_transformers() -> None:
    """Our own progress bars say what is happening; transformers' per-load bars and load reports
    (e.g. the reward model's new score head, which is expected) would drown them."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _quiet_transformers()
    args = parser.parse_args(argv)
    try:
        if args.command not in DATA_PARALLEL:
            from agents.lm_common import refuse_distributed

            refuse_distributed(f"rlhf {args.command}")
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"rlhf {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
