"""agents: the algorithms that train against rlhf_envs, and the ``rlhf`` command.

One flat module per algorithm, each with one config dataclass and one ``train_*`` function:
``agents.ppo`` (discrete Gymnasium envs), ``agents.sft`` (:func:`~agents.sft.train_sft`),
``agents.reward_model`` (:func:`~agents.reward_model.train_reward_model`), ``agents.dpo``
(:func:`~agents.dpo.train_dpo`). ``agents.data`` reads and tokenises JSONL datasets,
``agents.checkpoint`` writes atomic safetensors checkpoints, and ``agents.lm_common`` holds the
training loop the LM trainers share. Importing this package imports nothing heavy; import the
submodule you need.
"""
