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
         "tests/test_safe_loading.py", "tests/test_crash_resume.py"]
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
        command = [sys.executable, "-m", "pytest", *targets, "-m", "slow or not slow", "-p", "benchmarks.bench_reliability",
                   "-p", "no:cacheprovider", "--hypothesis-show-statistics", f"--junitxml={junit}", "-q", *extra]
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT, env={**os.environ, COUNTS_ENV: str(counts)}, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        outcomes = _testcases(junit)
        kills = json.loads(counts.read_text())["sigkills"] if counts.is_file() else {}
    output = proc.stdout + proc.stderr
    summary = next((line.strip("= ") for line in reversed(output.splitlines()) if re.search(r"\d+ (passed|failed)", line)), "")
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


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.common import print_table, write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-x'")
    args = parser.parse_args(argv)
    result = run_suite(args.pytest_args.split())
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
    if result["failed"]:
        print("\nFAILED:", *result["failed"], sep="\n  ")
    write_json("reliability", result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["exit_code"] == 0 else 1)
