"""DPO with LoRA adapters (peft): only the adapters train, the reference is the adapters-off model."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from agents.dpo import DPOConfig, train_dpo  # noqa: E402
from rlhf_envs.lm.loading import load_causal_lm  # noqa: E402


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
    changed = {name for (name, p), (_, q) in zip(tuned.named_parameters(),
                                                 base.named_parameters()) if not torch.equal(p, q)}
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


def _peft_gpt2(**lora_kw):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=50, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    lora = dict(r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                fan_in_fan_out=True, task_type="CAUSAL_LM")
    model = get_peft_model(GPT2LMHeadModel(config), LoraConfig(**{**lora, **lora_kw}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at zero; make the adapters count
    return model.train()


def test_lora_takes_the_packed_path_with_hugging_face_numbers_and_gradients():
    import torch.nn.functional as F

    from rlhf_envs.lm.gpt2 import gpt2_view
    from rlhf_envs.lm.packing import pack_sequences

    model = _peft_gpt2()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 50, (5,), generator=g)
    sequences = [*(torch.cat([prompt, torch.randint(0, 50, (n,), generator=g)]) for n in (4, 7)),
                 torch.randint(0, 50, (6,), generator=g)]
    batch = pack_sequences(sequences)
    starts = [5, 5, 1]
    view = gpt2_view(model)
    assert view is not None
    packed = batch.sequence_logps(view, *batch.distinct_targets(starts))
    packed.sum().backward()
    lora = {name: p for name, p in model.named_parameters() if "lora_" in name}
    packed_grads = {name: p.grad.clone() for name, p in lora.items()}
    model.zero_grad()
    alone = torch.stack([-F.cross_entropy(model(input_ids=seq[None]).logits[0, start - 1 : -1], seq[start:],
                                          reduction="sum")
                         for seq, start in zip(batch.sequences, starts)])
    alone.sum().backward()
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    for name, p in lora.items():
        torch.testing.assert_close(packed_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad(), model.disable_adapter():  # the DPO reference: the same weights, adapters off
        off = gpt2_view(model)
        assert off is not None
        ref = batch.sequence_logps(off, *batch.distinct_targets(starts))
        base = torch.stack([-F.cross_entropy(model(input_ids=seq[None]).logits[0, start - 1 : -1], seq[start:],
                                             reduction="sum")
                            for seq, start in zip(batch.sequences, starts)])
    torch.testing.assert_close(ref, base, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref, alone, atol=1e-3), "the adapters changed nothing: the test would prove nothing"


@pytest.mark.parametrize("lora_kw", [{"lora_dropout": 0.1}, {"use_dora": True}, {"target_modules": ["c_attn",
                                                                                                    "lm_head"]}],
                         ids=["dropout", "dora", "lm-head-adapter"])
def test_lora_the_view_cannot_reproduce_takes_hugging_face_path(lora_kw):
    from rlhf_envs.lm.gpt2 import gpt2_view

    model = _peft_gpt2(**lora_kw)
    assert gpt2_view(model) is None
    assert gpt2_view(model.get_base_model()) is None, "the bare model with adapters injected must not skip them"


def test_lora_dropout_is_exact_in_eval_mode_only():
    from rlhf_envs.lm.gpt2 import gpt2_view

    model = _peft_gpt2(lora_dropout=0.1)
    assert gpt2_view(model.train()) is None
    assert gpt2_view(model.eval()) is not None
