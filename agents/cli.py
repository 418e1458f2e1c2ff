"""The ``rlhf`` command. Every sub-command's options are its config dataclass's fields."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from rlhf_envs.compat import RENAMED_FIELDS

DATA_PARALLEL = ("pretrain", "sft", "rm", "dpo", "ppo", "pipeline")
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
            parser.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction,
                                help=help_text)
        elif base in (dict, list) or typing.get_origin(base) in (dict, list):
            parser.add_argument(flag, dest=f.name, default=default, type=json.loads, help=help_text + " (JSON)")
        elif base is not kind:  # X | None: "none" gives None
            parser.add_argument(flag, dest=f.name, default=default, type=_optional(base),
                                help=help_text + " ('none': None)")
        else:
            parser.add_argument(flag, dest=f.name, default=default, type=base, help=help_text)
    for old_name, new_name in getattr(config_cls, RENAMED_FIELDS, {}).items():
        if new_name not in skip:
            kind = hints[new_name]
            base = _base_type(kind)
            parse = None if base is bool else base if base is kind else _optional(base)
            parser.add_argument("--" + old_name.replace("_", "-"), dest=new_name, help=argparse.SUPPRESS,
                                action=_RenamedOption, type=parse, new_flag="--" + new_name.replace("_", "-"))


class _RenamedOption(argparse.Action):
    """An old option name: still accepted, with a warning that names the new one."""

    def __init__(self, option_strings, dest, new_flag: str, **kwargs):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} was renamed to {self.new_flag}; use {self.new_flag}",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def _optional(base):
    """An argparse ``type`` reading ``none`` (any case) as None and anything else as ``base``."""

    def parse(text: str):
        return None if text.lower() == "none" else base(text)

    parse.__name__ = base.__name__  # argparse names the type in its "invalid float value" message
    return parse


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
    from agents.checkpoint import save_model_dir
    from agents.ppo import PPOConfig, train_ppo
    from agents.reports import plot_learning_curve
    from rlhf_envs.catgrid_solver import policy_return, solve

    out = Path(args.out)
    config = config_from_args(PPOConfig, args, log_dir=str(out))
    if config.env_id not in gym.registry:
        known = sorted(i for i in gym.registry if i.startswith("CatGrid"))
        raise ValueError(f"--env-id {config.env_id!r} is not a registered Gymnasium id; the CatGrid ids are {known}")
    env = gym.make(config.env_id, **config.env_kwargs)
    optimum = solve(env).optimal_return
    states = np.arange(env.observation_space.n)
    fractions: list[tuple[int, float]] = []

    def evaluate(agent, step: int) -> bool:
        fractions.append((step, policy_return(env, agent.action_probs(states)) / optimum))
        return args.stop_at is not None and fractions[-1][1] >= args.stop_at

    result = train_ppo(config, callback=evaluate)
    save_model_dir(out / "policy", model=result.agent, json_files={"config.json": dataclasses.asdict(config)})
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
        overrides = {}
        if getattr(args, "prompts_file", None):
            from agents.data import read_prompts

            overrides["prompts"] = read_prompts(args.prompts_file)
        result = _load(train_fn_path)(config_from_args(config_cls, args, **overrides))
        from agents.distributed import is_main_process

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
    from agents.distributed import is_main_process

    if not is_main_process():  # data parallel: rank 0 evaluated and wrote the report
        return 0
    print(json.dumps(summary, indent=2))
    for line in summary.get("warnings", []):
        print(f"[pipeline] WARNING {line}", file=sys.stderr)
    print(f"report: {Path(args.output_dir) / 'report.md'}")
    return 0 if summary.get("status", "ok") == "ok" else FAILED_TO_LEARN_EXIT


FAILED_TO_LEARN_EXIT = 3
"""``rlhf pipeline``'s exit status when the run finished but a stage did not learn (see :mod:`agents.stage_checks`)."""


def _add_corpus_arg(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--corpus", dest="corpus_paths", nargs="+", required=required, default=None, metavar="FILE",
                        help="plain-text (UTF-8) files" + ("" if required else ": pretrain on them and cut the "
                             "demonstrations and prompts out of them (agents.text_corpus)"))


def _task_pipeline(args: argparse.Namespace) -> int:
    from agents.task_pipeline import TaskPipelineConfig, run_task_pipeline

    summary = run_task_pipeline(config_from_args(TaskPipelineConfig, args))
    print(json.dumps(summary, indent=2))
    print(f"report: {Path(args.output_dir) / 'report.md'}")
    return 0


_COMMANDS: dict[str, str] = {
    "pipeline": "SFT -> reward model -> PPO, and DPO beside it, on the embedded default or your own text (--corpus), "
                "with a report",
    "pretrain": "pretrain a causal LM (and a BPE tokenizer) on plain-text files",
    "sft": "supervised fine-tuning on JSONL {prompt, completion}",
    "rm": "reward model (Bradley-Terry) on JSONL pairs {prompt, chosen, rejected} or rankings {prompt, responses}",
    "dpo": "DPO / IPO / conservative DPO on JSONL preference pairs",
    "ppo": "RLHF PPO of a causal LM against TextBandit-v0 (KL to a frozen reference)",
    "grpo": "critic-free group RL (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++) against a text env with group sampling",
    "task-pipeline": "SFT -> GRPO, and RLHF PPO beside it, on a verifiable task (arithmetic), with pass@k report",
    "eval": "gold reward, proxy reward, KL to the reference and win rates of checkpoints",
    "elo": "Elo ratings of checkpoints from head-to-head games judged by the gold reward",
    "catgrid": "train our PPO on a CatGrid env and report the fraction of the exact optimum",
}
"""Every sub-command and its one-line help. Only the chosen one's options are built (its config module imports
torch), so ``rlhf --help`` and a bad command answer without importing torch or transformers."""

_TRAINERS = {"pretrain": ("agents.pretrain:PretrainConfig", "agents.pretrain:train_pretrain"),
             "sft": ("agents.sft:SFTConfig", "agents.sft:train_sft"),
             "rm": ("agents.reward_model:RewardModelConfig", "agents.reward_model:train_reward_model"),
             "dpo": ("agents.dpo:DPOConfig", "agents.dpo:train_dpo"),
             "ppo": ("agents.lm_ppo:LMPPOConfig", "agents.lm_ppo:train_lm_ppo"),
             "grpo": ("agents.grpo:GRPOConfig", "agents.grpo:train_grpo")}


def _load(path: str):
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _add_run_folder_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run folder that already holds a run (without it, a non-empty folder is refused "
                             "unless --resume)")


def _add_command_args(name: str, p: argparse.ArgumentParser) -> None:
    """The options of sub-command ``name`` (imports its config's module)."""
    if name == "pipeline":
        add_config_args(p, _load("agents.pipeline:PipelineConfig"), skip=("corpus_paths",))
        _add_corpus_arg(p, required=False)
        _add_run_folder_args(p)
        p.set_defaults(func=_pipeline)
    elif name == "task-pipeline":
        add_config_args(p, _load("agents.task_pipeline:TaskPipelineConfig"))
        _add_run_folder_args(p)
        p.set_defaults(func=_task_pipeline)
    elif name in _TRAINERS:
        cls = _load(_TRAINERS[name][0])
        add_config_args(p, cls, skip={"ppo": ("prompts", "ptx_texts"), "grpo": ("prompts",),
                                      "pretrain": ("corpus_paths",)}.get(name, ()))
        if name == "pretrain":
            _add_corpus_arg(p, required=True)
        if name in ("ppo", "grpo"):
            p.add_argument("--prompts-path", "--prompts-file", dest="prompts_file", default=None,
                           help="prompts: rows with a 'prompt' (a string or role/content turns) in JSONL, .jsonl.gz, "
                                "parquet or a datasets folder (default: corpus prompts)")
        _add_run_folder_args(p)
        p.set_defaults(func=_train(cls, _TRAINERS[name][1]))
    elif name in ("eval", "elo"):
        add_config_args(p, _load("agents.evaluate:EvalConfig"), skip=("models", "prompts"))
        p.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="a model to evaluate "
                                                                                            "(repeat)")
        p.add_argument("--out", default=None, help="also write the full result as JSON here")
        p.set_defaults(func=_evaluate)
    else:
        add_config_args(p, _load("agents.ppo:PPOConfig"), skip=("log_dir",))
        p.add_argument("--out", default="runs/catgrid", help="run folder")
        p.add_argument("--stop-at", type=float, default=None, help="stop once this fraction of the optimum is reached")
        _add_run_folder_args(p)
        p.set_defaults(func=_catgrid)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``rlhf`` parser: every sub-command listed; the options of ``command`` only (all of them when None,
    none when ``""``)."""
    parser = argparse.ArgumentParser(prog="rlhf",
                                     description="RLHF as Gymnasium environments, and the agents that train on them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, what in _COMMANDS.items():
        p = sub.add_parser(name, help=what, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if command is None or command == name:
            _add_command_args(name, p)
    return parser


def _command_in(argv: list[str]) -> str:
    """The sub-command named in ``argv`` (the first word that is not an option), or ``""``."""
    word = next((a for a in argv if not a.startswith("-")), "")
    return word if word in _COMMANDS else ""


def _quiet_transformers() -> None:
    """Our own progress bars say what is happening; transformers' per-load bars and load reports
    (e.g. the reward model's new score head, which is expected) would drown them."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _check_run_folder(args: argparse.Namespace) -> None:
    """Refuse a run folder that is a file, or that already holds a run, unless ``--resume`` or ``--overwrite``.

    ``--overwrite`` empties the folder first, but only one that an ``rlhf`` command wrote (it has a
    ``config.json``, ``pipeline_config.json``, ``metrics.jsonl`` or ``metrics.csv``), never any other folder.
    """
    import shutil

    option = "--output-dir" if hasattr(args, "output_dir") else "--out"
    value = getattr(args, "output_dir", getattr(args, "out", None))
    if value is None or not hasattr(args, "overwrite"):
        return
    folder = Path(value)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{option} {value!r} is an existing file, not a folder; give a folder path")
    if not folder.is_dir() or not any(folder.iterdir()) or getattr(args, "resume", False):
        return
    if not args.overwrite:
        raise FileExistsError(f"{option} {value!r} already holds a run; pass --resume to continue it, --overwrite to "
                              "replace it, or another folder")
    markers = ("config.json", "pipeline_config.json", "metrics.jsonl", "metrics.csv")
    if not any((folder / m).is_file() for m in markers):
        raise FileExistsError(f"--overwrite refuses to empty {value!r}: it has none of {list(markers)}, so no rlhf "
                              "command wrote it; remove it yourself or give another folder")
    shutil.rmtree(folder)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_in(argv)).parse_args(argv)
    try:
        _check_run_folder(args)
        _quiet_transformers()
        if args.command not in DATA_PARALLEL:
            from agents.distributed import refuse_distributed

            refuse_distributed(f"rlhf {args.command}")
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        print(f"rlhf {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        # a reward plugin failing mid-run or an unknown env id: one line, not a traceback
        from gymnasium.error import Error as GymError

        from rlhf_envs.rewards import RewardModelError

        if not isinstance(err, (RewardModelError, GymError)):
            raise
        resumable = isinstance(err, RewardModelError)
        hint = " (checkpoints written so far are intact: fix it and rerun with --resume)" if resumable else ""
        print(f"rlhf {args.command}: error: {err}{hint}", file=sys.stderr)
        return 1
    finally:
        if "torch" in sys.modules:  # never import torch just to find no process group
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
