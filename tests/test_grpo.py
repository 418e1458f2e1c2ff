"""The GRPO-family trainer: errors before anything runs, ratio 1 at step 0, the right tokens, resume, learning."""

import gymnasium as gym
import pytest
import torch

import rlhf_envs  # noqa: F401
from agents.grpo import GRPOConfig, _collect, _setup, train_grpo
from agents.lm_policy import policy_forward
from rlhf_envs.text_arithmetic import make_arithmetic_tokenizer

PROBLEMS = ["2+3=", "4+4=", "1+6=", "3*3=", "7-2=", "8+1=", "5*1=", "9-4="]


@pytest.fixture(scope="module")
def tiny_arithmetic_lm(tmp_path_factory):
    """A random 1-layer GPT-2 on the arithmetic tokenizer (the tests of mechanics need no trained model)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = make_arithmetic_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0, pad_token_id=1))
    path = tmp_path_factory.mktemp("tiny_arith")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _config(model, out, **kwargs):
    settings = dict(model_path=model, prompts=PROBLEMS, output_dir=str(out), total_episodes=32, batch_size=16,
                    group_size=4, max_new_tokens=4, progress=False, torch_threads=1)
    return GRPOConfig(**{**settings, **kwargs})


@pytest.mark.parametrize("kwargs, match", [
    ({"loss_type": "ppo"}, r"loss_type='ppo'.*\['grpo', 'dr_grpo', 'dapo'\]"),
    ({"advantage": "gae"}, r"advantage='gae'.*\['grpo', 'rloo', 'reinforce_pp'\]"),
    ({"group_size": 3}, "group_size=3 does not divide batch_size=16"),
    ({"group_size": 0}, "group_size must be a positive integer, got 0"),
    ({"kl_loss": "k1"}, r"kl_loss='k1'.*\['k3', 'k2'\]"),
])
def test_bad_settings_fail_before_anything_runs(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _config("/nonexistent/model", tmp_path / "never", **kwargs)
    assert not (tmp_path / "never").exists()


def test_bad_group_size_from_the_env():
    with pytest.raises(ValueError, match="group_size=3 does not divide num_envs=8"):
        gym.make_vec("TextArithmetic-v0", num_envs=8, group_size=3, prompts=PROBLEMS)


def test_ratio_is_exactly_one_at_step_zero(tiny_arithmetic_lm, tmp_path, one_thread):
    """The training pass (train mode, with gradients) gives bit-identical log-probs to the rollout's."""
    run = _setup(_config(tiny_arithmetic_lm, tmp_path, ppo_epochs=2))  # two epochs: the rollout runs its own pass
    batch, _ = _collect(run, 0)
    run.lm.train()
    logprobs, _, _ = policy_forward(run.lm, None, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                                    batch["response_mask"], run.config.sampling)
    ratio = (logprobs - batch["old_logprobs"]).exp()
    assert torch.equal(ratio[batch["response_mask"]], torch.ones(int(batch["response_mask"].sum())))
    # one step per rollout, with a KL term so that the rollout runs its own pass of old log-probs
    history = train_grpo(_config(tiny_arithmetic_lm, tmp_path / "run", total_episodes=16, beta=0.01)).history
    assert history[0]["policy/ratio_avg"] == 1.0 and history[0]["policy/clipfrac_avg"] == 0.0


def test_nothing_after_eos_and_a_truncated_response_has_no_eos(tiny_arithmetic_lm, tmp_path, one_thread):
    """Log-probs, reference log-probs and KL are 0 past EOS; a response without EOS covers all T tokens."""
    run = _setup(_config(tiny_arithmetic_lm, tmp_path, beta=0.1, kl_in="reward"))
    batch, _ = _collect(run, 0)
    mask, ids = batch["response_mask"], batch["response_ids"]
    for key in ("old_logprobs", "ref_logprobs"):
        assert (batch[key][~mask] == 0).all() and (batch[key][mask] != 0).all()
    eos = run.task.eos_token_id
    ended = ((ids == eos) & mask).any(-1)
    lengths = mask.sum(-1)
    assert (~ended).any() and ended.any()  # the random model writes both kinds
    assert (lengths[~ended] == run.config.max_new_tokens).all()  # truncated: T tokens, no EOS appended
    assert (ids[ended, lengths[ended] - 1] == eos).all()  # ended: the last masked token is the EOS
    # the env's KL sums exactly the masked tokens: recompute it from the log-probs
    kl = ((batch["old_logprobs"] - batch["ref_logprobs"]) * mask).sum(-1)
    torch.testing.assert_close(batch["kl"], kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch["rewards"], batch["scores"] - 0.1 * batch["kl"], atol=1e-5, rtol=1e-5)


def test_dynamic_sampling_trains_on_no_zero_variance_group(tiny_arithmetic_lm, tmp_path, one_thread):
    history = train_grpo(_config(tiny_arithmetic_lm, tmp_path, loss_type="dapo", max_refills=2)).history
    assert all(row["groups/trained_zero_variance_frac"] == 0.0 for row in history)
    plain = train_grpo(_config(tiny_arithmetic_lm, tmp_path / "plain", loss_type="grpo")).history
    assert all(0.0 <= row["groups/zero_variance_frac"] <= 1.0 for row in plain)


@pytest.mark.parametrize("kwargs", [{"loss_type": "dr_grpo", "advantage": "rloo"},
                                    {"loss_type": "grpo", "beta": 0.05, "kl_loss": "k2", "ppo_epochs": 2,
                                     "num_minibatches": 2}])
def test_resume_equals_an_uninterrupted_run(tiny_arithmetic_lm, tmp_path, one_thread, kwargs):
    whole = train_grpo(_config(tiny_arithmetic_lm, tmp_path / "whole", total_episodes=48, **kwargs))
    _config(tiny_arithmetic_lm, tmp_path / "split")
    train_grpo(_config(tiny_arithmetic_lm, tmp_path / "split", total_episodes=32, save_every=1, **kwargs))
    resumed = train_grpo(_config(tiny_arithmetic_lm, tmp_path / "split", total_episodes=48, resume=True, **kwargs))
    assert resumed.history[-1] == whole.history[-1]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "whole" / "policy" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "policy" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_grpo_raises_accuracy_on_a_tiny_task(tmp_path, one_thread):
    """Seeded: the committed arithmetic model trained on eight problems; their pass@1 (64 samples each) rises."""
    from agents.verifiable import evaluate_verifiable
    from rlhf_envs.lm.loading import load_causal_lm
    from rlhf_envs.rewards import make_reward_model
    from rlhf_envs.text_arithmetic import ASSET_DIR

    problems = ["57+68=", "93-48=", "76*8=", "39+47=", "82-57=", "64*7=", "28+95=", "71-36="]
    verifier = make_reward_model("verifier")

    def pass_at_1(path):
        model, tokenizer = load_causal_lm(path)
        return evaluate_verifiable(model, tokenizer, problems, verifier, k=64, seed=1)["pass@1"]

    config = GRPOConfig(prompts=problems, output_dir=str(tmp_path), total_episodes=64 * 60, batch_size=64,
                        group_size=8, learning_rate=1e-4, warmup_iterations=5, loss_type="dapo", progress=False,
                        torch_threads=1)
    train_grpo(config)
    before, after = pass_at_1(str(ASSET_DIR)), pass_at_1(str(tmp_path / "policy"))
    assert after >= before + 0.1, (before, after)
