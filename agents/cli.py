"""The ``rlhf`` command. Every sub-command's options are its config dataclass's fields."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path


def add_config_args(parser: argparse.ArgumentParser, config_cls, skip: tuple[str, ...] = ()) -> None:
    """One ``--field-name`` option per dataclass field, with the field's help string and default."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in skip or not f.init:
            continue
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        flag = "--" + f.name.replace("_", "-")
        base = _base_type(kind)
        if base is bool:
            parser.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction, help=help_text)
        elif base in (dict, list) or typing.get_origin(base) in (dict, list):
            parser.add_argument(flag, dest=f.name, default=default, type=json.loads, help=help_text + " (JSON)")
        else:
            parser.add_argument(flag, dest=f.name, default=default, type=base, help=help_text)


def _base_type(kind):
    """``X`` for ``X | None``; otherwise the type itself."""
    args = typing.get_args(kind)
    if args and type(None) in args:
        return next(a for a in args if a is not type(None))
    return kind


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


def build_parser() -> argparse.ArgumentParser:
    from agents.ppo import PPOConfig

    parser = argparse.ArgumentParser(prog="rlhf", description="RLHF as Gymnasium environments, and the agents that train on them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    grid = sub.add_parser("catgrid", help="train our PPO on a CatGrid env and report the fraction of the exact optimum",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_args(grid, PPOConfig, skip=("log_dir",))
    grid.add_argument("--out", default="runs/catgrid", help="run folder")
    grid.add_argument("--stop-at", type=float, default=None, help="stop once this fraction of the optimum is reached")
    grid.set_defaults(func=_catgrid)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"rlhf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
