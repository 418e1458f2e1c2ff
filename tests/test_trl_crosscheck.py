"""Our DPO and reward-model losses equal TRL's on the first step, on identical batches.

Both sides use the same weights (a tiny GPT-2 saved once and loaded by each) and the same token ids:
our trainer runs one optimizer step and logs the loss of that step's batch (computed before the
update); TRL's trainer computes its loss on the same pairs, tokenised by us and collated by TRL's
own preference collator. Skipped when TRL (the ``bench`` extra) is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_data import make_tiny_lm, write_jsonl

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore:`(is_)?gradient_checkpointing` is deprecated:FutureWarning")

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference as DPOCollator  # noqa: E402
from trl.trainer.reward_trainer import DataCollatorForPreference as RewardCollator  # noqa: E402

from agents.data import read_preferences, tokenize_pairs, tokenize_texts  # noqa: E402
from agents.dpo import DPO_LOSSES, DPOConfig, sequence_logps, train_dpo  # noqa: E402
from agents.reward_model import RewardModelConfig, train_reward_model  # noqa: E402
from rlhf_envs.lm.loading import load_causal_lm, load_tokenizer  # noqa: E402
from rlhf_envs.lm.padded import batch_sequences  # noqa: E402

PAIRS = [
    {"prompt": "the food was", "chosen": " really good and I loved it", "rejected": " awful"},
    {"prompt": "the hotel room was", "chosen": " fine", "rejected": " not good but the service was okay"},
    {"prompt": "I liked the film", "chosen": " yes it was great", "rejected": " no"},
    {"prompt": "the story", "chosen": " was quite good", "rejected": " was bad and plain and really not fine"},
]
BETA = 0.5


def _first_logged_loss(output_dir: Path) -> float:
    return json.loads((output_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def _trl_args(config_cls: type, out: Path, **kwargs):
    return config_cls(output_dir=str(out), per_device_train_batch_size=len(PAIRS), max_steps=1, use_cpu=True,
                      bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
                      disable_tqdm=True, **kwargs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A policy, a different reference model, a reward model with a large score head, and the pairs."""
    root = tmp_path_factory.mktemp("trl_crosscheck")
    policy = make_tiny_lm(root / "policy", seed=0)
    reference = make_tiny_lm(root / "reference", seed=1)
    torch.manual_seed(2)
    rm = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    torch.nn.init.normal_(rm.score.weight, std=1.0)  # rewards spread over a few units: the loss is not log 2
    rm.config.pad_token_id = 0
    rm.save_pretrained(root / "rm")
    load_tokenizer(policy).save_pretrained(root / "rm")
    return {"root": root, "policy": policy, "reference": reference, "rm": root / "rm",
            "data": write_jsonl(root / "pairs.jsonl", PAIRS)}


def _trl_dpo_loss(setup: dict, loss_type: str) -> float:
    tokenizer = load_tokenizer(setup["policy"])
    data = tokenize_pairs(tokenizer, read_preferences(setup["data"]), max_length=64)
    examples = []
    for i in range(len(PAIRS)):
        chosen, rejected = data.input_ids[2 * i].tolist(), data.input_ids[2 * i + 1].tolist()
        n = int(data.prompt_lengths[2 * i])
        examples.append({"prompt_ids": chosen[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]})
    from datasets import Dataset

    trainer = trl.DPOTrainer(
        AutoModelForCausalLM.from_pretrained(setup["policy"]),
        ref_model=AutoModelForCausalLM.from_pretrained(setup["reference"]),
        args=_trl_args(trl.DPOConfig, setup["root"] / f"trl_dpo_{loss_type}", beta=BETA, loss_type=[loss_type]),
        train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer)
    batch = DPOCollator(pad_token_id=tokenizer.pad_token_id)(examples)
    trainer.model.train()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


def test_dpo_sigmoid_loss_equals_trl(setup):
    out = setup["root"] / "ours_dpo"
    train_dpo(DPOConfig(model_path=str(setup["policy"]), ref_model_path=str(setup["reference"]),
                        data_path=str(setup["data"]), output_dir=str(out), batch_size=len(PAIRS), max_steps=1,
                        beta=BETA, loss_type="sigmoid", eval_fraction=0.0, log_every=1, progress=False,
                        torch_threads=1))
    ours = _first_logged_loss(out)
    assert abs(ours - 0.693147) > 0.01  # policy and reference differ, so the check is not at h = 0
    assert ours == pytest.approx(_trl_dpo_loss(setup, "sigmoid"), abs=1e-4)


def test_ipo_equals_trl_on_length_averaged_log_ratios(setup):
    """TRL's IPO divides each response's log-ratio by its token count; ours sums (Azar et al.'s form).

    Our ``ipo`` loss applied to TRL's length-averaged ``h`` equals TRL's IPO loss; on summed log-probs
    (what our trainer uses) it is a different number.
    """
    tokenizer = load_tokenizer(setup["policy"])
    data = tokenize_pairs(tokenizer, read_preferences(setup["data"]), max_length=64)
    batch = batch_sequences(data.input_ids, data.prompt_lengths, tokenizer.pad_token_id, torch.device("cpu"))
    lengths = batch[2].sum(-1).float()
    with torch.no_grad():
        ratios = [(sequence_logps(load_causal_lm(setup[name])[0], None, *batch)) for name in ("policy", "reference")]
    per_token = ((ratios[0] - ratios[1]) / lengths).view(-1, 2)
    summed = (ratios[0] - ratios[1]).view(-1, 2)
    ours_averaged = DPO_LOSSES["ipo"](per_token[:, 0] - per_token[:, 1], BETA, 0.0).mean().item()
    ours_summed = DPO_LOSSES["ipo"](summed[:, 0] - summed[:, 1], BETA, 0.0).mean().item()
    theirs = _trl_dpo_loss(setup, "ipo")
    assert ours_averaged == pytest.approx(theirs, abs=1e-4)
    assert abs(ours_summed - theirs) > 1e-2


def test_reward_model_bradley_terry_loss_equals_trl(setup):
    out = setup["root"] / "ours_rm"
    train_reward_model(RewardModelConfig(model_path=str(setup["rm"]), data_path=str(setup["data"]), output_dir=str(out),
                                         batch_size=len(PAIRS), max_steps=1, eval_fraction=0.0, log_every=1,
                                         progress=False, torch_threads=1))
    ours = _first_logged_loss(out)
    tokenizer = load_tokenizer(setup["rm"])
    texts, _ = tokenize_texts(tokenizer, [p["prompt"] + p[k] for p in PAIRS for k in ("chosen", "rejected")], 64)
    examples = [{"chosen_ids": texts[2 * i].tolist(),
                 "rejected_ids": texts[2 * i + 1].tolist()} for i in range(len(PAIRS))]
    from datasets import Dataset

    trainer = trl.RewardTrainer(AutoModelForSequenceClassification.from_pretrained(setup["rm"], num_labels=1),
                                args=_trl_args(trl.RewardConfig, setup["root"] / "trl_rm"),
                                train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer)
    trainer.model.train()
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model,
                                      RewardCollator(pad_token_id=tokenizer.pad_token_id)(examples)).item()
    assert abs(ours - 0.693147) > 0.05
    assert ours == pytest.approx(theirs, abs=1e-4)
