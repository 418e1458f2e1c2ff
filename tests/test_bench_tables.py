"""The README's performance table (``python -m benchmarks --tables``) says where each row was measured."""

import json

import benchmarks.__main__ as suite
from benchmarks.common import cpu_info, machine_info


def _catgrid(machine: dict) -> dict:
    return {"machine": machine, "step_throughput": [{"ours": "CatGrid-v0", "peer": "FrozenLake-v1",
                                                     "ours_steps_per_s": 3e5,
                                                     "peer_steps_per_s": 1.5e5, "ratio": 2.0}],
            "vector_throughput": [], "ppo_summary": []}


def test_each_row_names_its_date_and_the_cpu_features_that_move_ratios(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "RESULTS_DIR", tmp_path)
    for features, kind in ((["avx2", "fma"], "AVX2, no bf16"), (["avx2", "fma", "avx512f", "avx512_bf16"], "AVX-512, "
                                                                                                           "bf16")):
        (tmp_path / "catgrid.json").write_text(json.dumps(_catgrid({"date": "2026-12-01", "cpu_features": features})))
        row = suite.tables().splitlines()[2]
        assert row.endswith("| 2.00x | 2026-12-01 (" + kind + ") | bench_catgrid |")
    (tmp_path / "catgrid.json").write_text(json.dumps(_catgrid({"date": "2026-11-24"})))  # an older file: no CPU facts
    assert suite.tables().splitlines()[2].endswith("| 2026-11-24 | bench_catgrid |")


def test_machine_info_reads_this_cpu():
    info = machine_info()
    assert info["torch_cpu_capability"]
    cpu = cpu_info()
    if cpu:  # Linux: /proc/cpuinfo
        assert "family" in cpu["cpu_model"] and set(cpu["cpu_features"]) <= {"avx2", "fma", "avx512f", "avx512_bf16",
                                                                             "amx_bf16"}


def test_readme_tables_are_the_results_files():
    """Every generated table in the READMEs equals what ``python -m benchmarks --tables --write`` makes now."""
    made = suite.sections()
    for readme in suite.READMES:
        for match in suite._BLOCK.finditer(readme.read_text()):
            name, text = match.group(2), match.group(3)
            assert name in made, f"{readme}: no results file makes table {name!r}"
            assert text == made[name], (
                f"{readme}: table {name!r} differs from the results: run python -m benchmarks --tables --write"
            )
