"""Multi-turn PPO: the loss mask is the env's policy mask, env tokens never reach the loss or the KL, credit
assignment on hand-made episodes, config checks, and a seeded learning test (the turn count falls)."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

import rlhf_envs  # noqa: F401
from agents.dialogue_ppo import (
    CREDIT,
    DialogueBatch,
    DialoguePPOConfig,
    _episode_tensors,
    _minibatch_loss,
    collect_episodes,
    evaluate_dialogue,
    train_dialogue_ppo,
)
from agents.lm_policy import PolicyWithValueHead
from rlhf_envs.lm.sampling import SamplingConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _hand_made_episode():
    """``?8<eot>higher12<eot>lower11<eot>correct`` played in a one-env vector TextDialogue: (envs, final obs, mask)."""
    envs = gym.make_vec("TextDialogue-v0", num_envs=1)
    envs.reset(seed=0)
    envs.unwrapped.dialogues.games[0].secret = 11
    tok = envs.unwrapped.task.tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for guess in ["8", "12", "11"]:
            _, _, terminated, _, info = envs.step(np.array([tok.convert_tokens_to_ids([guess, "<eot>"])]))
    assert terminated[0]
    real = np.cumsum(info["final_obs"][0] != envs.unwrapped.task.pad_token_id) > 0
    return envs, info["final_obs"][0][real], info["final_policy_mask"][0][real]


def test_loss_mask_is_the_policy_mask_and_env_tokens_never_enter_the_loss():
    envs, context, mask = _hand_made_episode()
    task = envs.unwrapped.task
    tok = task.tokenizer
    prompt_ids, prompt_mask, response_ids, response_mask, loss_mask = _episode_tensors(
        [context], [mask], task.pad_token_id, task.eos_token_id)
    assert tok.convert_ids_to_tokens(prompt_ids[prompt_mask].tolist()) == ["?"]
    rest = tok.convert_ids_to_tokens(response_ids[0].tolist())
    assert rest == ["8", "<eot>", "higher", "12", "<eot>", "lower", "11", "<eot>", "correct", "<eot>"]
    assert loss_mask[0].tolist() == [True, True, False, True, True, False, True, True, False, False]
    assert response_mask[0].all()  # the trailing slot carries the value after the episode

    model = PolicyWithValueHead(task.ref_model).requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    shape = response_ids.shape
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids,
             "response_mask": response_mask, "loss_mask": loss_mask,
             "old_logprobs": -torch.rand(shape, generator=generator),
             "old_values": torch.randn(shape, generator=generator),
             "advantages": torch.randn(shape, generator=generator), "returns": torch.randn(shape, generator=generator)}
    config = DialoguePPOConfig()
    sampling = SamplingConfig(max_new_tokens=2)
    loss, _ = _minibatch_loss(model, batch, config, sampling)
    scrambled = dict(batch)
    for key in ("old_logprobs", "old_values", "advantages", "returns"):
        scrambled[key] = torch.where(loss_mask, batch[key], 100 * torch.randn(shape, generator=generator) - 50)
    loss2, _ = _minibatch_loss(model, scrambled, config, sampling)
    assert loss.item() == pytest.approx(loss2.item(), abs=1e-6)


def _batch(kl, turn_reward, loss_mask, turn_start, truncated=False):
    e = len(loss_mask)
    mask = torch.tensor(loss_mask)
    return DialogueBatch(torch.zeros(e, 1, dtype=torch.long), torch.ones(e, 1, dtype=torch.bool),
                         torch.zeros(mask.shape, dtype=torch.long), torch.ones(mask.shape, dtype=torch.bool), mask,
                         torch.tensor(kl), torch.tensor(turn_reward), torch.tensor(turn_start),
                         torch.tensor([not truncated] * e), torch.tensor([truncated] * e),
                         torch.tensor([int(sum(s)) for s in turn_start]), torch.zeros(e), torch.zeros(e), beta=0.5)


def test_token_and_turn_credit_skip_env_tokens():
    # policy, policy, env, policy, policy, env, trailing slot
    batch = _batch(kl=[[0.2, 0.0, 0.0, 0.4, 0.0, 0.0, 0.0]], turn_reward=[[0.0, -0.1, 0.0, 0.0, 0.9, 0.0, 0.0]],
                   loss_mask=[[True, True, False, True, True, False, False]],
                   turn_start=[[True, False, False, True, False, False, False]])
    values = torch.zeros(1, 7)
    config = DialoguePPOConfig(gamma=1.0, gae_lambda=1.0)
    adv, ret = CREDIT["token"](batch, values, config)
    token_rewards = [-0.1, -0.1, -0.2, 0.9]  # -beta * kl plus the turn's reward on its last token
    expected = [sum(token_rewards[i:]) for i in range(4)]
    assert adv[0, [0, 1, 3, 4]].tolist() == pytest.approx(expected) and adv[0, [2, 5, 6]].abs().sum() == 0
    adv, _ = CREDIT["turn"](batch, values, config)
    assert adv[0, [0, 1, 3, 4]].tolist() == pytest.approx([0.5, 0.5, 0.7, 0.7]) and adv[0, [2, 5, 6]].abs().sum() == 0
    # a truncated episode bootstraps from the value after it (the trailing slot)
    truncated = _batch(kl=batch.kl.tolist(), turn_reward=batch.turn_reward.tolist(), loss_mask=batch.loss_mask.tolist(),
                       turn_start=batch.turn_start.tolist(), truncated=True)
    values[0, 6] = 2.0
    adv, _ = CREDIT["token"](truncated, values, config)
    assert adv[0, 4].item() == pytest.approx(0.9 + 2.0)


def test_collect_episodes_records_only_policy_tokens():
    envs = gym.make_vec("TextDialogue-v0", num_envs=8, beta=0.1)
    lm = envs.unwrapped.task.ref_model
    batch = collect_episodes(lm, envs, SamplingConfig(max_new_tokens=2), torch.Generator().manual_seed(0), seed=0)
    assert (batch.kl[~batch.loss_mask] == 0).all() and (batch.turn_reward[~batch.loss_mask] == 0).all()
    assert (batch.turn_start & ~batch.loss_mask).sum() == 0
    assert batch.turn_start.sum(-1).tolist() == batch.turns.tolist()
    # returns: the env's rewards summed over the episode
    expected = batch.turn_reward.sum(-1) - 0.1 * batch.kl.sum(-1)
    assert batch.returns.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert (batch.terminated ^ batch.truncated).all()


def test_config_checks():
    with pytest.raises(ValueError, match="credit"):
        DialoguePPOConfig(credit="tokens")
    with pytest.raises(ValueError, match="learning_rate"):
        DialoguePPOConfig(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="divisible"):
        DialoguePPOConfig(num_envs=10, num_minibatches=4)


@pytest.mark.slow
def test_ppo_cuts_the_turn_count_on_the_guess_game():
    lm = gym.make("TextDialogue-v0").unwrapped.task.ref_model
    before = evaluate_dialogue(lm, episodes=128, seed=7)
    result = train_dialogue_ppo(DialoguePPOConfig(iterations=10, num_envs=64, seed=0))
    after = evaluate_dialogue(result.model.lm, episodes=128, seed=7)
    assert after["turns"] < before["turns"] - 0.5, (before, after)
    assert after["solved"] >= before["solved"]


def test_groups_share_an_episode_and_group_credit_is_grpo():
    envs = gym.make_vec("TextDialogueTool-v0", num_envs=8, group_size=4)
    _, info = envs.reset(seed=0)
    prompts = list(info["prompt"])
    assert len(set(prompts[:4])) == 1 and len(set(prompts[4:])) == 1 and prompts[0] != prompts[4]
    batch = _batch(kl=[[0.0]] * 4, turn_reward=[[0.0]] * 4, loss_mask=[[True]] * 4, turn_start=[[True]] * 4)
    batch.returns = torch.tensor([1.0, 0.0, 3.0, 4.0])
    adv, _ = CREDIT["group"](batch, torch.zeros(4, 1), DialoguePPOConfig(num_envs=4, group_size=2, credit="group"))
    assert adv[:, 0].tolist() == pytest.approx([2 ** -0.5, -(2 ** -0.5), -(2 ** -0.5), 2 ** -0.5], abs=1e-6)
    with pytest.raises(ValueError, match="group_size"):
        DialoguePPOConfig(credit="group")
