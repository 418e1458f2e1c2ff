"""DPO with LoRA adapters (peft): only the adapters train, the reference is the adapters-off model."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from agents.dpo import DPOConfig, train_dpo  # noqa: E402
from rlhf_envs.lm import load_causal_lm  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory, save_tiny_lm):
    root = tmp_path_factory.mktemp("lora")
    save_tiny_lm(root / "model", seed=1)
    rows = [{"prompt": f"review {i}:", "chosen": " great, loved it", "rejected": " awful, hated it"} for i in range(48)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _config(root: Path, out: str, **kw) -> DPOConfig:
    base = dict(model_path=str(root / "model"), data_path=str(root / "pairs.jsonl"), output_dir=str(root / out),
                batch_size=8, max_steps=6, learning_rate=3e-2, eval_fraction=0.0, log_every=1, progress=False,
                torch_threads=1, lora_r=4, lora_alpha=8.0)
    return DPOConfig(**{**base, **kw})


def test_lora_trains_the_adapters_only_and_saves_a_merged_model(setup):
    result = train_dpo(_config(setup, "run"))
    out = Path(result.output_dir)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Step 1 is computed before any update, with adapters that start at zero: policy == reference.
    assert lines[0]["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.03, "the preference loss did not fall"
    assert lines[-1]["rewards/margins"] > 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    tuned, _ = load_causal_lm(str(out))
    base, _ = load_causal_lm(str(setup / "model"))
    changed = {name for (name, p), (_, q) in zip(tuned.named_parameters(), base.named_parameters()) if not torch.equal(p, q)}
    assert changed and all(".attn.c_attn." in name for name in changed), changed


def test_lora_resumes_exactly(setup):
    whole = train_dpo(_config(setup, "whole"))
    train_dpo(_config(setup, "split", max_steps=6, checkpoint_every=3))
    resumed = train_dpo(_config(setup, "split", resume=True))
    assert resumed.global_step == whole.global_step == 6
    a, _ = load_causal_lm(whole.output_dir)
    b, _ = load_causal_lm(resumed.output_dir)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_a_full_checkpoint_does_not_resume_as_lora(setup):
    train_dpo(_config(setup, "mixed", lora_r=0, checkpoint_every=3, max_steps=3))
    with pytest.raises(ValueError, match="do not fit"):
        train_dpo(_config(setup, "mixed", resume=True))


@pytest.mark.parametrize("kwargs, message", [
    ({"lora_r": -1}, "lora_r"),
    ({"lora_alpha": 0.0}, "lora_alpha"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"ref_model_path": "somewhere"}, "ref_model_path"),
])
def test_bad_lora_settings(setup, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _config(setup, "bad", **kwargs)
