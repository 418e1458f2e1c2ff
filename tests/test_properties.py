"""Property-based tests: Hypothesis drives random maps, seeds and action sequences through the envs."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import rlhf_envs  # noqa: F401
from rlhf_envs.catgrid import CatGridEnv

CELLS = ".BT#M"


@st.composite
def grid_maps(draw):
    """Random rectangular maps with one start and at least one terminal cell."""
    nrow, ncol = draw(st.integers(1, 6)), draw(st.integers(2, 6))
    cells = draw(st.lists(st.sampled_from(CELLS), min_size=nrow * ncol, max_size=nrow * ncol))
    start, terminal = draw(st.permutations(range(nrow * ncol)).map(lambda p: p[:2]))
    cells[start] = "C"
    cells[terminal] = draw(st.sampled_from("TM"))
    return ["".join(cells[r * ncol:(r + 1) * ncol]) for r in range(nrow)]


def _rollout(desc, slip, seed, actions, max_steps=50):
    env = gym.wrappers.TimeLimit(CatGridEnv(desc=desc, slip=slip), max_steps)
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for a in actions:
        obs, r, term, trunc, _ = env.step(a)
        out.append((obs, r, term, trunc))
        if term or trunc:
            out.append(env.reset()[0])
    return out


@settings(max_examples=60, deadline=None)
@given(desc=grid_maps(), slip=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1),
       actions=st.lists(st.integers(0, 3), min_size=1, max_size=120))
def test_catgrid_random_play(desc, slip, seed, actions):
    trajectory = _rollout(desc, slip, seed, actions)
    n_states = len(desc) * len(desc[0])
    flat = "".join(desc)
    for item in trajectory:
        if isinstance(item, tuple):
            obs, r, term, trunc = item
            assert 0 <= obs < n_states and flat[obs] != "#"          # never inside a wall
            assert r in (0.0, -1.0, -10.0, 100.0)                    # documented rewards only
            assert term == (flat[obs] in "TM")                        # ends exactly on bathtub / meat
            assert not (term and trunc)
            assert r == {"T": -10.0, "M": 100.0, "B": -1.0}.get(flat[obs], 0.0)
        else:
            assert flat[item] == "C"                                  # reset respawns at the start
    assert trajectory == _rollout(desc, slip, seed, actions)          # same seed, same trajectory


@settings(max_examples=30, deadline=None)
@given(desc=grid_maps(), slip=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1), num_envs=st.integers(1, 16),
       steps=st.integers(1, 60))
def test_catgrid_vector_random_play(desc, slip, seed, num_envs, steps):
    from rlhf_envs.catgrid_vector import CatGridVectorEnv

    flat = "".join(desc)
    runs = []
    for _ in range(2):
        envs = CatGridVectorEnv(num_envs=num_envs, desc=desc, slip=slip, max_episode_steps=20)
        obs, _ = envs.reset(seed=seed)
        rng = np.random.default_rng(seed)
        history = [obs]
        for _ in range(steps):
            obs, r, term, trunc, info = envs.step(rng.integers(0, 4, num_envs))
            assert not (term & trunc).any()
            ended = term | trunc
            if ended.any():
                assert (obs[ended] == flat.index("C")).all()
                assert all(flat[s] in "TM" for s in info["final_obs"][term])
            assert set(np.unique(r)) <= {0.0, -1.0, -10.0, 100.0}
            history.append(np.concatenate([obs, r, term, trunc]))
        runs.append(np.concatenate(history))
    assert np.array_equal(runs[0], runs[1])
