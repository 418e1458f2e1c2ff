"""CatGrid: API conformance, dynamics, the exact solver, the vector env, and bad input."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.error import InvalidAction
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import rlhf_envs
from rlhf_envs.catgrid import MAPS, CatGridEnv, parse_map
from rlhf_envs.catgrid_solver import policy_return, solve

CATGRID_IDS = [spec["id"] for spec in rlhf_envs._ENVS]


@pytest.mark.parametrize("env_id", CATGRID_IDS)
def test_check_env_gymnasium_and_sb3(env_id):
    gym_check_env(gym.make(env_id).unwrapped, skip_render_check=False)
    sb3_check_env(gym.make(env_id), warn=True)


def test_make_without_import_uses_module_prefix():
    env = gym.make("rlhf_envs:CatGrid-v0")
    assert env.spec.max_episode_steps == 100


def test_rewards_and_termination_on_a_line():
    # C . B M : right, right (broom -1), right (meat +100, ends)
    env = CatGridEnv(desc=["C.BM"])
    env.reset(seed=0)
    assert env.step(2)[1:4] == (0.0, False, False)
    assert env.step(2)[1:4] == (-1.0, False, False)
    s, r, term, trunc, _ = env.step(2)
    assert (s, r, term, trunc) == (3, 100.0, True, False)


def test_bathtub_ends_episode_and_reset_respawns():
    env = CatGridEnv(desc=["TCM"])
    env.reset(seed=0)
    s, r, term, _, _ = env.step(0)
    assert (s, r, term) == (0, -10.0, True)
    with pytest.raises(gym.error.ResetNeeded, match="reset"):
        env.step(2)
    assert env.reset()[0] == 1


def test_walls_and_edges_leave_the_cat_in_place():
    env = CatGridEnv(desc=["C#", ".M"])
    env.reset(seed=0)
    assert env.step(2)[0] == 0  # into the wall
    assert env.step(3)[0] == 0  # off the top edge
    assert env.step(0)[0] == 0  # off the left edge
    assert env.step(1)[0] == 2  # down onto the floor


def test_time_limit_truncates():
    env = gym.make("CatGrid-v0")
    env.reset(seed=0)
    for t in range(100):
        _, _, term, trunc, _ = env.step(3)  # the cat presses against the top wall forever
    assert not term and trunc


# --- The exact solver, against values computed by hand ---------------------------------------

def test_solver_hand_computed_horizons():
    model = parse_map(["CBM"])
    assert solve(model, slip=0.0,
                 horizon=1).optimal_return == pytest.approx(0.0)   # stay put rather than step on the broom
    assert solve(model, slip=0.0, horizon=2).optimal_return == pytest.approx(99.0)  # broom then meat


def test_solver_hand_computed_slip():
    # From C, "right" reaches the meat with prob 1 - s; the three slips bump into edges and stay.
    model = parse_map(["CM"])
    s = 0.3
    assert solve(model, slip=s, horizon=1).optimal_return == pytest.approx(100 * (1 - s))
    assert solve(model, slip=s, horizon=2).optimal_return == pytest.approx(100 * (1 - s ** 2))
    # A bathtub beside the start: going right risks slipping left into it (prob s/3, -10).
    model = parse_map(["TCM"])
    assert solve(model, slip=s, horizon=1).optimal_return == pytest.approx(100 * (1 - s) - 10 * s / 3)


@pytest.mark.parametrize("env_id", CATGRID_IDS)
def test_solver_policy_achieves_the_optimum(env_id):
    env = gym.make(env_id)
    sol = solve(env)
    assert policy_return(env, sol.policy) == pytest.approx(sol.optimal_return, abs=1e-3)
    uniform = np.full((env.observation_space.n, 4), 0.25)
    assert policy_return(env, uniform) < 0.8 * sol.optimal_return


def test_solver_optimum_matches_monte_carlo_on_the_drunk_map():
    env = gym.make("CatGridDrunk-v0")
    sol = solve(env)
    returns = []
    for episode in range(2000):
        s, _ = env.reset(seed=episode)
        total, done = 0.0, False
        while not done:
            s, r, term, trunc, _ = env.step(int(sol.policy[s]))
            total, done = total + r, term or trunc
        returns.append(total)
    stderr = np.std(returns) / np.sqrt(len(returns))
    assert abs(np.mean(returns) - sol.optimal_return) < 4 * stderr + 1e-6


# --- Seeding and the drunk cat ------------------------------------------------------------------

def _trajectory(env_id: str, seed: int, n: int = 300) -> list:
    env = gym.make(env_id)
    rng = np.random.default_rng(123)
    out = [env.reset(seed=seed)[0]]
    for _ in range(n):
        s, r, term, trunc, _ = env.step(int(rng.integers(4)))
        out.append((s, r))
        if term or trunc:
            out.append(env.reset()[0])
    return out


def test_same_seed_same_trajectory():
    assert _trajectory("CatGridDrunk-v0", 7) == _trajectory("CatGridDrunk-v0", 7)
    assert _trajectory("CatGridDrunk-v0", 7) != _trajectory("CatGridDrunk-v0", 8)


@pytest.mark.parametrize("slip", [0.0, 0.2, 0.6])
def test_slip_frequency_matches_slip(slip):
    env = CatGridEnv(desc=["C....", ".....", "....M"], slip=slip)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    n, slipped = 20_000, 0
    for _ in range(n):
        a = int(rng.integers(4))
        env.step(a)
        slipped += env.last_action != a
        env._done = False  # the meat may end the episode: keep stepping from where the cat is
    sigma = np.sqrt(slip * (1 - slip) / n)
    assert abs(slipped / n - slip) <= 4 * sigma + 1e-9


# --- The natively batched vector env ------------------------------------------------------------

def test_vector_env_matches_single_env_when_sober():
    envs = gym.make_vec("CatGrid-v0", num_envs=3)
    single = [gym.make("CatGrid-v0") for _ in range(3)]
    obs, _ = envs.reset(seed=0)
    assert obs.tolist() == [e.reset(seed=0)[0] for e in single]
    rng = np.random.default_rng(0)
    for _ in range(300):
        actions = rng.integers(0, 4, 3)
        obs, rew, term, trunc, info = envs.step(actions)
        for i, e in enumerate(single):
            s, r, t, tr, _ = e.step(int(actions[i]))
            assert (rew[i], term[i], trunc[i]) == (r, t, tr)
            if t or tr:
                assert info["_final_obs"][i] and info["final_obs"][i] == s
                s, _ = e.reset()
            assert obs[i] == s


def test_vector_env_slip_and_shapes():
    envs = gym.make_vec("CatGridDrunk-v0", num_envs=4096)
    assert envs.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (4096,) and envs.single_action_space == gym.spaces.Discrete(4)
    # From the start of the 4x4 map "up" and "left" bump into edges: any move is a slip.
    obs, *_ = envs.step(np.full(4096, 3))
    moved = (obs != 0).mean()
    assert abs(moved - 0.2 * 2 / 3) < 0.03  # of the 3 slip directions, 2 (down, right) move the cat


def test_vector_env_rejects_bad_actions():
    envs = gym.make_vec("CatGrid-v0", num_envs=2)
    envs.reset(seed=0)
    with pytest.raises(InvalidAction, match="shape"):
        envs.step(np.array([0, 1, 2]))
    with pytest.raises(InvalidAction, match="out of range"):
        envs.step(np.array([0, 7]))
    envs.step(np.array([1, 2]))  # still usable


# --- Rendering -------------------------------------------------------------------------------

def test_render_ansi_and_rgb():
    env = gym.make("CatGrid-v0", render_mode="ansi")
    env.reset(seed=0)
    text = env.render()
    assert text.splitlines()[0] == "@..B"
    env = gym.make("CatGrid8x8-v0", render_mode="rgb_array")
    env.reset(seed=0)
    img = env.render()
    assert img.shape == (256, 256, 3) and img.dtype == np.uint8
    cat = np.array([245, 140, 30])
    assert (img[:32, :32] == cat).all(-1).sum() > 50 and (img[32:] == cat).all(-1).sum() == 0


# --- Bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("action", [4, -1, 1.5, "left", np.array([0, 1]), None])
def test_bad_actions_name_the_value(action):
    env = gym.make("CatGrid-v0").unwrapped
    env.reset(seed=0)
    with pytest.raises(InvalidAction, match=r"action"):
        env.step(action)
    env.step(1)  # the env is still usable


@pytest.mark.parametrize("desc, message", [
    (["..", ".M"], "exactly one start"),
    (["CC", ".M"], "exactly one start"),
    (["C.", ".."], "no terminal cell"),
    (["C..", ".M"], "ragged"),
    (["C.", ".X"], "unknown cell characters"),
    ([], "empty"),
    (42, "list of row strings"),
])
def test_malformed_maps(desc, message):
    with pytest.raises(ValueError, match=message):
        CatGridEnv(desc=desc)


@pytest.mark.parametrize("slip", [-0.1, 1.5, float("nan"), "high"])
def test_slip_outside_unit_interval(slip):
    with pytest.raises(ValueError, match="slip must be a probability"):
        gym.make("CatGrid-v0", slip=slip)


def test_unknown_map_name_lists_maps():
    with pytest.raises(ValueError, match=str(sorted(MAPS)).replace("[", r"\[").replace("]", r"\]")):
        CatGridEnv(map_name="3x3")


def test_maps_from_a_string():
    env = CatGridEnv(desc="C.\n.M")
    assert env.observation_space.n == 4


@pytest.mark.parametrize("desc", [["C#M", "##."], ["CT", "TM"], ["C.#", "..#", "##M"]])
def test_a_map_whose_meat_cannot_be_reached_warns(desc):
    with pytest.warns(UserWarning, match=r"the meat 'M' cannot be reached from the start 'C'.*optimal return is at "
                                         r"most 0"):
        CatGridEnv(desc=desc)


def test_reachable_meat_and_the_registered_maps_do_not_warn():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        CatGridEnv(desc=["C#", ".M"])
        for name in ("CatGrid-v0", "CatGridDrunk-v0", "CatGrid8x8-v0", "CatGrid8x8Drunk-v0"):
            gym.make(name)
