"""Shared pieces of the benchmark scripts: machine facts, timing, a printed table, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


_CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
"""The vector-unit flags that move these figures: AVX-512, and bf16 in hardware (without it a CPU's bf16
matrix products are emulated, and bf16 autocast slows to a crawl)."""


def cpu_info() -> dict:
    """The CPU's model name (with family and model numbers) and which of :data:`_CPU_FEATURES` it has, from
    /proc/cpuinfo.

    Two machines of the same name ("AMD EPYC" under a hypervisor) can be different generations: one
    with AVX-512 and bf16, one with AVX2 only. Ratios against a peer that uses bf16 differ between them.
    """
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():
                break  # the first processor's block is enough
    except OSError:
        return {}
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, model "
                         f"{fields.get('model', '?')})",
            "cpu_features": [f for f in _CPU_FEATURES if f in flags]}


def machine_info() -> dict:
    """What the figures were measured on."""
    import torch

    info = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        **cpu_info(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_table(title: str, rows: list[dict]) -> None:
    """Print ``rows`` (dicts with the same keys) as an aligned table."""
    if not rows:
        return
    keys = list(rows[0])
    cells = [[_fmt(row.get(k)) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print(f"\n{title}")
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "" if value is None else str(value)


def write_json(name: str, data: dict, out_dir: Path | None = None) -> Path:
    """Write ``results/<name>.json`` atomically, with the machine facts added."""
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine_info(), **data}, indent=2) + "\n")
    tmp.replace(path)
    print(f"\nwrote {path}")
    return path
