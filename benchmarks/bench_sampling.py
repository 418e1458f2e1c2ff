"""Sampler throughput against Hugging Face ``model.generate``, and TextBandit scoring cost.

Both samplers run in one process on the same model, prompts, seed and settings (batch 64, 48 new
tokens, temperature 0.9, top-k 50, top-p 0.95 by default), interleaved, ``--repeats`` times; the
table reports medians. A third row times our sampler on its generic path (Hugging Face's forward,
taken when a hook is registered): what the lean decoders of GPT-2 and Llama-family models gain. The second part times
one ``TextBandit-v0`` vector step over 64 envs
(one reference forward + decoding + one reward call) against sampling those 64 responses, after
one warm-up step, with the reference's keys and values of every prompt computed beforehand
(``TextTask.cache_prompts``; a step otherwise computes them the first time it meets a prompt and
reuses them after). It also times the same step on prompts the reference meets for the first time
(their keys and values computed inside the step), as in a first pass over a large prompt set.
The third times one ``TextToken-v0`` vector step over 64 envs with the reference on the lean GPT-2
forward against the same env on Hugging Face's forward. All parts run under the same ``--threads``.

    python -m benchmarks.bench_sampling [--device cuda] [--repeats 9] [--threads 1]
                                        [--model embedded-llama] [--size 10m]

``--model embedded-llama`` runs the Llama twin of the embedded model (the sampler's lean Llama decoder,
:mod:`rlhf_envs.lm.llama_decoding`, and the packed reference pass, :mod:`rlhf_envs.lm.hf_packed`);
``--size 10m`` a seeded random model of about 10M parameters of the chosen architecture (the shapes of
``benchmarks/bench_trainers.py --size 10m``). The TextToken part runs for GPT-2 only (it compares the
lean GPT-2 reference with Hugging Face's). Writes ``benchmarks/results/sampling.json``
(``sampling_llama.json``, ``sampling_10m.json``, ``sampling_10m_llama.json`` with those options).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import rlhf_envs  # noqa: F401  (registers the envs)
from benchmarks.common import machine_info
from rlhf_envs.lm.sampling import SamplingConfig, generate


def _model(device: str, name: str = "embedded", size: str = "small"):
    """The embedded default when it exists, else a GPT-2 of its size (4 layers, width 128, vocab 2048);
    ``embedded-llama``: the Llama twin; ``size="10m"``: a random model of about 10M parameters."""
    if name != "embedded" or size != "small":
        import tempfile

        from benchmarks.bench_trainers import build_model
        from rlhf_envs.lm.loading import load_causal_lm

        arch = "gpt2" if name == "embedded" else "embedded-llama"
        with tempfile.TemporaryDirectory() as tmp:
            build_model(Path(tmp), "cpu", 0, arch, size)
            model, tokenizer = load_causal_lm(tmp)
        return model.to(device).eval(), tokenizer, f"{name} {size}" + (" (random)" if size != "small" else "")
    try:
        from rlhf_envs.lm.loading import load_causal_lm

        model, tokenizer = load_causal_lm(None)
        return model.to(device).eval(), tokenizer, "embedded"
    except (ImportError, FileNotFoundError, OSError):
        from transformers import GPT2Config, GPT2LMHeadModel

        from tests.tiny_models import tiny_causal_lm

        torch.manual_seed(0)
        config = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=2048, n_positions=256,
                            bos_token_id=256, eos_token_id=256, pad_token_id=257)
        _, tokenizer = tiny_causal_lm()
        return GPT2LMHeadModel(config).to(device).eval(), tokenizer, "gpt2-4x128-v2048 (random)"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def _prompts_unseen(task, unseen: bool):
    """With ``unseen``, the step inside runs as if the reference met every prompt for the first time: the
    prompt cache's "ready" flags are cleared for it (each prompt's keys and values are recomputed), then
    restored, so that later steps find every prompt cached again."""
    cache = task._ref_prompt_cache if unseen else None
    if cache is None:
        yield
        return
    ready = cache.ready.clone()
    cache.ready.zero_()
    try:
        yield
    finally:
        cache.ready |= ready


def _token_steps(model, tokenizer, prompts: list[str], args: argparse.Namespace, steps: int = 200) -> dict:
    """One ``TextToken-v0`` vector step over ``args.batch`` envs: the reference on the lean GPT-2 forward
    against Hugging Face's forward (the same env with a no-op forward hook on its reference, which makes
    it take the generic path). Both envs get the same random actions, interleaved; medians after a warm-up."""
    envs = {}
    for name in ("lean", "hf"):
        env = gym.make_vec("TextToken-v0", num_envs=args.batch, model=(model, tokenizer), prompts=prompts,
                           max_new_tokens=args.new_tokens, temperature=0.9, device=args.device)
        if name == "hf":
            env.task.ref_model.register_forward_pre_hook(lambda module, inputs: None)
        env.reset(seed=0)
        envs[name] = env
    vocab = envs["lean"].task.vocab_size
    uniform = np.full((args.batch, vocab), -np.log(vocab), dtype=np.float32)
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {name: [] for name in envs}
    for step in range(steps + 10):
        actions = rng.integers(0, vocab, args.batch)
        for name, env in envs.items():
            env.set_policy_logprobs(uniform)
            _sync(args.device)
            start = time.perf_counter()
            env.step(actions)
            _sync(args.device)
            if step >= 10:
                times[name].append(time.perf_counter() - start)
    lean, hf = statistics.median(times["lean"]), statistics.median(times["hf"])
    return {"num_envs": args.batch, "steps": steps, "lean_median_s": lean, "hf_median_s": hf, "speedup": hf / lean}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--model", choices=("embedded", "embedded-llama"), default="embedded")
    parser.add_argument("--size", choices=("small", "10m"), default="small")
    parser.add_argument("--out", default=None, help="default benchmarks/results/sampling[_10m][_llama].json")
    args = parser.parse_args()
    if args.out is None:
        suffix = ("_10m" if args.size == "10m" else "") + ("_llama" if args.model == "embedded-llama" else "")
        args.out = str(Path(__file__).parent / "results" / f"sampling{suffix}.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    model, tokenizer, model_name = _model(device, args.model, args.size)
    from rlhf_envs.corpus import make_prompts

    prompts = make_prompts(args.batch, seed=0)
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.9, top_k=50, top_p=0.95)

    def ours() -> int:
        g = torch.Generator(device=device).manual_seed(0)
        out = generate(model, ids, mask, cfg, eos_token_id=eos, pad_token_id=pad, generator=g)
        return int(out.response_mask.sum())

    def hf() -> int:
        torch.manual_seed(0)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask.long(), do_sample=True, temperature=0.9, top_k=50,
                                 top_p=0.95, max_new_tokens=args.new_tokens, eos_token_id=eos, pad_token_id=pad)
        new = out[:, ids.shape[1]:]
        is_eos = (new == eos).long()
        return int(((is_eos.cumsum(-1) - is_eos) == 0).sum())

    def generic() -> int:
        """Our sampler on its generic path (Hugging Face's forward): a no-op hook turns the lean decoders off."""
        hook = model.register_forward_pre_hook(lambda module, inputs: None)
        try:
            return ours()
        finally:
            hook.remove()

    samplers = (("rlhf_envs.generate", ours), ("rlhf_envs.generate generic", generic), ("hf.generate", hf))
    times: dict[str, list[float]] = {name: [] for name, _ in samplers}
    tokens: dict[str, list[int]] = {name: [] for name, _ in samplers}
    ours(), generic(), hf()
    for _ in range(args.repeats):
        for name, fn in samplers:
            _sync(device)
            start = time.perf_counter()
            n = fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
            tokens[name].append(n)
    rows = {}
    for name in times:
        median = statistics.median(times[name])
        rows[name] = {"median_s": median, "tokens": int(statistics.median(tokens[name])),
                      "tokens_per_s": statistics.median(tokens[name]) / median}
    speedup = rows["rlhf_envs.generate"]["tokens_per_s"] / rows["hf.generate"]["tokens_per_s"]
    lean_over_generic = rows["rlhf_envs.generate generic"]["median_s"] / rows["rlhf_envs.generate"]["median_s"]

    warnings.simplefilter("ignore", RuntimeWarning)
    envs = gym.make_vec("TextBandit-v0", num_envs=args.batch, model=(model, tokenizer), prompts=prompts,
                        max_new_tokens=args.new_tokens, temperature=0.9, top_k=50, top_p=0.95, device=device)
    task = envs.task
    task.cache_prompts()
    obs, _ = envs.reset(seed=0)
    prompt_ids = torch.as_tensor(obs, device=device)
    prompt_mask = prompt_ids != pad
    step_times: dict[str, list[float]] = {"seen": [], "first_sight": []}
    sample_times = []
    for repeat in range(args.repeats + 1):
        for kind in step_times:
            _sync(device)
            start = time.perf_counter()
            gen = generate(model, prompt_ids, prompt_mask, task.sampling, eos_token_id=eos, pad_token_id=pad,
                           generator=torch.Generator(device=device).manual_seed(1))
            _sync(device)
            if repeat:
                sample_times.append(time.perf_counter() - start)
            actions = np.full((args.batch, args.new_tokens), pad, dtype=np.int64)
            logprobs = np.zeros((args.batch, args.new_tokens), dtype=np.float32)
            width = gen.response_ids.shape[1]
            actions[:, :width] = gen.response_ids.cpu().numpy()
            logprobs[:, :width] = gen.logprobs.cpu().numpy()
            envs.set_policy_logprobs(logprobs)
            with _prompts_unseen(task, kind == "first_sight"):
                start = time.perf_counter()
                obs, *_ = envs.step(actions)
                _sync(device)
                elapsed = time.perf_counter() - start
            if repeat:
                step_times[kind].append(elapsed)
            prompt_ids = torch.as_tensor(obs, device=device)
            prompt_mask = prompt_ids != pad
    step_s, sample_s = statistics.median(step_times["seen"]), statistics.median(sample_times)
    token_target = type(model).__name__ == "GPT2LMHeadModel"  # issue 23 asks <= 0.3 of sampling of the Llama twin
    cold_s = statistics.median(step_times["first_sight"])

    print(f"model: {model_name}; device {device}; batch {args.batch}; {args.new_tokens} new tokens; "
          f"T=0.9 top-k=50 top-p=0.95; median of {args.repeats}")
    print(f"{'sampler':<28}{'median s':>10}{'tokens':>9}{'tokens/s':>12}")
    for name, row in rows.items():
        print(f"{name:<28}{row['median_s']:>10.4f}{row['tokens']:>9d}{row['tokens_per_s']:>12.0f}")
    print(f"speed-up over HF generate: {speedup:.2f}x; the lean decoder over our generic path: "
          f"{lean_over_generic:.2f}x")
    print(f"TextBandit vector step ({args.batch} envs): {step_s * 1e3:.1f} ms vs sampling {sample_s * 1e3:.1f} ms "
          f"-> ratio {step_s / sample_s:.3f} (target <= {0.25 if token_target else 0.3}; prompts the reference "
          "has seen before)")
    print(f"  the same step on prompts the reference sees for the first time: {cold_s * 1e3:.1f} ms -> ratio "
          f"{cold_s / sample_s:.3f}")
    token = None
    if type(model).__name__ == "GPT2LMHeadModel":
        token = _token_steps(model, tokenizer, prompts, args)
        print(f"TextToken vector step ({args.batch} envs): {token['lean_median_s'] * 1e3:.2f} ms on the lean forward "
              "vs "
              f"{token['hf_median_s'] * 1e3:.2f} ms on Hugging Face's -> {token['speedup']:.2f}x")
    result = {
        "machine": machine_info(),
        "model": model_name, "device": device, "batch": args.batch, "max_new_tokens": args.new_tokens,
        "sampling": {"temperature": 0.9, "top_k": 50, "top_p": 0.95}, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "samplers": rows, "speedup_vs_hf": speedup, "lean_decoder_over_generic_path": lean_over_generic,
        "bandit_step": {"num_envs": args.batch, "step_median_s": step_s, "sample_median_s": sample_s,
                        "step_over_sample": step_s / sample_s,
                        "reference_prompt_cache": task._ref_prompt_cache is not None,
                        "first_sight_step_median_s": cold_s, "first_sight_step_over_sample": cold_s / sample_s},
        "token_step": token,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
