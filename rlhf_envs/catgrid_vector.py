"""CatGrid as a natively batched vector env: all N cats step at once in numpy."""

from __future__ import annotations

import numpy as np
from gymnasium import spaces
from gymnasium.error import InvalidAction, ResetNeeded
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from rlhf_envs.catgrid import check_slip, resolve_map


class CatGridVectorEnv(VectorEnv):
    """``num_envs`` independent CatGrid episodes stepped together, with no Python loop over envs.

    Created by ``gym.make_vec("CatGrid-v0", num_envs=N)``. Same dynamics, rewards and arguments as
    :class:`~rlhf_envs.catgrid.CatGridEnv`, plus ``num_envs`` and ``max_episode_steps`` (filled in
    from the registration).

    Autoreset is ``SAME_STEP``: when an episode ends, ``step`` already returns the first
    observation of the next one, and the last observation of the finished episode is in
    ``info["final_obs"]`` (where ``info["_final_obs"]`` is True). Agents use it to bootstrap the
    value at truncation.
    """

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        desc: str | list[str] | None = None,
        map_name: str = "4x4",
        slip: float = 0.0,
        max_episode_steps: int | None = None,
        render_mode: str | None = None,
    ):
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        if render_mode is not None:
            raise ValueError("CatGridVectorEnv does not render; use gym.make('CatGrid-v0', render_mode=...) for "
                             "pictures")
        if max_episode_steps is not None and max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be a positive integer or None, got {max_episode_steps!r}")
        self.model = resolve_map(desc, map_name)
        self.slip = check_slip(slip)
        self.num_envs = int(num_envs)
        self.max_episode_steps = max_episode_steps
        self.single_observation_space = spaces.Discrete(self.model.n_states)
        self.single_action_space = spaces.Discrete(4)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.render_mode = None
        self._next_state = self.model.next_state
        self._reward = self.model.reward.astype(np.float32)
        self._terminal = self.model.terminal
        self._state = np.full(self.num_envs, self.model.start, dtype=np.int64)
        self._elapsed = np.zeros(self.num_envs, dtype=np.int64)
        self._needs_reset = True

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        if isinstance(seed, (list, tuple)):
            seed = seed[0]
        super().reset(seed=seed)
        self._state[:] = self.model.start
        self._elapsed[:] = 0
        self._needs_reset = False
        return self._state.copy(), {}

    def step(self, actions):
        if self._needs_reset:
            raise ResetNeeded("call reset() before step()")
        a = np.asarray(actions)
        if a.shape != (self.num_envs,) or not np.issubdtype(a.dtype, np.integer):
            raise InvalidAction(
                f"actions must be {self.num_envs} integers in [0, 3] (shape ({self.num_envs},)), "
                f"got shape {a.shape} dtype {a.dtype}")
        if a.min() < 0 or a.max() > 3:
            raise InvalidAction(f"actions out of range: got values {sorted(set(a[(a < 0) | (a > 3)].tolist()))}, "
                                "expected 0..3")
        if self.slip > 0.0:
            slipped = self.np_random.random(self.num_envs) < self.slip
            turn = self.np_random.integers(1, 4, self.num_envs)
            a = np.where(slipped, (a + turn) % 4, a)
        s = self._next_state[self._state, a]
        reward = self._reward[s]
        terminated = self._terminal[s]
        self._elapsed += 1
        if self.max_episode_steps is None:
            truncated = np.zeros(self.num_envs, dtype=bool)
        else:
            truncated = (self._elapsed >= self.max_episode_steps) & ~terminated
        done = terminated | truncated
        info: dict = {}
        if done.any():
            info = {"final_obs": s.copy(), "_final_obs": done}
            s = np.where(done, self.model.start, s)
            self._elapsed[done] = 0
        self._state = s
        return s.copy(), reward, terminated, truncated, info

