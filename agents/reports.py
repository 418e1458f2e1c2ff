"""Pictures and small artefacts of a run: learning curves, saved policies."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from agents.data import read_jsonl  # noqa: E402


def plot_learning_curve(path: Path, points: list[tuple[int, float]], title: str, ylabel: str) -> Path:
    """Save a line plot of ``(env_step, value)`` points as a PNG."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", lw=1.5)
    ax.axhline(1.0, color="grey", ls="--", lw=1, label="optimum")
    ax.set(title=title, xlabel="env steps", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path




def _plot_panels(path: Path, steps: list, panels: list[tuple[list, str]], xlabel: str) -> Path:
    """One row of line plots sharing an x axis: ``panels`` are ``(values, title)``."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), dpi=110)
    for ax, (values, title) in zip(axes, panels):
        ax.plot(steps, values, lw=1.5)
        ax.set(xlabel=xlabel, title=title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_ppo_training(path: Path, metrics: list[dict]) -> Path:
    """Proxy reward, KL to the reference and beta over PPO iterations."""
    panels = [([m[key] for m in metrics], title) for key, title in [
        ("objective/scores", "proxy reward (reward model)"), ("objective/kl", "KL to SFT (nats / response)"),
        ("objective/kl_coef", "beta (KL coefficient)")]]
    return _plot_panels(path, [m["step"] for m in metrics], panels, "PPO iteration")


def plot_dpo_training(path: Path, metrics: list[dict]) -> Path:
    """DPO loss, implicit-reward accuracy and margin over steps."""
    rows = [m for m in metrics if "loss" in m and "lr" in m]  # training lines (eval lines have eval/ keys)
    panels = [([m.get(key) for m in rows], f"DPO {key}") for key in ("loss", "rewards/accuracies", "rewards/margins")]
    return _plot_panels(path, [m["step"] for m in rows], panels, "DPO step")


def plot_gold_vs_kl(path: Path, points: list[dict], kl_budget: float | None = None,
                    selected: dict[str, str] | None = None) -> Path:
    """Gold and proxy reward against KL to SFT for PPO and DPO checkpoints (reward over-optimisation).

    With ``kl_budget`` a dotted line marks the KL budget; ``selected`` (``{"ppo": "iter-00056", "dpo":
    "final"}``) rings each family's reported model.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    sft = next(p for p in points if p["model"] == "sft")
    for family, colour in [("ppo", "tab:blue"), ("dpo", "tab:orange")]:
        series = [sft] + [p for p in points if p["model"].startswith(family + "@")]
        series.sort(key=lambda p: p["kl_to_sft"])
        kl = [p["kl_to_sft"] for p in series]
        ax.plot(kl, [p["gold_reward"] for p in series], marker="o", color=colour, label=f"{family.upper()}: gold "
                                                                                        "reward")
        if all(p["proxy_reward"] is not None for p in series):
            ax.plot(kl, [p["proxy_reward"] for p in series], marker="x", ls="--", color=colour, alpha=0.6,
                    label=f"{family.upper()}: proxy (reward model)")
        chosen = [p for p in series if selected and p["model"] == f"{family}@{selected.get(family)}"]
        for p in chosen:
            ax.plot([p["kl_to_sft"]], [p["gold_reward"]], marker="o", ms=13, mfc="none", mec=colour, mew=2, ls="",
                    label=f"{family.upper()}: reported model")
    if kl_budget is not None:
        ax.axvline(kl_budget, color="grey", ls=":", lw=1.5, label=f"KL budget ({kl_budget:g})")
    ax.set(xlabel="KL to SFT (nats per response)", ylabel="mean reward on held-out prompts",
           title="Gold vs proxy reward as the policy moves away from SFT")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if v is None:
            return "n/a"
        if not isinstance(v, float):
            return str(v)
        return f"{v:.3f}" if abs(v) >= 5e-4 else "0.000"  # no "-0.000" for a KL of -1e-8 (float rounding)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out: Path, config, evaluation: dict, curves: dict, summary: dict) -> Path:
    """``report.md`` plus its PNG plots in the run folder."""
    plot_ppo_training(out / "ppo_training.png", read_jsonl(out / "ppo" / "metrics.jsonl"))
    plot_dpo_training(out / "dpo_training.png", read_jsonl(out / "dpo" / "metrics.jsonl"))
    selected = {family: summary.get(f"{family}_selected", "final") for family in ("ppo", "dpo")}
    plot_gold_vs_kl(out / "gold_vs_kl.png", curves["points"], config.kl_budget, selected)
    columns = ["model", "gold_reward", "proxy_reward", "kl_to_sft", "kl_to_sft_stderr", "kl_to_sft_k1",
               "win_rate_vs_sft", "elo", "repetition"]
    examples = "\n".join(
        f"- **{e['prompt']}**\n" + "\n".join(f"  - {name}: {e[name]!r}" for name in ("base", "sft", "ppo", "dpo"))
        for e in evaluation["examples"][:4])
    text = f"""# rlhf pipeline report

{warnings_block(summary)}Base model `{_base_name(config)}`, seed {config.seed},
{evaluation["n_prompts"]} held-out prompts, one sampled response each (temperature 1).
Gold reward: {_gold_name(config)}. Proxy reward: the
reward model trained on gold-ranked SFT samples. KL (`kl_to_sft`): KL(model || SFT) in nats per response, as the
exact KL between the two next-token distributions at every position of the sampled response, summed, with its standard
error over prompts; `kl_to_sft_k1` is the sampled log-ratio (k1) estimate of the same quantity, noisier. Win rate:
share of prompts where the model's response has a higher gold reward than SFT's (ties count half). Elo: Bradley-Terry
maximum likelihood over all head-to-head games judged by the gold reward, mean 1000. Repetition: share of responses in
which one word runs four or more times in a row ("my my my my"), the mark of a policy collapsed into a loop.

{_table(evaluation["rows"], columns)}

| figure | value |
|---|---|
| reward model held-out pairwise accuracy | {_fmt(summary["rm_heldout_accuracy"])} |
| PPO win rate vs SFT (gold) | {_fmt(summary["ppo_win_rate_vs_sft"])} |
| PPO KL to SFT (target {config.kl_budget}) | {_fmt(summary["ppo_kl_to_sft"])} |
| PPO model reported (latest within the KL budget, `ppo_selection.json`) | {summary.get("ppo_selected", "final")} |
| DPO win rate vs SFT (gold) | {_fmt(summary["dpo_win_rate_vs_sft"])} |
| DPO KL to SFT (target {config.kl_budget}) | {_fmt(summary["dpo_kl_to_sft"])} |
| DPO model reported (latest within the KL budget, `dpo_selection.json`) | {summary.get("dpo_selected", "final")} |
| wall time | {summary["total_seconds"]:.0f} s ({", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items())}) |

{stages_table(summary)}

![gold vs KL](gold_vs_kl.png)

![PPO training](ppo_training.png)

![DPO training](dpo_training.png)

## Samples

{examples}
"""
    tmp = out / "report.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "report.md")
    return out / "report.md"


def _base_name(config) -> str:
    if getattr(config, "corpus_paths", None):
        return f"pretrained on {', '.join(config.corpus_paths)} (pretrain/)"
    return config.model_path or "embedded default"


def _gold_name(config) -> str:
    name = getattr(config, "gold_reward", "sentiment")
    return "VADER sentiment (compound, in [-1, 1])" if name == "sentiment" else f"the `{name}` reward plugin"


def warnings_block(summary: dict) -> str:
    """The report's opening warning: every stage that did not learn, with its figure and what to change."""
    if not summary.get("warnings"):
        return ""
    lines = "\n".join(f"- **{line}**" for line in summary["warnings"])
    return f"## WARNING: this run did not learn everywhere\n\n{lines}\n\n"


def stages_table(summary: dict) -> str:
    """One row per stage: its status (ok, failed-to-learn, ran-against-failed, not-run) and its figure."""
    rows = [
        {"stage": name, "status": s["status"], "figure": s.get("figure", "")}
        for name, s in summary.get("stages", {}).items()
    ]
    return "## Did each stage learn?\n\n" + _table(rows, ["stage", "status", "figure"]) if rows else ""


def write_stopped_report(out: Path, config, summary: dict) -> Path:
    """``report.md`` of a run that stopped after preferences (nothing for a reward model to train on)."""
    text = (
        f"# rlhf pipeline report\n\n{warnings_block(summary)}Base model `{_base_name(config)}`, seed "
        f"{config.seed}. "
        f"Gold reward: {_gold_name(config)}.\n\n{stages_table(summary)}\n"
    )
    tmp = out / "report.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "report.md")
    return out / "report.md"


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def print_rows(rows: list[dict]) -> None:
    """Print dict rows as a Markdown table."""
    if rows:
        print(_table(rows, list(rows[0])))
