"""The reliability suite, run and counted: bad inputs, property-based play, crashes survived, and
runs compared bit for bit.

Runs, in one pytest subprocess (slow tests included)::

    tests/test_bad_input.py tests/test_properties.py tests/test_text_properties.py
    tests/test_safe_loading.py tests/test_crash_resume.py
    tests/test_pipeline.py::test_pipeline_twice_same_seed_identical_metrics   (when the file exists)

and counts, from that run only:

- bad inputs tried: the rows of the ``test_bad_input`` table that ran (JUnit XML);
- Hypothesis examples: passing + failing test cases in Hypothesis's statistics (``--hypothesis-show-statistics``);
- crash points survived: SIGKILLs this module's pytest plugin saw ``tests/test_crash_resume.py``
  send (it wraps ``os.kill`` during those tests), counted when the test then passed (the resumed
  run ended bit-identical to the uninterrupted one);
- runs compared bit for bit: the two runs of each passing determinism test (crash-resume: the
  uninterrupted run and the killed-and-resumed one; the pipeline: two runs with one seed).

Two more sections, measured in this process:

- **KL under every sampling setting.** On the embedded model (reference: its weights; policy: the
  same weights plus fixed Gaussian noise, or the reference itself), for each of 9 sampling
  settings (temperature, top-k, top-p, alone and combined), the policy samples
  ``kl_batches x 64`` responses; each is handed to one ``TextBandit-v0`` vector env per estimator
  (``k1``, ``k3``, ``exact``; ``k2`` is refused) and the env's per-response KL is recorded. All
  estimators see the same responses, so each one's bias against ``exact`` is the mean of the
  paired differences, with its standard error; an estimator passes when it is within 3 standard
  errors of ``exact`` (whose per-response value, the per-position exact KL summed along the
  sampled response, is itself unbiased for the sequence KL), or refused. The standard error gets a
  floor of float32 rounding, ``KL_ROUNDING`` = 1e-5 nats per response (``z = bias / (se + 1e-5 / 3)``).
  ``k3`` without the
  top-k/top-p correction (the formula before issue 22) and ``k2`` are computed beside them, for
  the record.
- **``rlhf --help`` timing**: the median wall time of ``python -m agents.cli --help`` (and of a
  bad option and a bad command) over 5 runs in fresh processes; the target is under 1 s.

    python -m benchmarks.bench_reliability     # writes benchmarks/results/reliability.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = ["tests/test_bad_input.py", "tests/test_properties.py", "tests/test_text_properties.py",
         "tests/test_safe_loading.py", "tests/test_crash_resume.py", "tests/test_cli.py", "tests/test_settings.py"]
PIPELINE_DETERMINISM = "tests/test_pipeline.py::test_pipeline_twice_same_seed_identical_metrics"
DETERMINISM_TESTS = ("test_crash_resume.py::test_sigkill_at_random_points_then_resume_matches_uninterrupted",
                     "test_pipeline.py::test_pipeline_twice_same_seed_identical_metrics")
COUNTS_ENV = "RLHF_RELIABILITY_COUNTS"

# ---- the pytest plugin (loaded into the subprocess with ``-p benchmarks.bench_reliability``) ----------

_kills: dict[str, int] = {}
_real_kill = os.kill


def pytest_runtest_setup(item) -> None:
    """Count the SIGKILLs a crash-resume test sends (``os.kill`` wrapped for the test's duration)."""
    if "test_crash_resume" not in item.nodeid:
        return

    def counting_kill(pid: int, sig: int) -> None:
        if sig == signal.SIGKILL:
            _kills[item.nodeid] = _kills.get(item.nodeid, 0) + 1
        _real_kill(pid, sig)

    os.kill = counting_kill


def pytest_runtest_teardown(item) -> None:
    os.kill = _real_kill


def pytest_sessionfinish(session) -> None:
    path = os.environ.get(COUNTS_ENV)
    if path:
        Path(path).write_text(json.dumps({"sigkills": _kills}))


# ---- the benchmark ---------------------------------------------------------------------------------

def _testcases(junit: Path) -> dict[str, str]:
    """``{"file.py::name[param]": "passed" | "failed" | "skipped"}`` from a JUnit XML report."""
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}.py::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes[name] = "failed"
        elif case.find("skipped") is not None:
            outcomes[name] = "skipped"
        else:
            outcomes[name] = "passed"
    return outcomes


def _hypothesis_examples(output: str) -> tuple[int, int]:
    """(tests, examples run) from Hypothesis's statistics: every passing and failing test case."""
    tests = len(re.findall(r"^\S+::\S+:\s*$", output, flags=re.M))
    runs = re.findall(r"(\d+) passing, (\d+) failing, and \d+ invalid test cases", output)
    return tests, sum(int(p) + int(f) for p, f in runs)


def run_suite(extra: list[str]) -> dict:
    """Run the suite once in a subprocess; return the timings, counts and outcomes."""
    targets = SUITE + ([PIPELINE_DETERMINISM] if (ROOT / "tests" / "test_pipeline.py").is_file() else [])
    with tempfile.TemporaryDirectory() as tmp:
        junit, counts = Path(tmp) / "junit.xml", Path(tmp) / "counts.json"
        command = [sys.executable, "-m", "pytest", *targets, "-m", "slow or not slow", "-p",
                   "benchmarks.bench_reliability",
                   "-p", "no:cacheprovider", "--hypothesis-show-statistics", f"--junitxml={junit}", "-q", *extra]
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT, env={**os.environ, COUNTS_ENV: str(counts)}, capture_output=True,
                              text=True)
        seconds = time.perf_counter() - start
        outcomes = _testcases(junit)
        kills = json.loads(counts.read_text())["sigkills"] if counts.is_file() else {}
    output = proc.stdout + proc.stderr
    summary = next((line.strip("= ") for line in reversed(output.splitlines()) if re.search(r"\d+ (passed|failed)",
                                                                                            line)), "")
    bad_rows = {k: v for k, v in outcomes.items() if "::test_bad_input[" in k}
    hypothesis_tests, examples = _hypothesis_examples(output)
    survived = sum(n for test, n in kills.items() if outcomes.get(test.rsplit("/", 1)[-1]) == "passed")
    comparisons = [t for t in DETERMINISM_TESTS if outcomes.get(t) == "passed"]
    by_file: dict[str, dict[str, int]] = {}
    for name, outcome in outcomes.items():
        counts_of = by_file.setdefault(name.split("::")[0], {"passed": 0, "failed": 0, "skipped": 0})
        counts_of[outcome] += 1
    return {
        "command": shlex.join(["python", "-m", "pytest", *command[3:]]).replace(str(junit), "JUNIT.xml"),
        "exit_code": proc.returncode,
        "pytest_summary": summary,
        "wall_seconds": round(seconds, 1),
        "tests": by_file,
        "bad_inputs_tried": len(bad_rows),
        "bad_inputs_rejected_correctly": sum(v == "passed" for v in bad_rows.values()),
        "hypothesis_tests": hypothesis_tests,
        "hypothesis_examples": examples,
        "sigkills_sent": sum(kills.values()),
        "crash_points_survived": survived,
        "determinism_tests_passed": comparisons,
        "runs_compared_bit_for_bit": 2 * len(comparisons),
        "failed": sorted(k for k, v in outcomes.items() if v == "failed"),
        "output_tail": output[-3000:] if proc.returncode else "",
    }


# ---- KL under every sampling setting ----------------------------------------------------------------------

KL_SETTINGS: list[tuple[str, dict]] = [
    ("noisy", {}), ("noisy", {"temperature": 0.7}), ("noisy", {"temperature": 1.3}), ("noisy", {"top_k": 20}),
    ("noisy", {"top_p": 0.9}), ("noisy", {"temperature": 0.9, "top_p": 0.95}),
    ("noisy", {"temperature": 1.2, "top_k": 40}),
    ("noisy", {"temperature": 0.8, "top_k": 50, "top_p": 0.9}), ("reference", {"top_k": 50, "top_p": 0.9}),
]
"""(policy, sampling) pairs: ``noisy`` is the embedded model with fixed noise on its weights, ``reference`` its
weights."""

KL_ESTIMATORS_TRIED = ("k1", "k2", "k3", "exact")


def _kl_rows(policy, envs: dict, sampling: dict, batches: int, batch: int, max_new_tokens: int) -> dict[str, list]:
    """Per-response KL of every estimator on the same responses: ``{name: [values]}`` (env estimators and two
    direct formulas, ``k2`` and the uncorrected ``k3``)."""
    import numpy as np
    import torch

    from rlhf_envs.kl import kl_k2, kl_k3
    from rlhf_envs.lm.sampling import generate, response_logprobs
    from rlhf_envs.text_common import attention_mask_from_obs

    task = next(iter(envs.values())).unwrapped.task
    values: dict[str, list] = {name: [] for name in (*envs, "k2 (direct)", "k3 uncorrected (direct)")}
    for b in range(batches):
        obs = [env.reset(seed=b)[0] for env in envs.values()][0]
        ids = torch.as_tensor(obs)
        mask = attention_mask_from_obs(ids, task.pad_token_id)
        gen = generate(policy, ids, mask, task.sampling, eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id,
                       generator=torch.Generator().manual_seed(1000 + b))
        with torch.no_grad():
            lp, full = response_logprobs(policy, ids, mask, gen.response_ids, gen.response_mask, task.sampling,
                                         return_full=True)
        width = gen.response_ids.shape[1]
        actions = np.full((batch, max_new_tokens), task.pad_token_id)
        actions[:, :width] = gen.response_ids.numpy()
        handed = np.zeros((batch, max_new_tokens), np.float32)
        handed[:, :width] = lp.numpy()
        handed_full = np.zeros((batch, max_new_tokens, full.shape[-1]), np.float32)
        handed_full[:, :width] = full.masked_fill(~gen.response_mask[..., None], 0.0).numpy()
        for name, env in envs.items():
            env.set_policy_logprobs(handed, handed_full)
            info = env.step(actions)[4]
            values[name].extend(info["kl"].tolist())
        ref = torch.as_tensor(info["ref_logprobs"][:, :width])
        m = gen.response_mask
        values["k2 (direct)"].extend((kl_k2(lp, ref) * m).sum(-1).tolist())
        values["k3 uncorrected (direct)"].extend((kl_k3(lp, ref) * m).sum(-1).tolist())
    return values


KL_ROUNDING = 1e-5
"""Nats per response: float32 rounding, the floor under 3 standard errors. It matters only where an estimator is
exact per token: with the reference's own weights under top-k/top-p every estimator reads ``-log Z`` at each token,
so the paired differences are pure rounding (about 1e-7) with a standard error smaller still."""


def kl_section(batches: int = 8, batch: int = 64, max_new_tokens: int = 16, noise: float = 0.1) -> dict:
    """Every estimator against the exact KL under :data:`KL_SETTINGS` (see the module docstring)."""
    import gymnasium as gym
    import numpy as np
    import torch

    import rlhf_envs  # noqa: F401
    from rlhf_envs.lm import load_causal_lm

    torch.manual_seed(0)
    reference, tokenizer = load_causal_lm(None)
    noisy, _ = load_causal_lm(None)
    with torch.no_grad():
        for param in noisy.parameters():  # noise in units of each tensor's spread: a policy some way from the reference
            param.add_(noise * param.std() * torch.randn_like(param))
    rows = []
    for policy_name, sampling in KL_SETTINGS:
        policy = noisy if policy_name == "noisy" else reference
        envs, refused = {}, {}
        for name in KL_ESTIMATORS_TRIED:
            try:
                envs[name] = gym.make_vec("TextBandit-v0", num_envs=batch, model=(reference, tokenizer),
                                          kl_estimator=name, max_new_tokens=max_new_tokens,
                                          reward_model=lambda p, r: [0.0] * len(r), beta=0.0, **sampling)
            except ValueError as err:
                refused[name] = str(err)
        values = {k: np.asarray(v) for k, v in _kl_rows(policy, envs, sampling, batches, batch, max_new_tokens).items()}
        exact = values["exact"]
        for name, v in values.items():
            diff = v - exact
            se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if name != "exact" else 0.0
            bias = float(diff.mean())
            z = bias / (se + KL_ROUNDING / 3) if name != "exact" else 0.0
            label = ", ".join(f"{k}={v}" for k, v in sampling.items()) or "plain"
            rows.append({"policy": policy_name, "sampling": label,
                         "estimator": name, "mean": float(v.mean()), "stderr": float(v.std(ddof=1) / np.sqrt(len(v))),
                         "exact": float(exact.mean()), "bias": bias, "bias_stderr": se, "z": z,
                         "status": _status(name, z, refused)})
        rows.extend({"policy": policy_name, "sampling": rows[-1]["sampling"], "estimator": name, "status": "refused",
                     "message": message} for name, message in refused.items())
        for env in envs.values():
            env.close()
    env_rows = [r for r in rows if "(direct)" not in r["estimator"]]
    return {"settings": len(KL_SETTINGS), "responses_per_setting": batches * batch, "max_new_tokens": max_new_tokens,
            "policy_noise": noise, "rows": rows,
            "all_within_3_se_or_refused": all(r["status"] in ("ok", "refused", "reference") for r in env_rows)}


def _status(name: str, z: float, refused: dict) -> str:
    if name == "exact":
        return "reference"
    if "(direct)" in name:
        return f"not offered ({'refused' if name.startswith('k2') else 'replaced'}); |z|={abs(z):.1f}"
    return "ok" if abs(z) <= 3 else f"BIASED (|z|={abs(z):.1f})"


# ---- rlhf --help timing ------------------------------------------------------------------------------------

def cli_timing(repeats: int = 5) -> dict:
    """Median wall seconds of ``python -m agents.cli ARGS`` in fresh processes (target: under 1 s)."""
    import statistics

    result = {}
    for label, args in [("rlhf --help", ["--help"]), ("rlhf --no-such-option", ["--no-such-option"]),
                        ("rlhf no-such-command", ["no-such-command"]),
                        ("rlhf ppo --help (imports torch)", ["ppo", "--help"])]:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "agents.cli", *args], cwd=ROOT, capture_output=True)
            times.append(time.perf_counter() - start)
        result[label] = {"median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3)}
    return result


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.common import print_table, write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-x'")
    parser.add_argument("--kl-batches", type=int, default=8, help="batches of 64 responses per sampling setting")
    args = parser.parse_args(argv)
    result = run_suite(args.pytest_args.split())
    result["cli_timing"] = cli_timing()
    result["kl"] = kl_section(args.kl_batches)
    print_table("Reliability suite (one pytest run, slow tests included)", [
        {"measure": "bad inputs tried (table rows)", "count": result["bad_inputs_tried"],
         "ok": result["bad_inputs_rejected_correctly"]},
        {"measure": "hypothesis examples run", "count": result["hypothesis_examples"],
         "ok": f"{result['hypothesis_tests']} property tests"},
        {"measure": "crash points survived (SIGKILL, resume)", "count": result["crash_points_survived"],
         "ok": f"{result['sigkills_sent']} SIGKILLs sent"},
        {"measure": "runs compared bit for bit", "count": result["runs_compared_bit_for_bit"],
         "ok": f"{len(result['determinism_tests_passed'])} determinism tests"},
        {"measure": "wall seconds", "count": result["wall_seconds"], "ok": result["pytest_summary"]},
    ])
    print_table("Per file", [{"file": name, **counts} for name, counts in result["tests"].items()])
    print_table("KL per response against the exact KL (same responses; bias = mean paired difference)",
                [{k: r.get(k) for k in ("policy", "sampling", "estimator", "mean", "exact", "bias", "bias_stderr",
                                        "status")}
                 for r in result["kl"]["rows"]])
    print(f"every offered estimator within 3 SE of exact, or refused: {result['kl']['all_within_3_se_or_refused']}")
    print_table("rlhf command start-up (fresh process, median of 5)",
                [{"command": k, **v} for k, v in result["cli_timing"].items()])
    if result["failed"]:
        print("\nFAILED:", *result["failed"], sep="\n  ")
    write_json("reliability", result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["exit_code"] == 0 else 1)
