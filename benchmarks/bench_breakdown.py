"""Where the time goes: the parts of a ``TextBandit`` scoring step, and the operators of a DPO run.

Part 1 replays the same 64-env ``TextBandit-v0`` steps (the embedded model; responses from our
sampler at T=0.9, top-k 50, top-p 0.95, 48 new tokens) and times each piece of the step alone on
the same batches: the reference model's hidden states (packed, prompt cache warm), the LM head with
the log-softmax, decoding, the reward call (VADER), and the whole step; then the share of the
step's operator time spent in matrix multiplies (torch profiler: ``addmm``, ``mm``, ``bmm``).

Part 2 trains our DPO on the data and model of :mod:`benchmarks.bench_trainers` (40 steps of 32
pairs) under the torch profiler and reports each operator family's share of the operator time and
the reference pass's share of the timed run; then, outside the profiler, pairs per second in float32
and under bf16 autocast (median of 3 runs each, alternating). Last, the core's float32 matrix
multiply rate, on a 1024x1024 product and on the scoring pass's own MLP shapes.

    python -m benchmarks.bench_breakdown [--threads 1] [--repeats 3]

Writes ``benchmarks/results/breakdown.json``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import median_time, print_table, write_json

MATMUL = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm")
ATTENTION = ("aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_softmax_backward_data")
FAMILIES = {
    # an operator's family is decided by its name and the names of the events it ran inside; GELU counts
    # the training forward's and backward's (the reference pass's in-place GELU is plain element-wise ops)
    "matrix multiplies (projections, LM head)": lambda name, within: name in ("aten::addmm", "aten::mm"),
    "attention (batched products, softmax or SDPA; forward and backward)":
        lambda name, within: name in ATTENTION or "scaled_dot_product" in name,
    "GELU (forward and backward)": lambda name, within: "gelu" in name or any("GeluTanh" in w for w in within),
    "optimizer (fused AdamW)": lambda name, within: "adamw" in name,
}


def _within(event) -> list[str]:
    names, parent = [], event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def _shares(prof, families: dict) -> dict[str, float]:
    """Each family's share of the profiled ``aten::`` operators' self CPU time."""
    events = [(e.name, _within(e), e.self_cpu_time_total) for e in prof.events() if e.name.startswith("aten::")]
    total = sum(t for _, _, t in events)
    return {family: sum(t for name, within, t in events if match(name, within)) / total for family,
            match in families.items()}


def scoring_parts(repeats: int) -> dict:
    import gymnasium as gym
    from torch.profiler import ProfilerActivity, profile

    import rlhf_envs  # noqa: F401  (registers the envs)
    from rlhf_envs.corpus import make_prompts
    from rlhf_envs.lm.loading import load_causal_lm
    from rlhf_envs.lm.sampling import generate, processed_logprobs

    model, tokenizer = load_causal_lm(None)
    model.eval()
    envs = gym.make_vec("TextBandit-v0", num_envs=64, model=(model, tokenizer), prompts=make_prompts(64, seed=0),
                        max_new_tokens=48, temperature=0.9, top_k=50, top_p=0.95)
    task = envs.task
    obs, _ = envs.reset(seed=0)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    batches = []
    for seed in range(12):
        prompt_ids = torch.as_tensor(obs)
        gen = generate(model, prompt_ids, prompt_ids != pad, task.sampling, eos_token_id=eos, pad_token_id=pad,
                       generator=torch.Generator().manual_seed(seed))
        actions = np.full((64, 48), pad, dtype=np.int64)
        logprobs = np.zeros((64, 48), dtype=np.float32)
        actions[:, : gen.response_ids.shape[1]] = gen.response_ids.numpy()
        logprobs[:, : gen.response_ids.shape[1]] = gen.logprobs.numpy()
        batches.append((envs._prompt_index.copy(), actions, logprobs))
        envs.set_policy_logprobs(logprobs)
        obs, *_ = envs.step(actions)  # warms the prompt cache for these prompts

    times: dict[str, list[float]] = {k: [] for k in ("whole step", "reference hidden states", "LM head + log-softmax",
                                                     "decoding", "reward call (VADER)")}

    def timed(name: str, fn):
        start = time.perf_counter()
        out = fn()
        times[name].append(time.perf_counter() - start)
        return out

    for _ in range(repeats):
        for prompt_index, actions, logprobs in batches:
            envs._prompt_index = prompt_index
            envs.set_policy_logprobs(logprobs)
            timed("whole step", lambda: envs.step(actions))
            ids = torch.as_tensor(actions)
            mask = task.response_mask(ids)
            ids = ids.masked_fill(~mask, pad)
            width = int(mask.sum(1).max())
            view = task.reference_view()
            with torch.no_grad():
                hidden = timed("reference hidden states",
                               lambda: task._ref_hidden(view, torch.as_tensor(prompt_index), ids[:, :width],
                                                        mask[:, :width]))
                picked = ids[:, :width][mask[:, :width]].unsqueeze(-1)
                timed("LM head + log-softmax",
                      lambda: processed_logprobs(view.logits(hidden), task.ref_sampling, overwrite=True).gather(-1,
                                                                                                                picked))
            texts = timed("decoding", lambda: task.decode(ids, mask))
            timed("reward call (VADER)", lambda: task.score(prompt_index.tolist(), texts))
    medians = {k: statistics.median(v) for k, v in times.items()}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for prompt_index, actions, logprobs in batches:
            envs._prompt_index = prompt_index
            envs.set_policy_logprobs(logprobs)
            envs.step(actions)
    share = _shares(prof, {"matrix multiplies": lambda name, within: name in MATMUL})["matrix multiplies"]
    step = medians["whole step"]
    rows = [{"part": k, "median_ms": v * 1e3, "share_of_step": v / step} for k, v in medians.items()]
    return {"num_envs": 64, "batches": len(batches), "repeats": repeats, "parts": rows,
            "matmul_share_of_operator_time": share}


def dpo_profile(repeats: int, threads: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.bench_trainers import Settings, train_ours, write_inputs

    settings = Settings(steps=40, threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        write_inputs(workdir, settings)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            result = train_ours("dpo", workdir, workdir / "profiled", settings)
        shares = _shares(prof, FAMILIES)
        reference_share = result.metrics["reference_seconds"] / result.train_seconds
        speed: dict[str, list[float]] = {"float32": [], "bf16 autocast": []}
        for repeat in range(repeats):
            for name in speed:
                out = workdir / f"{name.split()[0]}-{repeat}"
                run = train_ours("dpo", workdir, out, settings, bf16=name != "float32")
                if not math.isfinite(run.metrics["loss"]):
                    raise RuntimeError(f"DPO in {name} ended with loss {run.metrics['loss']!r}; its speed is not a "
                                       "figure")
                speed[name].append(settings.steps * settings.batch_size / run.train_seconds)
    return {"steps": settings.steps, "batch_size": settings.batch_size, "operator_shares": shares,
            "reference_pass_share_of_run": reference_share,
            "pairs_per_second": {k: statistics.median(v) for k, v in speed.items()},
            "pairs_per_second_runs": speed}


def matmul_rates() -> dict[str, float]:
    """GFLOP/s of float32 ``addmm`` on a 1024x1024 product and on the scoring pass's MLP shapes."""
    rates = {}
    for m, k, n in ((1024, 1024, 1024), (476, 128, 512), (476, 512, 128)):
        a, b, bias = torch.randn(m, k), torch.randn(k, n), torch.randn(n)
        seconds = median_time(lambda: torch.addmm(bias, a, b), repeats=50, warmup=5)
        rates[f"[{m}x{k}] @ [{k}x{n}]"] = 2 * m * k * n / seconds / 1e9
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    scoring = scoring_parts(args.repeats)
    print_table(f"TextBandit scoring step, 64 envs ({args.threads} thread(s)); matrix multiplies "
                f"{scoring['matmul_share_of_operator_time']:.0%} of operator time",
                [{**r, "median_ms": round(r["median_ms"], 2), "share_of_step": f"{r['share_of_step']:.0%}"}
                 for r in scoring["parts"]])
    dpo = dpo_profile(args.repeats, args.threads)
    print_table(f"DPO run ({dpo['steps']} steps of {dpo['batch_size']} pairs): operator shares; reference pass "
                f"{dpo['reference_pass_share_of_run']:.0%} of the run",
                [{"family": k, "share": f"{v:.0%}"} for k, v in dpo["operator_shares"].items()])
    print_table("DPO pairs/s", [{"precision": k, "pairs_per_s": round(v, 1)} for k,
                                v in dpo["pairs_per_second"].items()])
    peak = matmul_rates()
    print_table("float32 matrix multiply rate", [{"shape": k, "gflop_per_s": round(v, 1)} for k, v in peak.items()])
    write_json("breakdown", {"command": f"python -m benchmarks.bench_breakdown --threads {args.threads} --repeats "
                                        f"{args.repeats}",
                             "matmul_gflop_per_s": peak, "scoring_step": scoring, "dpo": dpo})


if __name__ == "__main__":
    main()
