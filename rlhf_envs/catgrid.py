"""The cat gridworld: the small MDP that introduces RL, with its exact optimum known."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from io import StringIO

import numpy as np
from gymnasium import Env, spaces
from gymnasium.error import InvalidAction, ResetNeeded

LEFT, DOWN, RIGHT, UP = 0, 1, 2, 3
ACTION_NAMES = ("Left", "Down", "Right", "Up")
_MOVES = np.array([(0, -1), (1, 0), (0, 1), (-1, 0)], dtype=np.int64)  # (drow, dcol) per action

CELL_REWARDS = {".": 0.0, "C": 0.0, "B": -1.0, "T": -10.0, "M": 100.0}
TERMINAL_CELLS = frozenset("TM")
LEGEND = {
    "C": "the cat's start (an empty cell)",
    ".": "empty floor (0)",
    "B": "a broom (-1)",
    "T": "the bathtub (-10, the cat faints: episode ends)",
    "M": "the meat (+100, episode ends)",
    "#": "a wall (the cat cannot enter it)",
}

MAPS: dict[str, list[str]] = {
    "4x4": [
        "C..B",
        ".#T.",
        "..B.",
        "B..M",
    ],
    "8x8": [
        "C...#...",
        ".##.#.B.",
        "..B...#.",
        "#.#T.#..",
        "..#..B..",
        ".B..T.#.",
        ".#.#..#.",
        "...B..TM",
    ],
}


@dataclass(frozen=True)
class GridModel:
    """The known transition model of a map, as arrays (what the env, the vector env and the solver share).

    Attributes:
        desc: the map, one string per row.
        next_state: ``[n_states, 4]`` the cell a move in each direction leads to (walls and edges: stay).
        reward: ``[n_states]`` reward for entering each cell.
        terminal: ``[n_states]`` whether entering the cell ends the episode.
        start: the cat's start cell.
    """

    desc: tuple[str, ...]
    next_state: np.ndarray
    reward: np.ndarray
    terminal: np.ndarray
    start: int

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.desc), len(self.desc[0])

    @property
    def n_states(self) -> int:
        return self.reward.shape[0]


def parse_map(desc: str | list[str] | tuple[str, ...]) -> GridModel:
    """Validate a map (FrozenLake-style ``desc``) and build its transition arrays.

    ``desc`` is a list of equal-length row strings, or one string with rows separated by newlines.
    Raises ``ValueError`` naming the problem for ragged rows, unknown characters, no or several
    starts, or no terminal cell.
    """
    if isinstance(desc, str):
        rows = tuple(row.strip() for row in desc.strip().splitlines())
    elif isinstance(desc, (list, tuple)) and all(isinstance(r, str) for r in desc):
        rows = tuple(desc)
    else:
        raise ValueError(f"map must be a list of row strings or one newline-separated string, got {desc!r}")
    if not rows or not rows[0]:
        raise ValueError("map is empty: give at least one row of cells, e.g. ['CM']")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"map rows are ragged (lengths {[len(r) for r in rows]}): every row needs the same length")
    unknown = sorted({ch for row in rows for ch in row} - set(LEGEND))
    if unknown:
        raise ValueError(f"map has unknown cell characters {unknown}; known: {LEGEND}")
    starts = [(r, c) for r, row in enumerate(rows) for c, ch in enumerate(row) if ch == "C"]
    if len(starts) != 1:
        raise ValueError(f"map needs exactly one start cell 'C', found {len(starts)} at {starts}")
    if not any(ch in TERMINAL_CELLS for row in rows for ch in row):
        raise ValueError("map has no terminal cell: add the meat 'M' (or a bathtub 'T') so episodes can end")

    nrow, ncol = len(rows), len(rows[0])
    flat = "".join(rows)
    next_state = np.empty((nrow * ncol, 4), dtype=np.int64)
    for s in range(nrow * ncol):
        r, c = divmod(s, ncol)
        for a, (dr, dc) in enumerate(_MOVES):
            nr, nc = r + dr, c + dc
            blocked = not (0 <= nr < nrow and 0 <= nc < ncol) or rows[nr][nc] == "#"
            next_state[s, a] = s if blocked else nr * ncol + nc
    reward = np.array([CELL_REWARDS.get(ch, 0.0) for ch in flat], dtype=np.float64)
    terminal = np.array([ch in TERMINAL_CELLS for ch in flat], dtype=bool)
    start = starts[0][0] * ncol + starts[0][1]
    _warn_if_meat_unreachable(rows, next_state, terminal, start)
    return GridModel(rows, next_state, reward, terminal, start)


def _warn_if_meat_unreachable(rows: tuple[str, ...], next_state: np.ndarray, terminal: np.ndarray, start: int) -> None:
    """Warn when no meat cell can be entered from the start (walls, edges and bathtubs in the way)."""
    seen, frontier = {start}, [start]
    while frontier:  # entering a terminal cell ends the episode, so the search goes on only from the others
        s = frontier.pop()
        for nxt in next_state[s].tolist():
            if nxt not in seen:
                seen.add(nxt)
                if not terminal[nxt]:
                    frontier.append(nxt)
    flat = "".join(rows)
    if not any(flat[s] == "M" for s in seen):
        warnings.warn("the meat 'M' cannot be reached from the start 'C' on this map (walls, edges or bathtubs in the "
                      "way, or no meat): the optimal return is at most 0; open a path to the meat",
                      UserWarning, stacklevel=3)


def check_slip(slip: float) -> float:
    """Return ``slip`` as a float, or raise if it is not a probability."""
    number = not isinstance(slip, bool) and isinstance(slip, (int, float, np.floating, np.integer))
    if not number or not 0.0 <= float(slip) <= 1.0:
        raise ValueError(f"slip must be a probability in [0, 1], got {slip!r}")
    return float(slip)


def resolve_map(desc: str | list[str] | None, map_name: str) -> GridModel:
    """The model of ``desc`` if given, else of the built-in map ``map_name``."""
    if desc is None:
        if map_name not in MAPS:
            raise ValueError(f"unknown map_name {map_name!r}; built-in maps: {sorted(MAPS)} (or pass desc=[...])")
        desc = MAPS[map_name]
    return parse_map(desc)


class CatGridEnv(Env):
    """A cat walks a grid towards the meat, past brooms and the bathtub.

    ## Description
    The cat starts at the cell ``C`` and moves one cell per step. Brooms sting, the bathtub makes
    it faint, the meat is what it wants. With ``slip > 0`` the cat is drunk: with probability
    ``slip`` it moves in one of the three other directions, chosen uniformly. Because the
    transition model is known, :func:`rlhf_envs.catgrid_solver.solve` computes the exact optimum.

    ## Action Space
    ``Discrete(4)``: 0 left, 1 down, 2 right, 3 up (FrozenLake's order).

    ## Observation Space
    ``Discrete(nrow * ncol)``: the cat's cell, ``row * ncol + col``.

    ## Rewards
    Entering an empty cell: 0. A broom ``B``: -1. The bathtub ``T``: -10. The meat ``M``: +100.
    A move off the grid or into a wall ``#`` leaves the cat in place and gives the reward of the
    cell it stays on (0 on empty floor, -1 on a broom).

    ## Starting State
    The cell marked ``C``.

    ## Episode End
    Terminated on entering the bathtub (the cat faints; ``reset`` respawns it at the start) or the
    meat. Truncated by the registered ``max_episode_steps`` (100 on 4x4 maps, 200 on 8x8 maps).

    ## Arguments
    ``gym.make("CatGrid-v0", desc=None, map_name="4x4", slip=0.0, render_mode=None)``

    - ``desc``: a custom map, a list of equal-length strings over ``C . B T M #``.
    - ``map_name``: a built-in map, ``"4x4"`` or ``"8x8"`` (used when ``desc`` is None).
    - ``slip``: probability in [0, 1] that the drunk cat moves in a random other direction.
    - ``render_mode``: ``"ansi"`` (text) or ``"rgb_array"`` (a picture, 32 pixels per cell).

    Registered: ``CatGrid-v0`` (4x4), ``CatGridDrunk-v0`` (4x4, slip 0.2), ``CatGrid8x8-v0`` and
    ``CatGrid8x8Drunk-v0``.
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(
        self,
        desc: str | list[str] | None = None,
        map_name: str = "4x4",
        slip: float = 0.0,
        render_mode: str | None = None,
    ):
        self.model = resolve_map(desc, map_name)
        self.slip = check_slip(slip)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.render_mode = render_mode
        self.desc = self.model.desc
        self.nrow, self.ncol = self.model.shape
        self.observation_space = spaces.Discrete(self.model.n_states)
        self.action_space = spaces.Discrete(4)
        self.reward_range = (-10.0, 100.0)
        self.s = self.model.start
        self.last_action: int | None = None
        self._done = True

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.s = self.model.start
        self.last_action = None
        self._done = False
        return self.s, {"prob": 1.0}

    def step(self, action):
        if self._done:
            raise ResetNeeded("step() called on a finished episode (or before the first reset): call reset() first")
        a = _as_action(action)
        prob = 1.0 - self.slip
        if self.slip > 0.0 and self.np_random.random() < self.slip:
            a = (a + 1 + int(self.np_random.integers(3))) % 4
            prob = self.slip / 3.0
        s = int(self.model.next_state[self.s, a])
        self.s, self.last_action = s, a
        terminated = bool(self.model.terminal[s])
        self._done = terminated
        return s, float(self.model.reward[s]), terminated, False, {"prob": prob}

    def render(self):
        if self.render_mode == "ansi":
            return self._render_text()
        if self.render_mode == "rgb_array":
            return render_rgb(self.model, self.s)
        return None

    def _render_text(self) -> str:
        out = StringIO()
        if self.last_action is not None:
            out.write(f"  ({ACTION_NAMES[self.last_action]})\n")
        row, col = divmod(self.s, self.ncol)
        for r, line in enumerate(self.desc):
            cells = [("@" if (r, c) == (row, col) else ch) for c, ch in enumerate(line)]
            out.write("".join(cells) + "\n")
        return out.getvalue()


def _as_action(action) -> int:
    """Validate one CatGrid action: an integer in {0, 1, 2, 3}."""
    arr = np.asarray(action)
    if arr.shape != () or not np.issubdtype(arr.dtype, np.integer):
        raise InvalidAction(f"action must be one integer in [0, 3] (0 left, 1 down, 2 right, 3 up), got {action!r}")
    a = int(arr)
    if not 0 <= a < 4:
        raise InvalidAction(f"action {a} is out of range: expected 0 left, 1 down, 2 right or 3 up")
    return a


_COLOURS = {
    ".": (235, 230, 215),
    "C": (235, 230, 215),
    "#": (70, 70, 80),
    "B": (170, 120, 60),
    "T": (90, 150, 220),
    "M": (200, 40, 50),
}
_CELL_PX = 32


def render_rgb(model: GridModel, cat_cell: int) -> np.ndarray:
    """A picture of the grid: ``[nrow*32, ncol*32, 3]`` uint8; the cat is an orange disc with ears."""
    nrow, ncol = model.shape
    img = np.zeros((nrow * _CELL_PX, ncol * _CELL_PX, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:_CELL_PX, 0:_CELL_PX]
    for r, line in enumerate(model.desc):
        for c, ch in enumerate(line):
            tile = img[r * _CELL_PX:(r + 1) * _CELL_PX, c * _CELL_PX:(c + 1) * _CELL_PX]
            tile[:] = _COLOURS[ch]
            tile[[0, -1], :] = tile[:, [0, -1]] = (120, 120, 120)
            if ch == "B":  # a broom: a handle and a brush
                tile[4:20, 15:17] = (90, 60, 30)
                tile[20:28, 9:23] = (220, 190, 90)
            elif ch == "T":  # a tub: a white rim
                rim = (np.abs(yy - 16) >= 9) | (np.abs(xx - 16) >= 11)
                tile[(np.abs(yy - 16) <= 10) & (np.abs(xx - 16) <= 12) & rim] = (250, 250, 250)
            elif ch == "M":  # a bone
                tile[14:18, 8:24] = (250, 240, 230)
    r, c = divmod(int(cat_cell), ncol)
    tile = img[r * _CELL_PX : (r + 1) * _CELL_PX, c * _CELL_PX : (c + 1) * _CELL_PX]
    body = (yy - 18) ** 2 + (xx - 16) ** 2 <= 81
    ears = ((yy >= 4) & (yy <= 11)) & ((np.abs(xx - 10) <= (yy - 4) // 2) | (np.abs(xx - 22) <= (yy - 4) // 2))
    tile[body | ears] = (245, 140, 30)
    tile[((yy - 16) ** 2 + (xx - 13) ** 2 <= 2) | ((yy - 16) ** 2 + (xx - 19) ** 2 <= 2)] = (20, 20, 20)
    return img
