"""The ``rlhf`` command: one-line errors with a non-zero exit, run folders, resuming after a plugin failure, lazy
imports."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest

from agents.cli import main
from rlhf_envs import rewards


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


def test_help_and_a_bad_option_import_neither_torch_nor_transformers():
    probe = ("import sys, contextlib, io\nfrom agents.cli import main\n"
             "for argv in (['--help'], ['--no-such-option'], ['no-such-command']):\n"
             "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
             "        try: main(argv)\n        except SystemExit: pass\n"
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_catgrid_unknown_env_id_is_one_line(tmp_path):
    code, err = _run(["catgrid", "--env-id", "Nope-v0", "--out", str(tmp_path / "run")])
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "'Nope-v0' is not a registered Gymnasium id; the CatGrid ids are ['CatGrid-v0'" in err


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    code, err = _run(["ppo", "--output-dir", str(target)])
    assert code == 2 and "is an existing file, not a folder; give a folder path" in err and "Traceback" not in err
    assert target.read_text() == "keep me"


def test_none_for_optional_numbers_and_nan_refused(tmp_path):
    from agents.cli import build_parser, config_from_args
    from agents.lm_ppo import LMPPOConfig

    args = build_parser("ppo").parse_args(["ppo", "--kl-setpoint", "none", "--max-approx-kl", "None"])
    config = config_from_args(LMPPOConfig, args)
    assert config.kl_setpoint is None and config.max_approx_kl is None
    old_flag = build_parser("ppo").parse_args(["ppo", "--target-kl", "none"])  # the old name, with a warning
    assert config_from_args(LMPPOConfig, old_flag).kl_setpoint is None
    code, err = _run(["ppo", "--ptx-coef", "nan", "--output-dir", str(tmp_path / "p")])
    assert code == 2 and "LMPPOConfig.ptx_coef must be a finite number, got nan" in err
    assert not (tmp_path / "p").exists()


class _FailAfter:
    """A reward plugin that raises once ``calls`` calls have been made, while ``armed``."""

    armed = True
    calls = 0

    def score(self, prompts, responses):
        _FailAfter.calls += 1
        if _FailAfter.armed and _FailAfter.calls > 2:
            raise RuntimeError("the scoring service went away")
        return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]


@pytest.fixture
def fail_after_plugin():
    rewards.register("fail-after-2", lambda: _FailAfter(), overwrite=True)
    _FailAfter.armed, _FailAfter.calls = True, 0
    yield
    rewards._REGISTERED.pop("fail-after-2", None)


def test_plugin_failure_mid_ppo_is_one_line_and_resume_continues(tmp_path, save_tiny_lm, fail_after_plugin):
    model = str(save_tiny_lm(tmp_path / "tiny"))
    out = tmp_path / "run"
    argv = ["ppo", "--model-path", model, "--reward-model", "fail-after-2", "--output-dir", str(out),
            "--batch-size", "8", "--num-minibatches", "2", "--total-episodes", "32", "--max-new-tokens", "4",
            "--save-every", "1", "--no-progress"]
    code, err = _run(argv)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "reward model 'fail-after-2' raised RuntimeError: the scoring service went away" in err and "--resume" in err
    state = json.loads((out / "checkpoints" / "checkpoint-00000002" / "checkpoint.json").read_text())
    assert state["state"]["iteration"] == 2  # the checkpoint of the last finished iteration, intact
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    code, err = _run(argv)  # the folder holds a run now
    assert code == 2 and "already holds a run; pass --resume to continue it, --overwrite to replace it" in err
    _FailAfter.armed = False
    code, err = _run([*argv, "--resume"])
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    code, err = _run([*argv, "--overwrite"])
    assert code == 0, err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


def test_overwrite_refuses_a_folder_no_rlhf_command_wrote(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, err = _run(["ppo", "--output-dir", str(tmp_path), "--overwrite"])
    assert code == 2 and "--overwrite refuses to empty" in err and (tmp_path / "notes.txt").is_file()
