"""Launched by ``tests/test_data_parallel.py`` under ``torchrun`` (not collected by pytest).

``python -m torch.distributed.run --nproc_per_node N tests/_torchrun_ppo.py train CONFIG.json OUT``
runs :func:`agents.lm_ppo.train_lm_ppo` with the test's vowel-share reward and writes each rank's
history to ``OUT/history-RANK.json``. ``... update OUT`` runs one :func:`agents.lm_ppo_update.ppo_update`
on the fixed rollout of :func:`fixed_rollout` under DDP and rank 0 writes the weights and stats.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch


def vowel_share(prompts, responses):
    """An easy task: the share of vowels in the response."""
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]


def fixed_rollout(batch: int = 12, prompt_len: int = 5, width: int = 7):
    """A tiny policy with a value head and a rollout of ``batch`` responses, the same in every process."""
    from agents.lm_policy import PolicyWithValueHead
    from rlhf_envs.lm.sampling import SamplingConfig
    from tests.tiny_models import tiny_causal_lm

    lm, _ = tiny_causal_lm(seed=1)
    model = PolicyWithValueHead(lm)
    g = torch.Generator().manual_seed(5)
    prompt_ids = torch.randint(0, 256, (batch, prompt_len), generator=g)
    prompt_mask = torch.arange(prompt_len) >= torch.randint(0, prompt_len, (batch, 1), generator=g)  # left padding
    response_ids = torch.randint(0, 256, (batch, width), generator=g)
    response_mask = torch.arange(width) < torch.randint(1, width + 1, (batch, 1), generator=g)  # uneven lengths
    cfg = SamplingConfig(max_new_tokens=width, temperature=0.9)
    with torch.no_grad():
        old_logprobs, old_values, _ = model(prompt_ids, prompt_mask, response_ids, response_mask, cfg)
    m = response_mask.float()
    rollout = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids,
               "response_mask": response_mask, "old_logprobs": old_logprobs, "old_values": old_values,
               "advantages": torch.randn(batch, width, generator=g) * m, "returns": torch.randn(batch, width,
                                                                                                generator=g) * m}
    return model, rollout, cfg


def run_update(rank: int, world: int, ptx: bool = True):
    """One ``ppo_update`` (2 epochs of 3 minibatches, PPO-ptx on) over :func:`fixed_rollout`; ``(model, stats,
    stopped)``."""
    from torch.nn.parallel import DistributedDataParallel

    from agents.distributed import LossModule
    from agents.lm_ppo import LMPPOConfig
    from agents.lm_ppo_update import minibatch_loss, ppo_update

    model, rollout, cfg = fixed_rollout()
    config = LMPPOConfig(batch_size=12, num_minibatches=3, ppo_epochs=2, learning_rate=0.5, max_approx_kl=None,
                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, ptx_coef=0.5 if ptx else 0.0)
    texts = torch.randint(0, 256, (8, 6), generator=torch.Generator().manual_seed(9))
    masks = (torch.arange(6) < torch.tensor([[6], [4], [5], [2], [6], [3], [6], [5]])).long()

    def ptx_batches():
        while True:
            yield texts[:4], masks[:4]
            yield texts[4:], masks[4:]

    # plain SGD: the comparison is of gradients, which Adam would blur where they are 0 (float noise turned into steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    loss_fn = functools.partial(minibatch_loss, config=config, cfg=cfg)
    step_loss = DistributedDataParallel(LossModule(model, loss_fn)) if world > 1 else functools.partial(loss_fn, model)
    stats, stopped = ppo_update(step_loss, model, optimizer, rollout, config, torch.Generator().manual_seed(3),
                                 ptx_batches() if ptx else None, rank, world)
    return model, stats, stopped


def main() -> None:
    import torch.distributed as dist

    from agents.distributed import distributed, join_process_group

    join_process_group(torch.device("cpu"))
    rank, world = distributed()
    mode, out = sys.argv[1], Path(sys.argv[-1])
    if mode == "train":
        from agents.lm_ppo import LMPPOConfig, train_lm_ppo

        config = LMPPOConfig(**json.loads(Path(sys.argv[2]).read_text()), reward_model=vowel_share)
        result = train_lm_ppo(config)
        history = [{k: v for k, v in row.items() if not k.startswith("time/")} for row in result.history]
        (out / f"history-{rank}.json").write_text(json.dumps(history))
    else:
        from safetensors.torch import save_file

        model, stats, stopped = run_update(rank, world)
        if rank == 0:
            save_file({k: v.clone() for k, v in model.state_dict().items()}, str(out / "update.safetensors"))
            (out / "update.json").write_text(json.dumps({"stats": stats, "stopped": stopped}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
