"""Run the whole benchmark suite, one script after another, then print the README's tables.

    python -m benchmarks            # everything (about an hour on 2 CPU cores)
    python -m benchmarks --tables   # only print the tables from benchmarks/results/*.json
    python -m benchmarks --tables --write   # and rewrite them in README.md and benchmarks/README.md
    python -m benchmarks --only catgrid sampling

Each script runs in its own process (so one's threads and memory do not colour the next) and
writes ``benchmarks/results/<name>.json``; the tables below are made from those files alone.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from benchmarks.common import RESULTS_DIR

READMES = (Path(__file__).resolve().parent.parent / "README.md", Path(__file__).resolve().parent / "README.md")

SCRIPTS = {
    "catgrid": ["benchmarks.bench_catgrid"],
    "frontier": ["benchmarks.bench_frontier"],
    "sampling": ["benchmarks.bench_sampling", "--repeats", "9", "--threads", "1"],
    "sampling_2threads": ["benchmarks.bench_sampling", "--repeats", "9", "--threads", "2",
                          "--out", str(RESULTS_DIR / "sampling_2threads.json")],
    "ppo_iteration": ["benchmarks.bench_ppo_iteration", "--threads", "1"],
    "breakdown": ["benchmarks.bench_breakdown", "--threads", "1"],
    "trainers": ["benchmarks.bench_trainers"],
    "trainers_2threads": ["benchmarks.bench_trainers", "--threads", "2", "--out",
                          str(RESULTS_DIR / "trainers_2threads.json")],
    "trainers_shakespeare": ["benchmarks.bench_trainers", "--data", "shakespeare"],
    "trainers_shakespeare_bf16": ["benchmarks.bench_trainers", "--data", "shakespeare", "--algorithms", "dpo",
                                  "--bf16"],
    "lora": ["benchmarks.bench_lora"],
    "data_parallel": ["benchmarks.bench_data_parallel"],
    "trainers_llama": ["benchmarks.bench_trainers", "--model", "embedded-llama", "--no-shipped",
                       "--out", str(RESULTS_DIR / "trainers_llama.json")],
    "trainers_10m": ["benchmarks.bench_trainers", "--size", "10m", "--steps", "6", "--no-shipped",
                     "--out", str(RESULTS_DIR / "trainers_10m.json")],
    "trainers_10m_llama": ["benchmarks.bench_trainers", "--model", "embedded-llama", "--size", "10m", "--steps", "6",
                           "--no-shipped", "--out", str(RESULTS_DIR / "trainers_10m_llama.json")],
    "sampling_llama": ["benchmarks.bench_sampling", "--model", "embedded-llama", "--threads", "1", "--repeats", "7",
                       "--out", str(RESULTS_DIR / "sampling_llama.json")],
    "reliability": ["benchmarks.bench_reliability"],
    "dialogue": ["benchmarks.bench_dialogue"],
    "pipeline": ["benchmarks.bench_pipeline", "--threads", "1"],
    "shakespeare": ["benchmarks.bench_shakespeare", "--threads", "1"],
    "corpus_kjv": ["benchmarks.bench_corpus", "--kjv", "--threads", "1"],
    "grpo": ["benchmarks.bench_grpo"],
}


def _load(name: str) -> dict | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _f(x, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def _when(d: dict) -> str:
    """A results file's date and, where it recorded them, its CPU's vector features (they move the ratios)."""
    m = d.get("machine", {})
    features = m.get("cpu_features")
    if features is None:
        return m.get("date", "?")
    kind = "AVX-512, bf16" if "avx512_bf16" in features else "AVX-512" if "avx512f" in features else "AVX2, no bf16"
    return f"{m.get('date', '?')} ({kind})"


def sections() -> dict[str, str]:
    """Every generated table, by name, from the results files: ``speed`` (all rows), ``pipeline``, ``shakespeare``,
    ``reliability``; ``speed_headline`` is the one-thread subset the README shows."""
    out: dict[str, str] = {}
    perf = ["| comparison (same machine, same run) | ours | peer | ratio | measured on | script |",
            "|---|---|---|---|---|---|"]
    if (d := _load("catgrid")) is not None:
        for row in d["step_throughput"]:
            perf.append(f"| `{row['ours']}` env steps/s vs Gymnasium `{row['peer']}` | "
                        f"{_f(row['ours_steps_per_s'], 0)} | "
                        f"{_f(row['peer_steps_per_s'], 0)} | {_f(row['ratio'])}x | {_when(d)} | bench_catgrid |")
        for row in d["vector_throughput"]:
            perf.append(f"| `{row['env']}` vector env, {row['num_envs']} envs, steps/s | {_f(row['steps_per_s'], 0)} "
                        f"| | | {_when(d)} | bench_catgrid |")
        for row in d["ppo_summary"]:
            perf.append(f"| PPO wall time to 95% of optimum on `{row['env']}` (median of {row['seeds']} seeds; "
                        f"reached {row['seeds_reached_ours']}/{row['seeds']} vs "
                        f"{row['seeds_reached_sb3']}/{row['seeds']}) vs SB3 PPO, same hyper-parameters | "
                        f"{_f(row['ours_median_s'])} s | {_f(row['sb3_median_s'])} s | "
                        f"{_f(row['wall_ratio_ours_over_sb3'])}x the time | {_when(d)} | bench_catgrid |")
    for name in ("sampling", "sampling_2threads", "sampling_llama"):
        if (d := _load(name)) is None:
            continue
        s, threads = d["samplers"], f"{d['torch_threads']} thread{'s' if d['torch_threads'] > 1 else ''}"
        if "llama" in str(d.get("model", "")):
            threads += "; Llama twin"
        perf.append(f"| sampler tokens/s vs HF `generate` (batch {d['batch']}, {d['max_new_tokens']} new tokens, "
                    f"T={d['sampling']['temperature']}, "
                    f"top-k {d['sampling']['top_k']}, top-p {d['sampling']['top_p']}; {threads}) | "
                    f"{_f(s['rlhf_envs.generate']['tokens_per_s'], 0)} | "
                    f"{_f(s['hf.generate']['tokens_per_s'], 0)} | {_f(d['speedup_vs_hf'])}x | {_when(d)} | "
                    "bench_sampling |")
        b = d["bandit_step"]
        perf.append(f"| `TextBandit` scoring step (reference pass + reward) vs sampling the {b['num_envs']} "
                    "responses, prompts the reference "
                    f"has seen before ({threads}) | {_f(b['step_median_s'] * 1000, 1)} ms | "
                    f"{_f(b['sample_median_s'] * 1000, 1)} ms | "
                    f"{_f(b['step_over_sample'], 3)} of it | {_when(d)} | bench_sampling |")
        if "first_sight_step_median_s" in b:
            perf.append(f"| the same step on prompts the reference meets for the first time ({threads}) | "
                        f"{_f(b['first_sight_step_median_s'] * 1000, 1)} ms | {_f(b['sample_median_s'] * 1000, 1)} ms "
                        "| "
                        f"{_f(b['first_sight_step_over_sample'], 3)} of it | {_when(d)} | bench_sampling |")
        if (t := d.get("token_step")) is not None:
            perf.append(f"| `TextToken` vector step, {t['num_envs']} envs: reference on our lean GPT-2 forward vs "
                        "Hugging Face's forward "
                        f"({threads}) | {_f(t['lean_median_s'] * 1000)} ms | {_f(t['hf_median_s'] * 1000)} ms | "
                        f"{_f(t['speedup'])}x | {_when(d)} | bench_sampling |")
    for file in ("trainers", "trainers_2threads", "trainers_shakespeare", "trainers_shakespeare_bf16", "trainers_llama",
                 "trainers_10m", "trainers_10m_llama"):
        if (d := _load(file)) is None:
            continue
        for name, r in d["results"].items():
            threads = f"{d['settings']['threads']} thread{'s' if d['settings']['threads'] > 1 else ''}"
            threads += _model_label(d)
            if d.get("data") == "shakespeare":
                tokens = d["mean_tokens_per_sequence_" + ("sft" if name == "sft" else "pairs")]
                threads += f"; long Shakespeare sequences, {tokens:.0f} tokens on average"
            if d["settings"].get("bf16"):
                threads += "; bf16 autocast on both sides"
            for variant, key in (("matched settings", "trl"), ("as shipped", "trl_shipped")):
                if key not in r["median"]:
                    continue
                ours, peer = r["median"]["ours"], r["median"][key]
                perf.append(f"| {name.upper()} {r['unit']} vs TRL `{r['trl_trainer']}` ({variant}; {threads}); peak "
                            "RSS MiB | "
                            f"{_f(ours['per_second'], 1)}; {_f(ours['peak_rss_mib'], 0)} | "
                            f"{_f(peer['per_second'], 1)}; {_f(peer['peak_rss_mib'], 0)} | "
                            f"{_f(ours['per_second'] / peer['per_second'])}x | {_when(d)} | bench_trainers |")
    if (d := _load("ppo_iteration")) is not None:
        phases = ", ".join(f"{p['phase']} {_f(p['median_seconds'])} s ({p['share']:.0%})" for p in d["phases"])
        perf.append(f"| one RLHF PPO iteration, batch {d['settings']['batch_size']} (embedded model) | {phases} | | | "
                    f"{_when(d)} | bench_ppo_iteration |")
    if (d := _load("lora")) is not None:
        runs = d["runs"]
        lora, full = runs[f"LoRA r={d['rank']}"], runs["full fine-tuning"]
        perf.append(f"| DPO peak RSS MiB, LoRA r={d['rank']} vs full fine-tuning "
                    f"({d['n_parameters'] / 1e6:.0f}M-param GPT-2, "
                    f"batch {d['batch_size']}); pairs/s | {_f(lora['peak_rss_mib'], 0)}; "
                    f"{_f(lora['pairs_per_second'])} | "
                    f"{_f(full['peak_rss_mib'], 0)}; {_f(full['pairs_per_second'])} | "
                    f"{_f(d['peak_memory_ratio_lora_over_full'])}x the memory | {_when(d)} | bench_lora |")
    if (d := _load("data_parallel")) is not None:
        for name, r in d["results"].items():
            m = r["median_per_second"]
            perf.append(f"| {name.upper()} {r['unit']}, data parallel: 2 processes x 1 thread (torchrun, DDP) vs 1 "
                        "process x 1 thread; "
                        f"vs 1 process x 2 threads ({_f(m['1 process x 2 threads'], 1)}, "
                        f"{_f(r['two_processes_over_two_threads'])}x) | "
                        f"{_f(m['2 processes x 1 thread'], 1)} | {_f(m['1 process x 1 thread'], 1)} | "
                        f"{_f(r['two_processes_over_one_thread'])}x | {_when(d)} | bench_data_parallel |")
    out["speed"] = "\n".join(perf)
    out["speed_headline"] = "\n".join(perf[:2] + [r for r in perf[2:] if _headline(r)])

    if (d := _load("pipeline")) is not None:
        rows = ["| seed | RM held-out accuracy | PPO model | PPO win rate vs SFT | PPO KL to SFT (target) | DPO model "
                "| DPO win rate vs SFT | DPO KL to SFT | Elo SFT / PPO / DPO | wall |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in d["runs"]:
            rows.append(f"| {r['seed']} | {_f(r['rm_heldout_accuracy'])} | {r.get('ppo_selected') or 'final'} | "
                        f"{_f(r['ppo_win_rate_vs_sft'])} | {_f(r['ppo_kl_to_sft'])} "
                        f"({r.get('kl_budget', r.get('target_kl'))}) | "
                        f"{r.get('dpo_selected') or 'final'} | {_f(r['dpo_win_rate_vs_sft'])} | "
                        f"{_f(r['dpo_kl_to_sft'])} | {_f(r['elo_sft'], 0)} / {_f(r['elo_ppo'], 0)} / "
                        f"{_f(r['elo_dpo'], 0)} | "
                        f"{_f(r['wall_seconds'], 0)} s |")
        out["pipeline"] = "\n".join(rows)
    if (d := _load("shakespeare")) is not None and "rows" in d:
        cols = ["model", "gold_reward", "proxy_reward", "kl_to_sft", "kl_to_sft_stderr", "win_rate_vs_sft", "elo"]
        cols += ["repetition"] if all("repetition" in r for r in d["rows"]) else []
        rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in d["rows"]:
            rows.append("| " + " | ".join(_f(r[c], 3) if isinstance(r.get(c),
                                                                    float) else str(r.get(c)) for c in cols) + " |")
        out["shakespeare"] = "\n".join(rows)
    if (d := _load("frontier")) is not None:
        out["frontier"] = _frontier_table(d)
    if (d := _load("catgrid")) is not None and d.get("ppo_8x8_runs"):
        out["catgrid_8x8"] = _catgrid_8x8_table(d)
    corpora = [d for d in (_load("shakespeare"), _load("corpus_kjv")) if d is not None and "figures" in d]
    if corpora:
        out["corpus"] = _corpus_table(corpora)
    if (d := _load("grpo")) is not None:
        out["grpo"] = _grpo_table(d, _load("grpo_trl"))
    if (d := _load("dialogue")) is not None:
        out["dialogue"] = _dialogue_table(d)
    if (d := _load("reliability")) is not None:
        out["reliability"] = "\n".join([
            "| figure | value |", "|---|---|",
            "| bad inputs (one parametrised table) rejected with a clear error and no state change | "
            f"{d['bad_inputs_rejected_correctly']} / {d['bad_inputs_tried']} |",
            "| Hypothesis examples (random maps, seeds, actions, hand-overs through every env) | "
            f"{d['hypothesis_examples']} in {d['hypothesis_tests']} properties |",
            "| SIGKILL crash points survived (resumed run equal to an uninterrupted one) | "
            f"{d['crash_points_survived']} |",
            f"| runs compared bit for bit | {d['runs_compared_bit_for_bit']} |",
            f"| reliability suite wall time | {_f(d['wall_seconds'], 0)} s ({d['pytest_summary']}) |",
            *_kl_and_startup_rows(d)])
        if "kl" in d:
            out["kl_estimators"] = _kl_table(d["kl"])
    return out


def _kl_and_startup_rows(d: dict) -> list[str]:
    """The reliability table's rows for the KL estimators under truncated sampling and the CLI's start-up time."""
    rows = []
    if (kl := d.get("kl")) is not None:
        offered = [r for r in kl["rows"] if r.get("status") == "ok"]
        worst = max(abs(r["z"]) for r in offered)
        rows.append(f"| KL estimators `k1`, `k3` against the exact KL under {kl['settings']} sampling settings "
                    "(temperature, "
                    f"top-k, top-p, alone and combined), {kl['responses_per_setting']} responses each | "
                    f"{'all' if kl['all_within_3_se_or_refused'] else 'not all'} within 3 standard errors "
                    f"(largest \\|z\\| {worst:.2f}); `k2` refused as an env estimator |")
    if (t := d.get("cli_timing")) is not None:
        rows.append(f"| `rlhf --help` / a bad top-level option (median of 5, fresh process) | "
                    f"{_f(t['rlhf --help']['median_s'])} s / {_f(t['rlhf --no-such-option']['median_s'])} s |")
    return rows


def _frontier_table(d: dict) -> str:
    """Each algorithm on TextBanditExact-v0: the fraction of the achievable gain it closed and its KL to pi*."""
    names = {"rlhf_ppo": "RLHF PPO", "dpo": "DPO", "sft_best_of_16": "SFT on best-of-16"}
    rows = ["| algorithm | beta | gain closed, min / median of seeds | KL(pi \\|\\| pi*) median | seeds at 0.95 | "
            "measured on |",
            "|---|---|---|---|---|---|"]
    for r in d["summary"]:
        rows.append(f"| {names.get(r['algorithm'], r['algorithm'])} | {r['beta']:g} | {r['gain_closed_min']:.3f} / "
                    f"{r['gain_closed_median']:.3f} | {r['kl_to_optimum_median']:.3f} | "
                    f"{r['seeds_at_0.95']}/{r['seeds']} | "
                    f"{_when(d)} |")
    for beta in d["betas"]:
        curve = [c for c in d["dpo_pairs_curve"] if c["beta"] == beta]
        below = d["dpo_n_below_0_1_nats"].get(str(float(beta)))
        reached = f"below 0.1 nats from N={below:,}" if below else "not below 0.1 nats"
        points = ", ".join(f"N={c['n_pairs']:,}: {c['kl_to_optimum']:.3f}" for c in curve)
        rows.append(f"| DPO, KL(pi \\|\\| pi*) against pairs N | {beta:g} | {points} | {reached} | | {_when(d)} |")
    return "\n".join(rows)


def _catgrid_8x8_table(d: dict) -> str:
    """Per 8x8 map: steps to 95% of the exact optimum on each seed, ours and SB3's PPO with one budget."""
    rows = ["| map | our PPO: steps to 95% of optimum, per seed (wall) | SB3 PPO, same settings | budget | measured "
            "on |",
            "|---|---|---|---|---|"]
    for env in dict.fromkeys(r["env"] for r in d["ppo_8x8_runs"]):
        runs = [r for r in d["ppo_8x8_runs"] if r["env"] == env]
        cell = {
            side: ", ".join(
                f"{r[side + '_steps'] / 1e6:.2f}M ({r[side + '_seconds']:.0f} s)"
                if r.get(side + "_steps")
                else "not reached"
                for r in runs
            )
            for side in ("ours", "sb3")
        }
        rows.append(f"| `{env}` | {cell['ours']} | {cell['sb3']} | {d['ppo_8x8_budget'] / 1e6:g}M steps | {_when(d)} |")
    return "\n".join(rows)


def _corpus_table(runs: list[dict]) -> str:
    """``rlhf pipeline --corpus`` on each text, pretraining included: the learning figures and the wall time."""
    rows = [
        "| corpus | pretraining held-out loss / unigram | RM held-out accuracy | PPO win rate vs SFT | "
        "DPO win rate vs SFT | wall (mean load on 2 cores) | measured on |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in runs:
        f, p = d["figures"], d["pretrain"]
        rows.append(
            f"| {', '.join(d['corpus'])} | {p['eval_loss']:.2f} / {p['eval_unigram_loss']:.2f} | "
            f"{f['rm_heldout_accuracy']:.3f} | {f['ppo_win_rate_vs_sft']:.3f} | "
            f"{f['dpo_win_rate_vs_sft']:.3f} | "
            f"{d['total_wall_seconds']:.0f} s ({d['machine_load']['load_1min_mean']:.1f}) | {_when(d)} |"
        )
    return "\n".join(rows)


def _grpo_table(d: dict, trl: dict | None) -> str:
    """Per seed: the task pipeline's held-out pass@1 (SFT, GRPO, PPO) and ours against TRL's GRPOTrainer."""
    versus = {r["seed"]: r for r in (trl or d)["versus_trl"]}
    rows = [
        "| seed | pass@1 SFT / GRPO / PPO (GRPO gain) | pass@8 SFT / GRPO | task pipeline wall | completions/s "
        "ours / "
        f"TRL {d['trl_version']} `GRPOTrainer` (pass@1 ours / TRL) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in d["pipeline"]:
        v = versus.get(r["seed"], {})
        rows.append(
            f"| {r['seed']} | {r['sft_pass@1']:.3f} / {r['grpo_pass@1']:.3f} / {r['ppo_pass@1']:.3f} "
            f"({r['gain_points']:+.1f} points) | {r['sft_pass@8']:.3f} / {r['grpo_pass@8']:.3f} | "
            f"{r['total_seconds']:.0f} s | {v.get('ours_completions_per_s', 0):,.0f} / "
            f"{v.get('trl_completions_per_s', 0):,.0f} ({v.get('ours_pass@1', 0):.3f} / "
            f"{v.get('trl_pass@1', 0):.3f}) "
            f"| {v.get('speedup', 0):.2f}x |"
        )
    return "\n".join(rows)


def _dialogue_table(d: dict) -> str:
    """Per seed: the guess game's turns as a multiple of the exact optimum, and the tool task's accuracy gap."""
    g, c = d["guess"], d["calc"]
    rows = [
        f"| seed | guess game, SFT: turns / optimum ({g['optimum_turns']:g}), solved | guess game, PPO | "
        "tool task, SFT: accuracy with / without the tool | tool task, PPO (gap) |",
        "|---|---|---|---|---|",
    ]
    for seed in sorted({r["seed"] for r in g["rows"]}):
        guess = {r["policy"]: r for r in g["rows"] if r["seed"] == seed and r["decoding"] == "sample"}
        calc = {r["policy"]: r for r in c["rows"] if r["seed"] == seed}
        rows.append(
            f"| {seed} | {guess['sft']['ratio']:.2f}x, {guess['sft']['solved']:.1%} | "
            f"{guess['ppo']['ratio']:.2f}x, {guess['ppo']['solved']:.1%} | "
            f"{calc['sft']['accuracy_tool']:.1%} / {calc['sft']['accuracy_no_tool']:.1%} | "
            f"{calc['ppo']['accuracy_tool']:.1%} / {calc['ppo']['accuracy_no_tool']:.1%} "
            f"({calc['ppo']['gap_points']:.0f} points) |"
        )
    cost = d["step_cost"]
    rows.append(
        f"| step cost | {cost['num_envs']}-env `TextDialogue` step vs a `TextBandit` step of the same tokens | "
        f"{cost['ms']['dialogue']:.1f} ms vs {cost['ms']['bandit_cached']:.1f} ms | "
        f"{cost['ratio_vs_bandit_cached']:.2f}x | {_when(d)} |"
    )
    return "\n".join(rows)


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell."""
    return text.replace("|", "\\|")


def _kl_table(kl: dict) -> str:
    """Each sampling setting's estimators against the exact KL (benchmarks/README.md)."""
    rows = [
        "| policy | sampling | estimator | mean | exact | bias (standard error) | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in kl["rows"]:
        if "mean" not in r:
            rows.append(f"| {r['policy']} | {r['sampling']} | {r['estimator']} | | | | {_cell(r['status'])} |")
            continue
        rows.append(
            f"| {r['policy']} | {r['sampling']} | {r['estimator']} | {r['mean']:.4f} | {r['exact']:.4f} | "
            f"{r['bias']:+.4f} ({r['bias_stderr']:.4f}) | {_cell(r['status'])} |"
        )
    return "\n".join(rows)


def _model_label(d: dict) -> str:
    """'' for the embedded GPT-2; else which model a trainer benchmark ran (the Llama twin, a 10M model)."""
    model, size = d["settings"].get("model", "gpt2"), d["settings"].get("size", "small")
    if model in ("gpt2", "embedded") and size == "small":
        return ""
    name = "Llama twin" if "llama" in model else "GPT-2"
    if size != "small":
        arch = "Llama" if "llama" in model else "GPT-2"
        name = f"{d['n_parameters'] / 1e6:.0f}M-param {arch}, {d['settings']['steps']} steps"
    return f"; {name}"


def _headline(row: str) -> bool:
    """The rows the README shows: one thread, float32, against a peer (the rest are in benchmarks/README.md)."""
    if any(
        word in row
        for word in ("2 threads", "Shakespeare", "bf16 autocast", "as shipped", "for the first time", "M-param")
    ):
        return False
    return any(word in row for word in ("vs Gymnasium", "vs SB3 PPO", "vs HF `generate`", "scoring step", "vs TRL"))


def tables() -> str:
    """Every table, as ``python -m benchmarks --tables`` prints them."""
    return "\n\n".join(text for name, text in sections().items() if name != "speed_headline")


_BLOCK = re.compile(r"(<!-- table: (\w+) -->\n)(.*?)(\n<!-- /table -->)", re.S)


def write_tables(path: Path) -> bool:
    """Rewrite every ``<!-- table: NAME -->`` ... ``<!-- /table -->`` block of ``path`` from the results files.

    Returns whether the file changed; a block whose table has no results file is left as it is.
    """
    text = path.read_text()
    made = sections()
    new = _BLOCK.sub(lambda m: m.group(1) + made.get(m.group(2), m.group(3)) + m.group(4), text)
    if new != text:
        path.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(SCRIPTS), default=None)
    parser.add_argument("--tables", action="store_true", help="print the tables only, run nothing")
    parser.add_argument(
        "--write",
        action="store_true",
        help="also rewrite the tables in README.md and benchmarks/README.md from the results files",
    )
    args = parser.parse_args(argv)
    failed = []
    if not args.tables:
        for name in args.only or SCRIPTS:
            print(f"\n=== {name}: python -m {' '.join(SCRIPTS[name])}", flush=True)
            if subprocess.run([sys.executable, "-m", *SCRIPTS[name]]).returncode != 0:
                failed.append(name)
    print(tables())
    if args.write:
        for readme in READMES:
            if readme.is_file() and write_tables(readme):
                print(f"rewrote the tables of {readme}")
    if failed:
        print(f"\nfailed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
