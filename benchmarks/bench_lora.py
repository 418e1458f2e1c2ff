"""DPO with LoRA adapters against full fine-tuning: peak memory and pairs per second.

Both runs train the same randomly initialised GPT-2 of GPT-2 small's depth and width (12 layers,
width 768, 12 heads; the embedded tokenizer's 1,024-token vocabulary, so 86M parameters) on the
same preference pairs (:func:`benchmarks.bench_trainers.preference_pairs`), same batch, steps,
learning rate and threads, each in its own subprocess so that its peak resident memory (VmHWM) is
its own. Full fine-tuning holds gradients and AdamW's two moments for every weight; LoRA (rank
``--rank`` on every attention and MLP projection) holds them for the adapters only. In both, the
reference log-probs come from the policy's own weights before training (LoRA: adapters off), so
no second copy of the model is held.

    python -m benchmarks.bench_lora [--steps 4] [--batch-size 8] [--rank 8] [--threads 2]

Writes ``benchmarks/results/lora.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from benchmarks.bench_trainers import preference_pairs, rss_mib
from benchmarks.common import print_table, write_json

TARGETS = "c_attn,c_proj,c_fc"


def build_model(path: Path) -> int:
    """Save a seeded random GPT-2-small-shaped model and the embedded tokenizer to ``path``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_envs.lm.loading import load_tokenizer

    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=len(tokenizer), n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def worker(workdir: Path, rank: int, args: argparse.Namespace) -> dict:
    """One DPO run in this process: seconds, pairs/s, peak RSS and trainable parameters."""
    from agents.dpo import DPOConfig, train_dpo

    warnings.simplefilter("ignore")
    if Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak is this process's own
    config = DPOConfig(model_path=str(workdir / "model"), data_path=str(workdir / "pairs.jsonl"),
                       output_dir=str(workdir / f"out-r{rank}"), max_steps=args.steps, batch_size=args.batch_size,
                       learning_rate=1e-4, eval_fraction=0.0, log_every=args.steps, torch_threads=args.threads,
                       progress=False, lora_r=rank, lora_alpha=2.0 * max(rank, 1),
                       lora_target_modules=TARGETS if rank else None)
    result = train_dpo(config)
    return {"seconds": result.train_seconds, "pairs_per_second": result.samples_per_second,
            "peak_rss_mib": rss_mib("VmHWM")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print("RESULT " + json.dumps(worker(Path(args.workdir), args.worker, args)))
        return
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as tmp:
        workdir = Path(tmp)
        n_params = build_model(workdir / "model")
        pairs = preference_pairs(args.steps * args.batch_size, seed=0)
        (workdir / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        runs = {}
        for name, rank in (("full fine-tuning", 0), (f"LoRA r={args.rank}", args.rank)):
            cmd = [sys.executable, "-m", "benchmarks.bench_lora", "--worker", str(rank), "--workdir", str(workdir),
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            runs[name] = json.loads(lines[-1][len("RESULT "):])
            print(f"{name}: {runs[name]}")
    full, lora = runs["full fine-tuning"], runs[f"LoRA r={args.rank}"]
    rows = [{"run": name, "peak_rss_mib": round(r["peak_rss_mib"]), "pairs_per_s": round(r["pairs_per_second"], 2)}
            for name, r in runs.items()]
    print_table(f"DPO, {n_params / 1e6:.0f}M-parameter GPT-2 (random init), {args.steps} steps of {args.batch_size} "
                "pairs, "
                f"{args.threads} threads", rows)
    ratio = lora["peak_rss_mib"] / full["peak_rss_mib"]
    print(f"LoRA peak memory / full fine-tuning: {ratio:.2f}")
    write_json("lora", {
        "command": "python -m benchmarks.bench_lora " + " ".join(sys.argv[1:]),
        "n_parameters": n_params, "steps": args.steps, "batch_size": args.batch_size, "rank": args.rank,
        "lora_target_modules": TARGETS, "threads": args.threads, "runs": runs,
        "peak_memory_ratio_lora_over_full": ratio,
        "memory": "peak resident set size of the run's own process (VmHWM, MiB), its imports included"})


if __name__ == "__main__":
    main()
