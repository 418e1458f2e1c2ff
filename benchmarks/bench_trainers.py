"""Our SFT, reward-model and DPO trainers against TRL's ``SFTTrainer``, ``RewardTrainer`` and ``DPOTrainer``.

Every run uses the same model (a seeded random GPT-2 saved to a temporary directory: 4 layers,
width 128, 4 heads, the embedded tokenizer's vocabulary on CPU; GPT-2-small's shape on CUDA), the
same data (demonstrations from :mod:`rlhf_envs.corpus`; preference pairs are two completions of one
prompt ranked by the gold VADER reward), the same batch size, max length, number of optimizer steps
(one pass over the data), learning rate, device, no evaluation, no checkpoints, logging off and the
same torch threads. TRL runs in two variants. "Matched" (side ``trl``) also takes ours' linear
schedule, no warmup or weight decay, clipping at 1.0, fp32 (with ``--bf16``, bf16 autocast on both
sides) and in-process dataloader, which turns off ``gradient_checkpointing`` and (without ``--bf16``)
``bf16`` (TRL turns both on by default). Each side keeps its own runtime behaviour: ours, with bf16
on CPU, turns oneDNN's primitive cache off (:func:`agents.lm_common.start_run`); TRL keeps oneDNN's
default cache, which serves its padded batches' recurring shapes (with the cache off, TRL matched in
bf16 ran at under half its speed in a trial run on the Shakespeare pairs). "As shipped" (side
``trl_shipped``) sets only the experiment and leaves every other field at TRL's config default; the
JSON's ``trl_shipped_differs_from_matched`` lists, per algorithm, each resolved config field where
the two variants differ (found by comparing the two configs' ``to_dict()``). Both variants pass
``use_cpu`` on CPU: it names the device, and transformers refuses ``bf16`` on a machine without a GPU
unless it is set.

Every run is its own subprocess, so its peak memory (VmHWM from /proc, or CUDA's max allocated) is
its own; the three sides take turns (the order rotates from one repeat to the next) and the table
reports medians, the ratio of the medians against each TRL variant (``ours/TRL matched``,
``ours/TRL as shipped``) and the median of the per-repeat ratios (``paired``: the runs of a repeat saw
the same machine load); the JSON adds the ratio of the fastest runs (``speedup_best``). The timed
region starts right before the first training batch and ends after the last optimizer step; it
excludes model loading, tokenisation and the final save on both sides. It includes the reference
log-probs of DPO on both sides: ours computes them in one pass over the data before the loop,
TRL (``precompute_ref_log_probs=False`` in both variants, its default) runs the reference model on
every batch inside the loop.

    python -m benchmarks.bench_trainers [--quick] [--device cpu|cuda] [--repeats 3] [--threads 2] [--out PATH]
                                        [--data reviews|shakespeare] [--algorithms sft rm dpo]
                                        [--model gpt2|embedded-llama] [--size small|10m]

``--model embedded-llama`` trains the Llama-architecture twin of the embedded model
(``rlhf_envs/assets/embedded-llama``: RMSNorm, rotary positions, grouped-query attention, SwiGLU), on
the packed path through transformers' own forward (:mod:`rlhf_envs.lm.hf_packed`); ``--size 10m``
takes a seeded random model of about 10M parameters of the chosen architecture instead (GPT-2: 6
layers, width 384; Llama: 6 layers, width 384, 6 heads over 2 key/value heads, SwiGLU 1024), built from
a config, untrained: a speedup that holds there is not an artefact of a tiny model.

Writes ``benchmarks/results/trainers.json`` (``trainers_cuda.json`` with ``--device cuda``,
``trainers_shakespeare.json`` with ``--data shakespeare``; ``python -m benchmarks`` also runs it on two
threads into ``trainers_2threads.json``, and on the Shakespeare data). The review pairs are short
(about 14 tokens a sequence); ``--data shakespeare`` takes long ones from the public-domain text in
``../shared/data`` (about 94 tokens, near ``max_length``), where attention and the padding TRL
computes weigh more.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from benchmarks.common import RESULTS_DIR, print_table, write_json

if TYPE_CHECKING:
    from transformers import TrainingArguments

ALGORITHMS = ("sft", "rm", "dpo")
SIDES = ("ours", "trl", "trl_shipped")
TRL_VARIANTS = {"trl": "TRL matched", "trl_shipped": "TRL as shipped"}
UNITS = {"sft": "samples/s", "rm": "pairs/s", "dpo": "pairs/s"}
TARGETS = {"sft": 1.5, "rm": 1.5, "dpo": 4.0}
MODEL_TARGETS = {("embedded-llama", "small"): 3.0, ("gpt2", "10m"): 2.5, ("embedded-llama", "10m"): 2.5}
"""Issue 23's targets against TRL matched, the same for the three trainers: the Llama twin and the 10M models."""
TRL_TRAINERS = {"sft": "SFTTrainer", "rm": "RewardTrainer", "dpo": "DPOTrainer"}
TIMED = {
    "sft": "forward, loss on completion tokens, backward, clip, AdamW step, per batch",
    "rm": "forward of chosen and rejected texts, Bradley-Terry loss, backward, clip, AdamW step, per batch",
    "dpo": "ours: one no-grad reference pass over all pairs before the loop, then policy forward/backward/step "
           "per batch; TRL, both variants (default precompute_ref_log_probs=False): reference forward and policy "
           "forward/backward/step per batch",
}


@dataclass(frozen=True)
class Settings:
    """What both sides of every comparison share."""

    steps: int
    batch_size: int = 32
    max_length: int = 128
    learning_rate: float = 1e-4
    beta: float = 0.1
    threads: int = 1
    device: str = "cpu"
    seed: int = 0
    bf16: bool = False
    """bf16 autocast on ours and on TRL matched (TRL as shipped has it on by default either way)."""
    model: str = "gpt2"
    """``gpt2`` or ``embedded-llama`` (see the module docstring)."""
    size: str = "small"
    """``small`` (the embedded model's size) or ``10m`` (about 10M parameters, random)."""


def build_model(path: Path, device: str, seed: int = 0, model: str = "gpt2", size: str = "small") -> int:
    """Save the benchmark's model and the embedded tokenizer to ``path``; returns its parameter count.

    ``gpt2``, small: a seeded random GPT-2 of 4 layers, width 128, 4 heads, no dropout (the embedded model's
    shape) on CPU; GPT-2 small's shape (12 layers, width 768, 12 heads, its 50257-token embedding) on CUDA.
    ``embedded-llama``, small: the embedded Llama twin's trained weights. ``10m``: a seeded random model of
    about 10M parameters of either architecture (see the module docstring).
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from rlhf_envs.lm.loading import load_causal_lm, load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(None)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if model == "embedded-llama" and size == "small":
        built = load_causal_lm(resolve_model_path("embedded-llama"))[0]
    elif model == "embedded-llama":
        built = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=384, intermediate_size=1024,
                                             num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                                             max_position_embeddings=128, tie_word_embeddings=True, **special))
    else:
        shape = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024) if device == "cuda" else \
            dict(n_layer=4, n_embd=128, n_head=4, vocab_size=len(tokenizer), n_positions=128)
        if size == "10m":
            shape = dict(n_layer=6, n_embd=384, n_head=6, vocab_size=len(tokenizer), n_positions=128)
        built = GPT2LMHeadModel(GPT2Config(**shape, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special))
    built.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in built.parameters())


def preference_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` pairs ``{"prompt", "chosen", "rejected"}``: two corpus completions of one prompt, ranked by VADER.

    Within each prompt's completions (sorted by gold reward), the best is paired with the worst, the
    second best with the second worst, and so on; ties are skipped.
    """
    from rlhf_envs.corpus import make_demonstrations
    from rlhf_envs.rewards import SentimentReward

    gold = SentimentReward()
    pairs: list[dict[str, str]] = []
    pool = 4 * n
    while len(pairs) < n:
        demos = make_demonstrations(pool, seed)
        scores = gold.score([d["prompt"] for d in demos], [d["completion"] for d in demos])
        groups: dict[str, list[tuple[float, str]]] = {}
        for demo, score in zip(demos, scores):
            groups.setdefault(demo["prompt"], []).append((float(score), demo["completion"]))
        pairs = []
        for prompt, group in groups.items():
            group.sort(key=lambda item: -item[0])
            for (high, chosen), (low, rejected) in zip(group[: len(group) // 2], reversed(group[len(group) // 2 :])):
                if high > low:
                    pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        pool *= 2
    return pairs[:n]


SHAKESPEARE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyshakespeare.txt"
"""The public-domain text of ``--data shakespeare`` (read from there, never copied into the repository)."""


def _cut(text: str, chars: int) -> str:
    """``text`` cut to at most ``chars`` characters, at a word boundary."""
    return text if len(text) <= chars else text[:chars].rsplit(" ", 1)[0]


def shakespeare_data(n: int, seed: int, path: Path = SHAKESPEARE) -> tuple[list[dict], list[dict]]:
    """``n`` demonstrations and ``n`` preference pairs from the speeches of tinyshakespeare: long sequences.

    A speech's first two lines (the speaker's name and the first line) are the prompt. The
    demonstration's completion is the rest of the speech; a pair's two answers are that rest and
    the lines of another speech, each cut at a word boundary to 100-400 characters, ranked by the
    gold VADER reward (ties skipped). With the embedded tokenizer a prompt and an answer come to
    about 94 tokens on average, so the trainers run near ``max_length`` 128, where the review pairs
    of :func:`preference_pairs` average 14.
    """
    import random

    from rlhf_envs.rewards import SentimentReward

    if not path.is_file():
        raise SystemExit(f"--data shakespeare reads {path}, which does not exist (the repository's ../shared/data)")
    speeches = [block.strip().split("\n") for block in path.read_text().split("\n\n")]
    speeches = [lines for lines in speeches if len(lines) >= 3]
    rng, gold = random.Random(seed), SentimentReward()
    demos, pairs = [], []
    while len(demos) < n or len(pairs) < n:
        candidates = []
        for _ in range(n):
            own, other = rng.sample(speeches, 2)
            prompt = "\n".join(own[:2])
            answers = [" " + _cut("\n".join(own[2:]), rng.randint(100, 400)),
                       " " + _cut("\n".join(other[1:]), rng.randint(100, 400))]
            demos.append({"prompt": prompt, "completion": answers[0]})
            candidates.append((prompt, answers))
        scores = gold.score([p for p, a in candidates for _ in a], [x for _, a in candidates for x in a]).reshape(-1, 2)
        pairs += [{"prompt": p, "chosen": a[int(s[1] > s[0])], "rejected": a[int(s[1] <= s[0])]}
                  for (p, a), s in zip(candidates, scores) if s[0] != s[1]]
    return demos[:n], pairs[:n]


def write_inputs(workdir: Path, settings: Settings, data: str = "reviews") -> dict:
    """The model directory and both JSONL datasets (one pass = ``steps * batch_size`` examples).

    ``data``: ``reviews`` (the project's corpus: short texts) or ``shakespeare`` (:func:`shakespeare_data`).
    """
    from rlhf_envs.corpus import make_demonstrations

    n = settings.steps * settings.batch_size
    n_params = build_model(workdir / "model", settings.device, settings.seed, settings.model, settings.size)
    demos, pairs = shakespeare_data(n, settings.seed) if data == "shakespeare" else \
        (make_demonstrations(n, settings.seed), preference_pairs(n, settings.seed))
    for name, rows in (("sft", demos), ("pairs", pairs)):
        (workdir / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"n_parameters": n_params, "examples": n, "data": data, **token_lengths(workdir, settings.max_length)}


def token_lengths(workdir: Path, max_length: int) -> dict:
    """Mean tokens per sequence (prompt and answer, cut at ``max_length``) of both datasets, with the embedded
    tokenizer."""
    from rlhf_envs.lm.loading import load_tokenizer

    tokenizer = load_tokenizer(None)
    lengths = {}
    for name, answers in (("sft", ("completion",)), ("pairs", ("chosen", "rejected"))):
        rows = [json.loads(line) for line in (workdir / f"{name}.jsonl").read_text().splitlines()]
        counts = [len(tokenizer(row["prompt"] + row[a], truncation=True,
                                max_length=max_length)["input_ids"]) for row in rows for a in answers]
        lengths[f"mean_tokens_per_sequence_{name}"] = sum(counts) / len(counts)
    return lengths


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_ours(algorithm: str, workdir: Path, out: Path, s: Settings) -> float:
    """Seconds of our trainer's timed region (its ``TrainResult.train_seconds``); a run whose last logged
    loss is not finite is an error, not a figure."""
    result = train_ours(algorithm, workdir, out, s)
    if not math.isfinite(result.metrics.get("loss", math.nan)):
        raise RuntimeError(f"{algorithm}: our run ended with loss {result.metrics.get('loss')!r}; its speed is not a "
                           "figure")
    return result.train_seconds


def train_ours(algorithm: str, workdir: Path, out: Path, s: Settings, **overrides):
    """Our trainer on the benchmark's model and data with the shared settings (``overrides``: more config fields)."""
    from agents.dpo import DPOConfig, train_dpo
    from agents.reward_model import RewardModelConfig, train_reward_model
    from agents.sft import SFTConfig, train_sft

    config_cls, train, data = {
        "sft": (SFTConfig, train_sft, "sft.jsonl"),
        "rm": (RewardModelConfig, train_reward_model, "pairs.jsonl"),
        "dpo": (DPOConfig, train_dpo, "pairs.jsonl"),
    }[algorithm]
    extra = {"beta": s.beta} if algorithm == "dpo" else {}
    config = config_cls(model_path=str(workdir / "model"), data_path=str(workdir / data), output_dir=str(out),
                        seed=s.seed, max_steps=s.steps, batch_size=s.batch_size, max_length=s.max_length,
                        learning_rate=s.learning_rate, lr_schedule="linear", warmup_ratio=0.0, weight_decay=0.0,
                        max_grad_norm=1.0, eval_fraction=0.0, log_every=s.steps, checkpoint_every=0,
                        device=s.device, torch_threads=s.threads, progress=False, **extra, **{"bf16": s.bf16,
                                                                                              **overrides})
    return train(config)


def trl_config(algorithm: str, side: str, out: Path, s: Settings) -> TrainingArguments:
    """TRL's config for ``algorithm`` (``sft``, ``rm``, ``dpo``) and ``side`` (``trl`` matched, ``trl_shipped``).

    Both variants set the experiment: seed, batch size, max length, steps, learning rate (and DPO's
    ``beta``), device, no evaluation, no saving, logging off. ``trl`` also sets what ours does (linear
    schedule, no warmup or weight decay, clipping at 1.0, fp32, no gradient checkpointing, in-process
    dataloader, completion-only SFT loss, sigmoid DPO loss); ``trl_shipped`` leaves all that at TRL's defaults.
    """
    from trl import DPOConfig, RewardConfig, SFTConfig

    experiment = dict(output_dir=str(out), seed=s.seed, max_steps=s.steps, per_device_train_batch_size=s.batch_size,
                      max_length=s.max_length, learning_rate=s.learning_rate, use_cpu=s.device == "cpu",
                      eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
                      disable_tqdm=True)
    matched = dict(lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                   gradient_checkpointing=False, bf16=s.bf16, fp16=False, dataloader_num_workers=0,
                   dataloader_pin_memory=s.device == "cuda")
    config_cls, algorithm_matched = {
        "sft": (SFTConfig, dict(completion_only_loss=True)),
        "rm": (RewardConfig, {}),
        "dpo": (DPOConfig, dict(loss_type=["sigmoid"])),
    }[algorithm]
    extra = {"beta": s.beta} if algorithm == "dpo" else {}
    if side == "trl":
        return config_cls(**experiment, **matched, **algorithm_matched, **extra)
    return config_cls(**experiment, **extra)


def shipped_differences(algorithm: str, s: Settings) -> dict[str, dict]:
    """Each resolved config field where TRL as shipped differs from TRL matched: ``{field: {"matched", "shipped"}}``."""
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        matched = trl_config(algorithm, "trl", Path(out), s).to_dict()
        shipped = trl_config(algorithm, "trl_shipped", Path(out), s).to_dict()
    return {key: {"matched": matched[key],
                  "shipped": shipped.get(key)} for key in matched if matched[key] != shipped.get(key)}


def run_trl(algorithm: str, side: str, workdir: Path, out: Path, s: Settings) -> float:
    """Seconds of TRL's timed region: ``on_train_begin`` to the end of the last optimizer step."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOTrainer, RewardTrainer, SFTTrainer

    class Timer(TrainerCallback):
        start = end = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            _sync(s.device)
            Timer.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == state.max_steps:
                _sync(s.device)
                Timer.end = time.perf_counter()

    model = str(workdir / "model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    data = "sft.jsonl" if algorithm == "sft" else "pairs.jsonl"
    rows = [json.loads(line) for line in (workdir / data).read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    trainer_cls = {"sft": SFTTrainer, "rm": RewardTrainer, "dpo": DPOTrainer}[algorithm]
    trainer = trainer_cls(model, args=trl_config(algorithm, side, out, s), train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
    return Timer.end - Timer.start


def rss_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MiB, from /proc; ``ru_maxrss`` where there is no /proc.

    ``ru_maxrss`` alone would not do: Linux carries it over from the parent process across fork and exec.
    """
    status = Path("/proc/self/status")
    if not status.exists():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    line = next(line for line in status.read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def worker(algorithm: str, side: str, workdir: Path, s: Settings) -> dict:
    """Run one side once in this process; returns seconds, throughput and peak memory (MiB)."""
    torch.set_num_threads(s.threads)
    warnings.simplefilter("ignore")
    if Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak is this process's own
    if side == "ours":
        import agents.dpo  # noqa: F401, E401  (imports are outside the measured setup)
    else:
        import datasets  # noqa: F401, E401
    if s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_start = rss_mib("VmRSS")
    with tempfile.TemporaryDirectory(dir=workdir) as out:
        seconds = run_ours(algorithm, workdir, Path(out), s) if side == "ours" else \
            run_trl(algorithm, side, workdir, Path(out), s)
    result = {"seconds": seconds, "per_second": s.steps * s.batch_size / seconds,
              "peak_rss_mib": rss_mib("VmHWM"),
              "rss_after_imports_mib": rss_start}
    if s.device == "cuda":
        result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _spawn(algorithm: str, side: str, workdir: Path, s: Settings) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_trainers", "--worker", algorithm, side, "--workdir", str(workdir),
           "--settings", json.dumps(asdict(s))]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(s.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} {algorithm} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 steps, 1 repeat: a smoke run")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 40, --quick 10)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per side (default 3, --quick 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on both sides (default 1: on a shared 2-core machine, 2 threads "
                             "oversubscribe)")
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    parser.add_argument("--data", choices=("reviews", "shakespeare"), default="reviews",
                        help="reviews: the project's corpus (about 14 tokens a sequence); shakespeare: speeches from "
                             "../shared/data/tinyshakespeare.txt (about 94, near max length 128)")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast on ours and on TRL matched (as TRL ships; weights and optimizer stay "
                             "float32)")
    parser.add_argument("--model", choices=("gpt2", "embedded-llama"), default="gpt2",
                        help="gpt2: a random GPT-2 of the embedded model's shape; embedded-llama: the Llama twin")
    parser.add_argument("--size", choices=("small", "10m"), default="small",
                        help="small: the embedded model's size; 10m: a random model of about 10M parameters")
    parser.add_argument("--out", default=None,
                        help="results file (default benchmarks/results/trainers.json, trainers_cuda.json with "
                             "--device cuda; "
                             "_llama and _10m added for --model embedded-llama and --size 10m)")
    parser.add_argument("--no-shipped", action="store_true",
                        help="leave out TRL as shipped (the targets are against TRL matched): a third less time")
    parser.add_argument("--worker", nargs=2, metavar=("ALGORITHM", "SIDE"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker[0], args.worker[1], Path(args.workdir), Settings(**json.loads(args.settings)))
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch; run on a GPU machine or use --device cpu")
    steps = args.steps or (10 if args.quick else 40)
    repeats = args.repeats or (1 if args.quick else 3)
    settings = Settings(steps=steps, threads=args.threads, device=args.device, bf16=args.bf16, model=args.model,
                        size=args.size)
    memory_key = "cuda_max_allocated_mib" if args.device == "cuda" else "peak_rss_mib"
    sides = SIDES[:2] if args.no_shipped else SIDES
    targets = {a: MODEL_TARGETS.get((args.model, args.size), TARGETS[a]) for a in ALGORITHMS}
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        inputs = write_inputs(workdir, settings, args.data)
        for algorithm in args.algorithms:
            runs: dict[str, list[dict]] = {side: [] for side in sides}
            for repeat in range(repeats):
                for side in sides[repeat % len(sides):] + sides[:repeat % len(sides)]:
                    runs[side].append(_spawn(algorithm, side, workdir, settings))
                    print(f"{algorithm} {side} run {repeat + 1}/{repeats}: {runs[side][-1]['per_second']:.1f} "
                          f"{UNITS[algorithm]}, {runs[side][-1][memory_key]:.0f} MiB", flush=True)
            median = {side: {key: statistics.median(r[key] for r in runs[side]) for key in runs[side][0]}
                      for side in sides}
            best = {side: max(r["per_second"] for r in runs[side]) for side in sides}
            versus = {}
            for peer, label in ((peer, label) for peer, label in TRL_VARIANTS.items() if peer in sides):
                speedup = median["ours"]["per_second"] / median[peer]["per_second"]
                memory_ratio = median["ours"][memory_key] / median[peer][memory_key]
                versus[peer] = {
                    "label": label,
                    "speedup": speedup,
                    "speedup_paired_median": statistics.median(
                        a["per_second"] / b["per_second"] for a, b in zip(runs["ours"], runs[peer])
                    ),
                    "speedup_best": best["ours"] / best[peer],
                    "memory_ratio": memory_ratio,
                    "target_met": speedup >= targets[algorithm] and memory_ratio <= 1.0,
                }
            results[algorithm] = {
                "unit": UNITS[algorithm],
                "trl_trainer": TRL_TRAINERS[algorithm],
                "timed_region": TIMED[algorithm],
                "trl_shipped_differs_from_matched": shipped_differences(algorithm, settings),
                "median": median,
                "best_per_second": best,
                "runs": runs,
                "target_speedup": targets[algorithm],
                "versus": versus,
            }
            row = {
                "algorithm": algorithm,
                "unit": UNITS[algorithm],
                "ours": median["ours"]["per_second"],
                "TRL matched": median["trl"]["per_second"],
                "TRL as shipped": None,
                "ours/TRL matched": versus["trl"]["speedup"],
                "ours/TRL as shipped": None,
                "paired matched": versus["trl"]["speedup_paired_median"],
                "paired shipped": None,
                "target": f">= {targets[algorithm]}x",
                "ours MiB": median["ours"][memory_key],
                "matched MiB": median["trl"][memory_key],
                "shipped MiB": None,
            }
            if "trl_shipped" in sides:
                row.update(
                    {
                        "TRL as shipped": median["trl_shipped"]["per_second"],
                        "ours/TRL as shipped": versus["trl_shipped"]["speedup"],
                        "paired shipped": versus["trl_shipped"]["speedup_paired_median"],
                        "shipped MiB": median["trl_shipped"][memory_key],
                    }
                )
            rows.append({key: value for key, value in row.items() if value is not None})
    import trl

    print_table(
        f"Training throughput, ours vs TRL {trl.__version__} ({args.model} {args.size}, {args.device}, "
        f"{args.data} data"
        f"{', bf16 autocast' if args.bf16 else ''}, {steps} steps of "
        f"{settings.batch_size}, median of {repeats})",
        rows,
    )
    default = (
        "trainers"
        + ("_shakespeare" if args.data == "shakespeare" else "")
        + ("_bf16" if args.bf16 else "")
        + ("_cuda" if args.device == "cuda" else "")
        + ("_10m" if args.size == "10m" else "")
        + ("_llama" if args.model == "embedded-llama" else "")
    )
    out = Path(args.out) if args.out else RESULTS_DIR / f"{default}.json"
    write_json(
        out.stem,
        {
            "command": "python -m benchmarks.bench_trainers " + " ".join(sys.argv[1:]),
            "trl_version": trl.__version__,
            "settings": asdict(settings),
            "repeats": repeats,
            **inputs,
            "memory": "CUDA max allocated (MiB)"
            if args.device == "cuda"
            else "peak resident set size of the run's own process (VmHWM, MiB), its imports included",
            "excluded_from_timing": "process start, imports, model load, tokenisation, trainer construction, "
                                    "final save",
            "sides": {
                "ours": "our trainer",
                "trl": "TRL with every setting matched to ours",
                "trl_shipped": "TRL with only the experiment set, everything else at its config defaults",
            },
            "target": "target_met: ours/TRL >= target_speedup (ratio of medians) and memory_ratio (ours/TRL) <= 1.0",
            "results": results,
        },
        out.parent,
    )


if __name__ == "__main__":
    main()
