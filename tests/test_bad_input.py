"""One table of bad inputs across the product: each must fail with an error naming the culprit and
what was expected, before any state changes or any file is written.

A row is ``build(ctx) -> (call, check)``, the exception type and a regex. ``call()`` must raise;
then the files under ``tmp_path`` must be exactly as before the call, and ``check()`` proves the
subject is still usable and unchanged: an env is compared step for step (observations, rewards,
infos, RNG position) with a twin that never saw the bad input.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.error import InvalidAction, NameNotFound, ResetNeeded, VersionNotFound

import rlhf_envs  # noqa: F401
from agents.data import DataError, read_preferences, read_prompts, read_rankings, read_sft
from rlhf_envs.rewards import RewardModelError, make_reward_model, register
from tests.tiny_models import tiny_causal_lm

pytestmark = [pytest.mark.filterwarnings("ignore:no policy log-probs were handed over:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:.*render_mode='svg' that is not in the possible render_modes"),
              pytest.mark.usefixtures("one_thread")]  # tests/conftest.py

PROMPTS = ["hello there", "the cat sat", "a b"]
T = 6
EOS, PAD, V = 256, 257, 258
VALID_RESPONSE = np.array([97, 98, 97, EOS, PAD, PAD])  # "aba" then EOS and padding


def count_a(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(r.count("a")) for r in responses]


@dataclass
class Ctx:
    tmp: Path
    lm: tuple
    saved: Path  # a tiny GPT-2 and tokenizer saved with save_pretrained, outside tmp

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def model_copy(self, name: str, drop: tuple[str, ...] = (), config: Callable[[dict], dict] | None = None) -> Path:
        path = self.tmp / name
        shutil.copytree(self.saved, path)
        for item in drop:
            (path / item).unlink()
        if config is not None:
            raw = json.loads((path / "config.json").read_text())
            (path / "config.json").write_text(json.dumps(config(raw)))
        return path




@pytest.fixture(scope="module")
def lm():
    return tiny_causal_lm(seed=0)


@pytest.fixture(scope="module")
def saved(lm, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "tiny"
    lm[0].save_pretrained(path)
    lm[1].save_pretrained(path)
    return path


# ---- comparing an env that saw the bad input with its twin that did not -----------------------------

def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype and a.tolist() == b.tolist()
    return a == b


def _play_single(actions: list) -> Callable[[gym.Env], list]:
    """Step ``actions`` (resetting after an episode ends), then reset once more: the whole trace."""

    def play(env: gym.Env) -> list:
        trace = []
        for action in actions:
            out = env.step(action)
            trace.append(out)
            if out[2] or out[3]:
                trace.append(env.reset())
        trace.append(env.reset())
        return trace

    return play


def _play_vector(actions: list) -> Callable[[gym.vector.VectorEnv], list]:
    def play(envs: gym.vector.VectorEnv) -> list:
        return [envs.step(a) for a in actions] + [envs.reset()]

    return play


def after_reset(play: Callable[[Any], list]) -> Callable[[Any], list]:
    """``play`` from a fresh episode (for an env left at the end of one)."""
    return lambda env: [env.reset(), *play(env)]


def env_case(make: Callable[[Ctx], Any], bad: Callable[[Any], Any], play: Callable[[Any], list],
             prepare: Callable[[Any], Any] | None = None, seed: int = 3) -> Callable[[Ctx], tuple]:
    """Two identical envs, reset with one seed (and ``prepare``d); the bad input goes to the first."""

    def build(ctx: Ctx) -> tuple:
        twins = [make(ctx), make(ctx)]
        for env in twins:
            env.reset(seed=seed)
            if prepare is not None:
                prepare(env)
        hit, control = twins

        def check() -> None:
            assert _same(play(hit), play(control)), "the env changed state on a rejected input"

        return (lambda: bad(hit)), check

    return build


def just(fn: Callable[[Ctx], Any]) -> Callable[[Ctx], tuple]:
    """A call whose only state is the file system (checked for every row)."""
    return lambda ctx: ((lambda: fn(ctx)), lambda: None)


# ---- the subjects ----------------------------------------------------------------------------------------

def catgrid(ctx: Ctx):
    return gym.make("CatGridDrunk-v0")  # slip > 0, so a consumed random number would show in the twin check


def catgrid_sober(ctx: Ctx):
    return gym.make("CatGrid-v0")


def catgrid_vec(ctx: Ctx):
    return gym.make_vec("CatGridDrunk-v0", num_envs=4)


TO_MEAT = [1, 1, 2, 2, 2, 1]  # down, down, right, right, right, down: the meat on the 4x4 map


def _reach_meat(env) -> None:
    for a in TO_MEAT:
        env.step(a)


def _text_kwargs(ctx: Ctx, kw: dict) -> dict:
    """Tiny model, three prompts, 6 new tokens, a deterministic plugin, adaptive beta; ``kw`` overrides."""
    return {"model": ctx.lm, "prompts": PROMPTS, "max_new_tokens": T, "reward_model": count_a, "kl_setpoint": 1.0, **kw}


def bandit(ctx: Ctx, **kw):
    return gym.make("TextBandit-v0", **_text_kwargs(ctx, kw))


def bandit_vec(ctx: Ctx, **kw):
    return gym.make_vec("TextBandit-v0", **_text_kwargs(ctx, {"num_envs": 4, **kw}))


def token(ctx: Ctx, **kw):
    return gym.make("TextToken-v0", **_text_kwargs(ctx, kw))


def token_vec(ctx: Ctx, **kw):
    return gym.make_vec("TextToken-v0", **_text_kwargs(ctx, {"num_envs": 4, **kw}))


play_catgrid = _play_single([0, 1, 2, 3, 1, 2, 2, 1])
play_catgrid_vec = _play_vector([np.array([0, 1, 2, 3]), np.array([1, 1, 2, 2]), np.array([3, 2, 1, 0])])
play_bandit = _play_single([VALID_RESPONSE, VALID_RESPONSE])
play_bandit_vec = _play_vector([np.tile(VALID_RESPONSE, (4, 1))] * 2)
play_token = _play_single([97, 98, EOS, 97, 97, 97, 97, 97, 97])
play_token_vec = _play_vector([np.array([97, EOS, 98, 97])] * 3 + [np.array([EOS] * 4)])


class Flaky:
    """A reward plugin that misbehaves (``how``) on its first call only, then counts ``a``s."""

    def __init__(self, how: str, release: threading.Event | None = None):
        self.how, self.calls, self.release = how, 0, release

    def __call__(self, prompts: list[str], responses: list[str]) -> Any:
        self.calls += 1
        if self.calls == 1:
            if self.how == "raise":
                raise KeyError("tokenizer lost its vocabulary")
            if self.how == "nan":
                return [float("nan")] * len(responses)
            if self.how == "hang":
                self.release.wait(10)
        return count_a(prompts, responses)


def bandit_with_plugin(how: str, vector: bool = False, timeout: float | None = None) -> Callable[[Ctx], tuple]:
    """A TextBandit whose reward plugin fails once; its twin's plugin never fails."""

    def build(ctx: Ctx) -> tuple:
        release = threading.Event()
        maker = bandit_vec if vector else bandit
        hit = maker(ctx, reward_model=Flaky(how, release), reward_timeout_s=timeout)
        control = maker(ctx, reward_timeout_s=timeout)
        for env in (hit, control):
            env.reset(seed=5)
        action = np.tile(VALID_RESPONSE, (4, 1)) if vector else VALID_RESPONSE
        play = play_bandit_vec if vector else play_bandit

        def check() -> None:
            release.set()
            assert _same(play(hit), play(control))

        return (lambda: hit.step(action)), check

    return build


_TOY: dict[str, Any] = {}


def toy_plugin(prompts: list[str], responses: list[str]) -> Any:
    """Misbehaves on purpose, keyed by the response text; otherwise scores the response length."""
    if responses == ["boom"]:
        raise ZeroDivisionError("division by zero")
    if responses == ["nan", "x"]:
        return [1.0, float("nan")]
    if responses == ["inf", "x"]:
        return [float("-inf"), 1.0]
    if responses == ["short", "x"]:
        return [1.0]
    if responses == ["words", "x"]:
        return ["good", "bad"]
    if responses == ["hang"]:
        _TOY["release"].wait(10)
    return [float(len(r)) for r in responses]


def plugin_case(responses: list[str], timeout_s: float = 2.0) -> Callable[[Ctx], tuple]:
    def build(ctx: Ctx) -> tuple:
        _TOY["release"] = threading.Event()
        register("bad-input-toy", lambda: toy_plugin, overwrite=True)
        rm = make_reward_model("bad-input-toy", timeout_s=timeout_s)

        def check() -> None:
            _TOY["release"].set()
            assert rm.score(["p", "q"], ["ok", "fine"]).tolist() == [2.0, 4.0]

        return (lambda: rm.score(["p"] * len(responses), responses)), check

    return build


# ---- models on disk ------------------------------------------------------------------------------------

def _load(path_fn: Callable[[Ctx], Path]) -> Callable[[Ctx], tuple]:
    from rlhf_envs.lm.loading import load_causal_lm

    return just(lambda ctx: load_causal_lm(path_fn(ctx)))


def _with_config(name: str, edit: Callable[[dict], dict] | None, drop: tuple[str, ...] = ()) -> Callable[[Ctx], tuple]:
    def build(ctx: Ctx) -> tuple:
        from rlhf_envs.lm.loading import load_causal_lm

        path = ctx.model_copy(name, drop=drop, config=edit)
        return (lambda: load_causal_lm(path)), lambda: None

    return build


def _dropped(name: str, *files: str) -> Callable[[Ctx], tuple]:
    return _with_config(name, None, drop=files)


def _bert(raw: dict) -> dict:
    from transformers import BertConfig

    return {**BertConfig(vocab_size=258, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8).to_dict(), "architectures": ["BertForMaskedLM"]}


def _t5(raw: dict) -> dict:
    from transformers import T5Config

    return {**T5Config(vocab_size=258, d_model=8, num_layers=1, num_heads=2, d_ff=8).to_dict(),
            "architectures": ["T5ForConditionalGeneration"]}


def _small_vocab(ctx: Ctx) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    path = ctx.tmp / "small-vocab"
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_layer=1, n_embd=8, n_head=2, n_positions=16)).save_pretrained(path)
    ctx.lm[1].save_pretrained(path)
    return path


def small_vocab_case(ctx: Ctx) -> tuple:
    from rlhf_envs.lm.loading import load_causal_lm

    path = _small_vocab(ctx)
    return (lambda: load_causal_lm(path)), lambda: None


# ---- the CLI ------------------------------------------------------------------------------------------

class CLIExit(Exception):
    """``rlhf`` exited non-zero; the message is ``exit <code>: <stderr>``."""


def _cli(argv: list[str]) -> None:
    from agents.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse rejects a value it cannot parse with exit status 2
            code = exc.code
    text = err.getvalue()
    assert "Traceback" not in text, text
    if code:
        raise CLIExit(f"exit {code}: {text.strip()}")


def cli(*argv: str, data: str | None = None) -> Callable[[Ctx], tuple]:
    """``rlhf argv...``; ``{out}``, ``{data}`` and ``{model}`` are filled in from the context."""

    def build(ctx: Ctx) -> tuple:
        data_path = ctx.file("data.jsonl", data) if data is not None else ctx.tmp / "missing.jsonl"
        args = [a.format(out=ctx.tmp / "out", data=data_path, model=ctx.saved) for a in argv]
        return (lambda: _cli(args)), lambda: None

    return build


# ---- configs ---------------------------------------------------------------------------------------------

def config(cls_path: str, **kwargs: Any) -> Callable[[Ctx], tuple]:
    def make(ctx: Ctx) -> Any:
        import importlib

        module, name = cls_path.split(":")
        return getattr(importlib.import_module(module), name)(**kwargs)

    return just(make)


def jsonl(reader: Callable[[Path], Any], data: bytes | str) -> Callable[[Ctx], tuple]:
    def build(ctx: Ctx) -> tuple:
        path = ctx.file("data.jsonl", data)
        return (lambda: reader(path)), lambda: None

    return build


# ---- the table -------------------------------------------------------------------------------------------

def row(id: str, build: Callable[[Ctx], tuple], exc: type[BaseException], match: str):
    return pytest.param(build, exc, match, id=id)


ROWS = [
    # CatGrid, one env (the drunk map: its RNG must not move on a rejected action)
    row("catgrid-action-wrong-type", env_case(catgrid, lambda e: e.step("left"), play_catgrid), InvalidAction,
        r"action must be one integer in \[0, 3\] \(0 left, 1 down, 2 right, 3 up\), got 'left'"),
    row("catgrid-action-wrong-shape", env_case(catgrid, lambda e: e.step(np.array([1, 2])), play_catgrid),
        InvalidAction,
        r"action must be one integer in \[0, 3\].*got array\(\[1, 2\]\)"),
    row("catgrid-action-wrong-dtype", env_case(catgrid, lambda e: e.step(1.0), play_catgrid), InvalidAction,
        r"action must be one integer in \[0, 3\].*got 1\.0"),
    row("catgrid-action-out-of-range", env_case(catgrid, lambda e: e.step(4), play_catgrid), InvalidAction,
        r"action 4 is out of range: expected 0 left, 1 down, 2 right or 3 up"),
    row("catgrid-action-negative", env_case(catgrid, lambda e: e.step(np.int64(-1)), play_catgrid), InvalidAction,
        r"action -1 is out of range: expected 0 left"),
    row("catgrid-step-after-episode-ended",
        env_case(catgrid_sober, lambda e: e.step(0), after_reset(play_catgrid), prepare=_reach_meat), ResetNeeded,
        r"step\(\) called on a finished episode \(or before the first reset\): call reset\(\) first"),
    row("catgrid-unknown-map-name", just(lambda ctx: gym.make("CatGrid-v0", map_name="5x5")), ValueError,
        r"unknown map_name '5x5'; built-in maps: \['4x4', '8x8'\]"),
    row("catgrid-slip-out-of-range", just(lambda ctx: gym.make("CatGrid-v0", slip=1.5)), ValueError,
        r"slip must be a probability in \[0, 1\], got 1\.5"),
    row("catgrid-ragged-map", just(lambda ctx: gym.make("CatGrid-v0", desc=["C.", "M"])), ValueError,
        r"map rows are ragged \(lengths \[2, 1\]\): every row needs the same length"),
    row("catgrid-map-without-start", just(lambda ctx: gym.make("CatGrid-v0", desc=["..", ".M"])), ValueError,
        r"map needs exactly one start cell 'C', found 0"),
    row("catgrid-render-mode-unknown", just(lambda ctx: gym.make("CatGrid-v0", render_mode="svg")), ValueError,
        r"render_mode must be one of \['ansi', 'rgb_array'\] or None, got 'svg'"),
    # CatGrid, natively batched
    row("catgrid-vec-actions-wrong-shape", env_case(catgrid_vec, lambda e: e.step(np.zeros(3, dtype=int)),
                                                    play_catgrid_vec),
        InvalidAction, r"actions must be 4 integers in \[0, 3\] \(shape \(4,\)\), got shape \(3,\)"),
    row("catgrid-vec-actions-wrong-dtype", env_case(catgrid_vec, lambda e: e.step(np.zeros(4)), play_catgrid_vec),
        InvalidAction, r"actions must be 4 integers in \[0, 3\].*dtype float64"),
    row("catgrid-vec-actions-wrong-type", env_case(catgrid_vec, lambda e: e.step("up"), play_catgrid_vec),
        InvalidAction, r"actions must be 4 integers in \[0, 3\].*got shape \(\)"),
    row("catgrid-vec-actions-out-of-range", env_case(catgrid_vec, lambda e: e.step(np.array([0, 1, 7, -2])),
                                                     play_catgrid_vec),
        InvalidAction, r"actions out of range: got values \[-2, 7\], expected 0\.\.3"),
    row("catgrid-vec-num-envs-0", just(lambda ctx: gym.make_vec("CatGrid-v0", num_envs=0)), ValueError,
        r"num_envs must be a positive integer, got 0"),
    # Env ids and keyword arguments
    row("env-unknown-id", just(lambda ctx: gym.make("TextBandits-v0")), NameNotFound,
        r"Environment `TextBandits` doesn't exist\. Did you mean: `TextBandit`\?"),
    row("env-unknown-version", just(lambda ctx: gym.make("CatGrid-v9")), VersionNotFound,
        r"version `v9` for environment `CatGrid` doesn't exist\. It provides versioned environments: \[ `v0` \]"),
    row("env-unknown-kwarg-catgrid", just(lambda ctx: gym.make("CatGrid-v0", slipp=0.1)), TypeError,
        r"unexpected keyword argument 'slipp'"),
    row("env-unknown-kwarg-catgrid-vec", just(lambda ctx: gym.make_vec("CatGrid-v0", num_envs=2, slipp=0.1)), TypeError,
        r"unexpected keyword argument 'slipp'"),
    row("env-unknown-kwarg-textbandit", just(lambda ctx: bandit(ctx, betta=0.1)), TypeError,
        r"unexpected keyword argument 'betta'"),
    row("env-unknown-kwarg-texttoken-vec", just(lambda ctx: token_vec(ctx, betta=0.1)), TypeError,
        r"TextToken-v0 got unknown keyword arguments \['betta'\]; accepted: .*'beta'"),
    # TextBandit, one env
    row("textbandit-action-wrong-shape", env_case(bandit, lambda e: e.step(VALID_RESPONSE[:5]), play_bandit),
        InvalidAction,
        r"action must have shape \(6,\) \(token ids, EOS then padding\), got shape \(5,\)"),
    row("textbandit-action-wrong-dtype", env_case(bandit, lambda e: e.step(VALID_RESPONSE.astype(float)), play_bandit),
        InvalidAction, r"action must be integer token ids, got dtype float64"),
    row("textbandit-action-wrong-type", env_case(bandit, lambda e: e.step("a nice reply"), play_bandit), InvalidAction,
        r"action must have shape \(6,\).*got shape \(\)"),
    row("textbandit-action-out-of-range", env_case(bandit, lambda e: e.step(np.array([97, 300, EOS, 0, 0, -1])),
                                                   play_bandit),
        InvalidAction, r"action has token ids out of range: \[-1, 300\]; expected 0\.\.257"),
    row("textbandit-step-after-episode-ended",
        env_case(bandit, lambda e: e.step(VALID_RESPONSE), after_reset(play_bandit),
                 prepare=lambda e: e.step(VALID_RESPONSE)),
        ResetNeeded, r"TextBandit episodes are one step long: call reset\(\) before step\(\)"),
    row("textbandit-logprobs-wrong-shape",
        env_case(bandit, lambda e: e.unwrapped.set_policy_logprobs(np.zeros(5, np.float32)), play_bandit), ValueError,
        r"logprobs must have shape \(6,\), got \(5,\)"),
    row("textbandit-logprobs-positive",
        env_case(bandit, lambda e: e.unwrapped.set_policy_logprobs(np.full(T, 0.5, np.float32)), play_bandit),
        ValueError,
        r"logprobs must be log-probabilities \(<= 0, not NaN\)"),
    row("textbandit-prompt-index-out-of-range",
        env_case(bandit, lambda e: e.reset(options={"prompt_index": 7}), play_bandit), ValueError,
        r"options\['prompt_index'\] must be an int in \[0, 3\), got 7"),
    row("textbandit-plugin-raises", bandit_with_plugin("raise"), RewardModelError,
        r"reward model 'Flaky' raised KeyError: 'tokenizer lost its vocabulary'"),
    row("textbandit-plugin-returns-nan", bandit_with_plugin("nan"), RewardModelError,
        r"reward model 'Flaky' returned non-finite scores \(NaN/inf\) at rows \[0\].*scores must be finite"),
    row("textbandit-unknown-reward-plugin", just(lambda ctx: bandit(ctx, reward_model="sentimental")), ValueError,
        r"unknown reward model 'sentimental'; known: \[.*'learned'.*'sentiment'.*\]"),
    row("textbandit-unknown-kl-estimator", just(lambda ctx: bandit(ctx, kl_estimator="k4")), ValueError,
        r"unknown kl_estimator 'k4'; choose one of \['exact', 'k1', 'k2', 'k3'\]"),
    row("textbandit-negative-beta", just(lambda ctx: bandit(ctx, beta=-0.1, kl_setpoint=None)), ValueError,
        r"kl_coef \(beta\) must be >= 0, got -0\.1"),
    row("textbandit-top-p-0", just(lambda ctx: bandit(ctx, top_p=0.0)), ValueError,
        r"top_p must be in \(0, 1\] \(1\.0 = off\), got 0\.0"),
    row("textbandit-prompt-longer-than-context", just(lambda ctx: bandit(ctx, prompts=["x" * 70])), ValueError,
        r"max_prompt_tokens=70 \+ max_new_tokens=6 exceeds the model's context of 64 tokens; shorten the prompts"),
    row("textbandit-prompt-longer-than-max-prompt-tokens", just(lambda ctx: bandit(ctx, max_prompt_tokens=4)),
        ValueError,
        r"prompt 0 \('hello there'\.\.\.\) has 11 tokens > max_prompt_tokens=4.*raise max_prompt_tokens"),
    row("textbandit-no-prompts", just(lambda ctx: bandit(ctx, prompts=[])), ValueError,
        r"prompts must be a non-empty list of strings"),
    row("textbandit-model-dir-missing", just(lambda ctx: bandit(ctx, model=str(ctx.tmp / "nope"))), FileNotFoundError,
        r"Model directory '.*nope' does not exist\..*Pass a local Hugging Face model directory"),
    row("textbandit-model-wrong-type", just(lambda ctx: bandit(ctx, model=42)), TypeError,
        r"model must be None \(the embedded default\), a path .* or a \(model, tokenizer\) pair, got int"),
    # TextBandit, natively batched
    row("textbandit-vec-actions-wrong-shape",
        env_case(bandit_vec, lambda e: e.step(np.tile(VALID_RESPONSE, (3, 1))), play_bandit_vec), InvalidAction,
        r"actions must have shape \(4, 6\) \(token ids, EOS then padding\), got shape \(3, 6\)"),
    row("textbandit-vec-actions-out-of-range",
        env_case(bandit_vec, lambda e: e.step(np.full((4, T), V)), play_bandit_vec), InvalidAction,
        r"actions has token ids out of range: \[258\]; expected 0\.\.257"),
    row("textbandit-vec-step-before-reset", just(lambda ctx: bandit_vec(ctx).step(np.tile(VALID_RESPONSE, (4, 1)))),
        ResetNeeded, r"call reset\(\) before step\(\)"),
    row("textbandit-vec-logprobs-wrong-shape",
        env_case(bandit_vec, lambda e: e.set_policy_logprobs(np.zeros((4, 5), np.float32)), play_bandit_vec),
        ValueError,
        r"logprobs must have shape \(4, 6\), got \(4, 5\)"),
    row("textbandit-vec-logprobs-minus-inf-on-sampled-token",
        env_case(bandit_vec, lambda e: (e.set_policy_logprobs(np.full((4, T), -np.inf, np.float32)),
                                         e.step(np.tile(VALID_RESPONSE, (4, 1)))),
                 lambda e: (e.set_policy_logprobs(np.full((4, T), -1.0, np.float32)), play_bandit_vec(e))[1]),
        ValueError, r"handed-over logprobs are -inf inside the response \(rows \[0, 1, 2, 3\]\).*hand over the "
                    r"log-probs"),
    row("textbandit-vec-exact-kl-without-full-logprobs",
        env_case(lambda ctx: bandit_vec(ctx, kl_estimator="exact"),
                 lambda e: e.set_policy_logprobs(np.zeros((4, T), np.float32)), play_bandit_vec), ValueError,
        r"kl_estimator='exact' needs full_logprobs \[\.\.\., T, V\] too"),
    row("textbandit-vec-plugin-hangs-past-timeout", bandit_with_plugin("hang", vector=True, timeout=0.3),
        RewardModelError,
        r"reward model 'Flaky' took longer than timeout_s=0\.3 s for 4 responses; raise timeout_s"),
    row("textbandit-vec-num-envs-0", just(lambda ctx: bandit_vec(ctx, num_envs=0)), ValueError,
        r"num_envs must be a positive integer, got 0"),
    # TextToken, one env
    row("texttoken-action-wrong-dtype", env_case(token, lambda e: e.step(97.0), play_token), InvalidAction,
        r"action must be integer token ids, got dtype float64"),
    row("texttoken-action-wrong-type", env_case(token, lambda e: e.step("a"), play_token), InvalidAction,
        r"action must be integer token ids, got dtype <U1"),
    row("texttoken-action-wrong-shape", env_case(token, lambda e: e.step(np.array([97, 98])), play_token),
        InvalidAction,
        r"action must be one token id \(Discrete\), got shape \(2,\)"),
    row("texttoken-action-out-of-range", env_case(token, lambda e: e.step(V), play_token), InvalidAction,
        r"action has token ids out of range: \[258\]; expected 0\.\.257"),
    row("texttoken-step-after-episode-ended",
        env_case(token, lambda e: e.step(97), after_reset(play_token), prepare=lambda e: e.step(EOS)), ResetNeeded,
        r"the episode has ended: call reset\(\) before step\(\)"),
    row("texttoken-logprobs-not-a-distribution",
        env_case(token, lambda e: e.unwrapped.set_policy_logprobs(np.full(V, -1.0, np.float32)), play_token),
        ValueError,
        r"logprobs must be a full log-distribution over the vocabulary \(exp sums to 1 per row\)"),
    row("texttoken-logprobs-minus-inf-on-sampled-token",
        env_case(token, lambda e: (e.unwrapped.set_policy_logprobs(np.where(np.arange(V) == 98, 0.0,
                                                                            -np.inf).astype(np.float32)),
                                   e.step(97)),
                 lambda e: (e.unwrapped.set_policy_logprobs(np.full(V, -np.log(V), np.float32)), play_token(e))[1]),
        ValueError, r"gives -inf to the chosen token in rows \[0\].*hand over the distribution you sampled from"),
    row("texttoken-max-new-tokens-0", just(lambda ctx: gym.make("TextToken-v0", model=ctx.lm, prompts=PROMPTS,
                                                                max_new_tokens=0)),
        ValueError, r"max_new_tokens must be a positive int, got 0"),
    row("texttoken-temperature-0", just(lambda ctx: token(ctx, temperature=0.0)), ValueError,
        r"temperature must be a finite number > 0, got 0\.0; use greedy=True"),
    row("texttoken-top-k-negative", just(lambda ctx: token(ctx, top_k=-1)), ValueError,
        r"top_k must be an int >= 0 \(0 = off\), got -1"),
    row("texttoken-prompt-longer-than-context", just(lambda ctx: token(ctx, prompts=["y" * 60])), ValueError,
        r"max_prompt_tokens=60 \+ max_new_tokens=6 exceeds the model's context of 64 tokens"),
    row("texttoken-unknown-reward-plugin", just(lambda ctx: token(ctx, reward_model="gold")), ValueError,
        r"unknown reward model 'gold'; known: \[.*'sentiment'.*\]"),
    # TextToken, natively batched
    row("texttoken-vec-actions-wrong-shape", env_case(token_vec, lambda e: e.step(np.array([97, 97, 97])),
                                                      play_token_vec),
        InvalidAction, r"actions must have shape \(4,\) \(token ids, EOS then padding\), got shape \(3,\)"),
    row("texttoken-vec-actions-wrong-dtype", env_case(token_vec, lambda e: e.step(np.full(4, 97.0)), play_token_vec),
        InvalidAction, r"actions must be integer token ids, got dtype float64"),
    row("texttoken-vec-actions-out-of-range", env_case(token_vec, lambda e: e.step(np.array([97, -3, 97, 999])),
                                                       play_token_vec),
        InvalidAction, r"actions has token ids out of range: \[-3, 999\]; expected 0\.\.257"),
    row("texttoken-vec-step-before-reset", just(lambda ctx: token_vec(ctx).step(np.full(4, 97))), ResetNeeded,
        r"call reset\(\) before step\(\)"),
    row("texttoken-vec-logprobs-wrong-shape",
        env_case(token_vec, lambda e: e.set_policy_logprobs(np.zeros((4, 10), np.float32)), play_token_vec), ValueError,
        r"logprobs must have shape \(4, 258\), got \(4, 10\)"),
    # Reward plugins behind make_reward_model(..., timeout_s=...)
    row("reward-unknown-plugin", just(lambda ctx: make_reward_model("sentimnet", timeout_s=1.0)), ValueError,
        r"unknown reward model 'sentimnet'; known: \[.*'sentiment'.*\]\. Register one with "
        r"rlhf_envs\.rewards\.register"),
    row("reward-plugin-raises", plugin_case(["boom"]), RewardModelError,
        r"reward model 'bad-input-toy' raised ZeroDivisionError: division by zero"),
    row("reward-plugin-hangs-past-timeout", plugin_case(["hang"], timeout_s=0.2), RewardModelError,
        r"reward model 'bad-input-toy' took longer than timeout_s=0\.2 s for 1 responses; raise timeout_s or make it "
        r"faster"),
    row("reward-plugin-returns-nan", plugin_case(["nan", "x"]), RewardModelError,
        r"reward model 'bad-input-toy' returned non-finite scores \(NaN/inf\) at rows \[1\].*scores must be finite"),
    row("reward-plugin-returns-inf", plugin_case(["inf", "x"]), RewardModelError,
        r"reward model 'bad-input-toy' returned non-finite scores \(NaN/inf\) at rows \[0\] \(values \[-inf\]\)"),
    row("reward-plugin-returns-wrong-length", plugin_case(["short", "x"]), RewardModelError,
        r"reward model 'bad-input-toy' returned shape \(1,\) for 2 responses; expected one score per response, shape "
        r"\(2,\)"),
    row("reward-plugin-returns-strings", plugin_case(["words", "x"]), RewardModelError,
        r"reward model 'bad-input-toy' returned list, not numbers"),
    row("reward-timeout-not-positive", just(lambda ctx: make_reward_model(count_a, timeout_s=0)), ValueError,
        r"timeout_s must be > 0 seconds or None, got 0"),
    row("reward-kwargs-for-a-callable", just(lambda ctx: make_reward_model(count_a, path="x")), TypeError,
        r"keyword arguments \['path'\] only apply to a reward model given by name"),
    row("reward-learned-missing-dir", just(lambda ctx: make_reward_model("learned", path=str(ctx.tmp / "rm"))),
        FileNotFoundError, r"learned reward model: '.*rm' is not a directory; pass path= a checkpoint"),
    # JSONL readers
    row("jsonl-malformed", jsonl(read_sft, '{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n'), DataError,
        r"data\.jsonl:2: malformed JSON \(Expecting property name enclosed in double quotes at column 16\)"),
    row("jsonl-empty", jsonl(read_preferences, "\n\n"), DataError,
        r"data\.jsonl: the dataset is empty: write one JSON object per line with fields prompt, chosen, rejected"),
    row("jsonl-mis-encoded", jsonl(read_prompts, '{"prompt": "caf\u00e9"}\n'.encode("latin-1")), DataError,
        r"data\.jsonl:1: invalid UTF-8 at byte 15 of the line: save the file as UTF-8"),
    row("jsonl-utf16", jsonl(read_prompts, '{"prompt": "hi"}\n'.encode("utf-16")), DataError,
        r"data\.jsonl:1: invalid UTF-8 at byte 0 of the line: save the file as UTF-8"),
    row("jsonl-missing-field", jsonl(read_sft, '{"prompt": "a"}\n'), DataError,
        r"data\.jsonl:1: missing field 'completion' \(a line needs \['completion', 'prompt'\]\)"),
    row("jsonl-field-wrong-type", jsonl(read_preferences, '{"prompt": 1, "chosen": "a", "rejected": "b"}\n'), DataError,
        r"data\.jsonl:1: field 'prompt' must be a str, got int"),
    row("jsonl-not-an-object", jsonl(read_sft, '["prompt", "completion"]\n'), DataError,
        r"data\.jsonl:1: expected a JSON object, got list"),
    row("jsonl-ranking-k-1", jsonl(read_rankings, '{"prompt": "p", "responses": ["only"]}\n'), DataError,
        r"data\.jsonl:1: 'responses' has 1 entries, a ranking needs K >= 2"),
    row("jsonl-missing-file", just(lambda ctx: read_sft(ctx.tmp / "absent.jsonl")), DataError,
        r"absent\.jsonl: cannot read the dataset \(No such file or directory\)"),
    # Model directories (rlhf_envs.lm)
    row("model-dir-missing", _load(lambda ctx: ctx.tmp / "absent"), FileNotFoundError,
        r"Model directory '.*absent' does not exist\..*models are never downloaded"),
    row("model-dir-missing-config", _dropped("no-config", "config.json"), FileNotFoundError,
        r"has no config\.json, so it is not a Hugging Face model directory\. Save the model with"),
    row("model-dir-missing-weights", _dropped("no-weights", "model.safetensors"), FileNotFoundError,
        r"has config\.json but no weights \(expected one of \['model\.safetensors', .*\]\)"),
    row("model-dir-missing-tokenizer", _dropped("no-tokenizer", "tokenizer.json", "tokenizer_config.json"),
        FileNotFoundError, r"No tokenizer in '.*no-tokenizer' \(expected one of \['tokenizer\.json'"),
    row("model-dir-wrong-architecture-classifier",
        _with_config("classifier", lambda c: {**c, "architectures": ["GPT2ForSequenceClassification"]}), ValueError,
        r"architectures=\['GPT2ForSequenceClassification'\]\) is not a causal language model.*Pass a causal language "
        r"model"),
    row("model-dir-wrong-architecture-encoder-only", _with_config("bert", _bert), ValueError,
        r"model_type='bert'.*is not a causal language model.*Pass a causal language model such as GPT-2"),
    row("model-dir-wrong-architecture-encoder-decoder", _with_config("t5", _t5), ValueError,
        r"model_type='t5'.*is an encoder-decoder model; a decoder-only causal LM is needed"),
    row("model-dir-tokenizer-larger-than-embeddings", small_vocab_case, ValueError,
        r"has 258 tokens but the model embeds only 100\. Resize and save the model"),
    row("model-dir-remote-code", _with_config("remote", lambda c: {**c,
                                                                   "auto_map": {"AutoModelForCausalLM": "evil.Model"}}),
        ValueError, r"has auto_map .*evil\.Model.* pass trust_remote_code=True"),
    # Configs with impossible values
    row("config-ppo-num-envs-0", config("agents.ppo:PPOConfig", num_envs=0), ValueError,
        r"PPOConfig\.num_envs must be a positive integer, got 0"),
    row("config-ppo-gamma-above-1", config("agents.ppo:PPOConfig", gamma=1.5), ValueError,
        r"PPOConfig\.gamma must be in \[0, 1\], got 1\.5"),
    row("config-ppo-minibatches-do-not-divide", config("agents.ppo:PPOConfig", num_envs=3, num_steps=3,
                                                       num_minibatches=2),
        ValueError, r"num_envs \* num_steps = 9 is not divisible by num_minibatches = 2"),
    row("config-ppo-negative-max-approx-kl", config("agents.ppo:PPOConfig", max_approx_kl=-0.01), ValueError,
        r"PPOConfig\.max_approx_kl must be > 0 or None, got -0\.01"),
    row("config-lmppo-negative-beta", config("agents.lm_ppo:LMPPOConfig", beta=-0.1), ValueError,
        r"LMPPOConfig\.beta must be >= 0, got -0\.1; 0 turns the KL penalty off"),
    row("config-lmppo-batch-size-0", config("agents.lm_ppo:LMPPOConfig", batch_size=0), ValueError,
        r"LMPPOConfig\.batch_size must be a positive integer, got 0"),
    row("config-lmppo-top-p-above-1", config("agents.lm_ppo:LMPPOConfig", top_p=1.5), ValueError,
        r"top_p must be in \(0, 1\] \(1\.0 = off\), got 1\.5"),
    row("config-lmppo-top-p-0", config("agents.lm_ppo:LMPPOConfig", top_p=0.0), ValueError,
        r"top_p must be in \(0, 1\] \(1\.0 = off\), got 0\.0"),
    row("config-lmppo-learned-without-path", config("agents.lm_ppo:LMPPOConfig", reward_model="learned"), ValueError,
        r"reward_model='learned' needs reward_model_path="),
    row("config-sft-batch-size-0", config("agents.sft:SFTConfig", data_path="d.jsonl", batch_size=0), ValueError,
        r"SFTConfig\.batch_size must be a positive integer, got 0"),
    row("config-sft-no-data-path", config("agents.sft:SFTConfig"), ValueError,
        r"SFTConfig\.data_path is empty: give the path of a JSONL file"),
    row("config-sft-negative-learning-rate", config("agents.sft:SFTConfig", data_path="d.jsonl", learning_rate=-1e-4),
        ValueError, r"SFTConfig\.learning_rate must be > 0, got -0\.0001"),
    row("config-dpo-negative-beta", config("agents.dpo:DPOConfig", data_path="d.jsonl", beta=-0.1), ValueError,
        r"DPOConfig\.beta must be > 0, got -0\.1"),
    row("config-dpo-unknown-loss", config("agents.dpo:DPOConfig", data_path="d.jsonl", loss_type="kto"), ValueError,
        r"DPOConfig\.loss_type must be one of \['cdpo', 'ipo', 'sigmoid'\], got 'kto'"),
    row("config-dpo-cdpo-without-label-smoothing", config("agents.dpo:DPOConfig", data_path="d.jsonl",
                                                          loss_type="cdpo"),
        ValueError, r"DPOConfig\.label_smoothing must be in \(0, 0\.5\) for loss_type='cdpo', got 0\.0"),
    row("config-rm-batch-size-0", config("agents.reward_model:RewardModelConfig", data_path="d.jsonl", batch_size=0),
        ValueError, r"RewardModelConfig\.batch_size must be a positive integer, got 0"),
    row("config-rm-eval-fraction-1", config("agents.reward_model:RewardModelConfig", data_path="d.jsonl",
                                            eval_fraction=1.0),
        ValueError, r"RewardModelConfig\.eval_fraction must be in \[0, 1\), got 1\.0"),
    row("config-pipeline-ppo-batch-size-0", config("agents.pipeline:PipelineConfig", ppo_batch_size=0), ValueError,
        r"PipelineConfig\.ppo_batch_size must be a positive integer, got 0"),
    row("config-pipeline-negative-beta", config("agents.pipeline:PipelineConfig", ppo_beta=-0.1), ValueError,
        r"PipelineConfig: LMPPOConfig\.beta must be >= 0, got -0\.1"),
    row("config-pipeline-negative-dpo-beta", config("agents.pipeline:PipelineConfig", dpo_beta=-1.0), ValueError,
        r"PipelineConfig: DPOConfig\.beta must be > 0, got -1\.0"),
    row("config-pipeline-ppo-batch-not-divisible", config("agents.pipeline:PipelineConfig", ppo_batch_size=30),
        ValueError,
        r"PipelineConfig: batch_size 30 is not divisible by num_minibatches 4"),
    row("config-pipeline-k-responses-1", config("agents.pipeline:PipelineConfig", k_responses=1), ValueError,
        r"PipelineConfig\.k_responses must be >= 2"),
    row("config-pipeline-negative-ppo-snapshots", config("agents.pipeline:PipelineConfig", ppo_snapshots=-1),
        ValueError,
        r"PipelineConfig\.ppo_snapshots must be an integer >= 0, got -1"),
    row("config-sampling-top-p-0", config("rlhf_envs.lm.sampling:SamplingConfig", top_p=0.0), ValueError,
        r"top_p must be in \(0, 1\] \(1\.0 = off\), got 0\.0"),
    row("config-sampling-top-p-above-1", config("rlhf_envs.lm.sampling:SamplingConfig", top_p=1.01), ValueError,
        r"top_p must be in \(0, 1\] \(1\.0 = off\), got 1\.01"),
    row("config-sampling-negative-temperature", config("rlhf_envs.lm.sampling:SamplingConfig", temperature=-1.0),
        ValueError,
        r"temperature must be a finite number > 0, got -1\.0"),
    row("config-sampling-max-new-tokens-0", config("rlhf_envs.lm.sampling:SamplingConfig", max_new_tokens=0),
        ValueError,
        r"max_new_tokens must be a positive int, got 0; pass e\.g\. 48"),
    # The CLI: exit status 2, "rlhf <cmd>: error: ...", no traceback, nothing written
    row("cli-sft-batch-size-0", cli("sft", "--data-path", "{data}", "--output-dir", "{out}", "--batch-size", "0"),
        CLIExit, r"^exit 2: rlhf sft: error: SFTConfig\.batch_size must be a positive integer, got 0$"),
    row("cli-sft-malformed-jsonl",
        cli("sft", "--data-path", "{data}", "--model-path", "{model}", "--output-dir", "{out}", "--no-progress",
            data="{oops\n"),
        CLIExit, r"^exit 2: rlhf sft: error: .*data\.jsonl:1: malformed JSON"),
    row("cli-sft-missing-data-file",
        cli("sft", "--data-path", "{data}", "--model-path", "{model}", "--output-dir", "{out}", "--no-progress"),
        CLIExit, r"^exit 2: rlhf sft: error: .*missing\.jsonl: cannot read the dataset"),
    row("cli-rm-model-dir-missing",
        cli("rm", "--data-path", "{data}", "--model-path", "{out}", "--output-dir", "{out}", "--no-progress",
            data='{"prompt": "p", "chosen": "a", "rejected": "b"}\n'),
        CLIExit, r"^exit 2: rlhf rm: error: Model directory '.*out' does not exist"),
    row("cli-dpo-negative-beta", cli("dpo", "--data-path", "{data}", "--output-dir", "{out}", "--beta", "-0.1"),
        CLIExit, r"^exit 2: rlhf dpo: error: DPOConfig\.beta must be > 0, got -0\.1$"),
    row("cli-dpo-beta-not-a-number", cli("dpo", "--data-path", "{data}", "--output-dir", "{out}", "--beta", "high"),
        CLIExit, r"(?s)^exit 2: usage: rlhf dpo .*\nrlhf dpo: error: argument --beta: invalid float value: 'high'$"),
    row("cli-ppo-negative-beta", cli("ppo", "--output-dir", "{out}", "--beta", "-1"),
        CLIExit, r"^exit 2: rlhf ppo: error: LMPPOConfig\.beta must be >= 0, got -1\.0"),
    row("cli-ppo-top-p-above-1", cli("ppo", "--output-dir", "{out}", "--top-p", "1.5"),
        CLIExit, r"^exit 2: rlhf ppo: error: top_p must be in \(0, 1\]"),
    row("cli-ppo-batch-size-0", cli("ppo", "--output-dir", "{out}", "--batch-size", "0"),
        CLIExit, r"^exit 2: rlhf ppo: error: LMPPOConfig\.batch_size must be a positive integer, got 0$"),
    row("cli-pipeline-negative-beta", cli("pipeline", "--output-dir", "{out}", "--ppo-beta", "-0.5"),
        CLIExit, r"^exit 2: rlhf pipeline: error: PipelineConfig: LMPPOConfig\.beta must be >= 0, got -0\.5"),
    row("cli-catgrid-num-envs-0", cli("catgrid", "--out", "{out}", "--num-envs", "0"),
        CLIExit, r"^exit 2: rlhf catgrid: error: PPOConfig\.num_envs must be a positive integer, got 0$"),
    row("cli-eval-model-without-name", cli("eval", "--model", "{model}", "--out", "{out}"),
        CLIExit, r"^exit 2: rlhf eval: error: --model takes NAME=PATH \(e\.g\. sft=runs/pipeline/sft\), got '.*tiny'$"),
]


# ---- issue 22: KL hand-overs, non-finite and mistyped settings, and the CLI cases ---------------------------

UNIFORM = float(-np.log(V))


def token_vec_with_plugin(ctx: Ctx) -> tuple:
    """A TextToken vector env whose reward plugin fails once, on a step that ends two episodes; its twin's never fails.
    Nothing may change: the same step then succeeds, and both envs play on alike."""
    hit, control = token_vec(ctx, reward_model=Flaky("raise")), token_vec(ctx)
    for env in (hit, control):
        env.reset(seed=3)
        env.step(np.array([97, 98, 97, 98]))
    ending = np.array([EOS, 97, EOS, 97])

    def check() -> None:
        assert _same([hit.step(ending), *play_token_vec(hit)], [control.step(ending), *play_token_vec(control)])

    return (lambda: hit.step(ending)), check


def with_run_folder(*argv: str) -> Callable[[Ctx], tuple]:
    """``rlhf argv...`` into ``{out}``, a folder that already holds a run (a config.json)."""

    def build(ctx: Ctx) -> tuple:
        (ctx.tmp / "out").mkdir()
        (ctx.tmp / "out" / "config.json").write_text("{}")
        return cli(*argv)(ctx)

    return build


def frozen_sb3_policy(ctx: Ctx) -> Any:
    import copy

    from stable_baselines3 import PPO

    from agents.sb3_text import LMActorCriticPolicy

    env = token(ctx)
    task = env.unwrapped.task
    return PPO(LMActorCriticPolicy, env, device="cpu", policy_kwargs=dict(
        lm=copy.deepcopy(task.ref_model), pad_token_id=task.pad_token_id, sampling=task.sampling))


def _exact_handover(logprobs: float, full: float) -> Callable[[Any], Any]:
    return lambda e: (e.unwrapped.set_policy_logprobs(np.full(T, logprobs, np.float32), np.full((T, V), full,
                                                                                                np.float32)),
                      e.step(VALID_RESPONSE))


def play_bandit_exact(e):
    e.unwrapped.set_policy_logprobs(np.full(T, UNIFORM, np.float32), np.full((T, V), UNIFORM, np.float32))
    return play_bandit(e)

ROWS += [
    row("textbandit-k3-top-p-without-full-logprobs",
        env_case(lambda ctx: bandit_vec(ctx, kl_estimator="k3", top_p=0.9),
                 lambda e: e.set_policy_logprobs(np.full((4, T), -1.0, np.float32)), play_bandit_vec), ValueError,
        r"kl_estimator='k3' needs full_logprobs \[\.\.\., T, V\] too \(under top_k=0, top_p=0\.9 k3 needs the "
        r"reference's mass on the tokens the policy kept, else it reads too low\)"),
    row("textbandit-full-logprobs-mass-0.1",
        env_case(lambda ctx: bandit(ctx, kl_estimator="exact"), _exact_handover(UNIFORM + np.log(0.1),
                                                                                UNIFORM + np.log(0.1)),
                 play_bandit_exact), ValueError,
        r"full_logprobs must be a full log-distribution over the vocabulary \(exp sums to 1 per row\) at every "
        r"response token; at index \[0, 0\] the total mass is 0\.1"),
    row("textbandit-full-logprobs-all-zero",
        env_case(lambda ctx: bandit(ctx, kl_estimator="exact"), _exact_handover(0.0, 0.0), play_bandit_exact),
        ValueError,
        r"full_logprobs must be a full log-distribution .* the total mass is 258"),
    row("textbandit-logprobs-disagree-with-full",
        env_case(lambda ctx: bandit(ctx, kl_estimator="exact"), _exact_handover(-1.0, UNIFORM), play_bandit_exact),
        ValueError, r"logprobs disagree with full_logprobs at the sampled token \(index \[0, 0\]: -1 vs -5\.553\)"),
    row("textbandit-kl-estimator-k2", just(lambda ctx: bandit(ctx, kl_estimator="k2")), ValueError,
        r"kl_estimator='k2' \(0\.5 \* log-ratio \*\* 2\) does not estimate the KL.*Pick 'k1', 'k3' or 'exact'"),
    row("textbandit-prompts-a-str", just(lambda ctx: bandit(ctx, prompts="The pasta was")), TypeError,
        r"prompts must be a list of strings, got a single str 'The pasta was'; wrap it in a list: prompts=\['The "
        r"pasta was'\]"),
    row("textbandit-beta-inf", just(lambda ctx: bandit(ctx, beta=float("inf"))), ValueError,
        r"^beta must be a finite number, got inf; pass a finite value$"),
    row("textbandit-beta-nan", just(lambda ctx: bandit_vec(ctx, beta=float("nan"))), ValueError,
        r"^beta must be a finite number, got nan"),
    row("textbandit-beta-a-str", just(lambda ctx: bandit(ctx, beta="0.1")), TypeError,
        r"^beta must be a finite number, got str '0\.1'; pass beta=0\.1, not a string"),
    row("texttoken-kl-setpoint-inf", just(lambda ctx: token(ctx, kl_setpoint=float("inf"))), ValueError,
        r"^kl_setpoint must be a finite number or None, got inf"),
    row("texttoken-temperature-nan", just(lambda ctx: token(ctx, temperature=float("nan"))), ValueError,
        r"^SamplingConfig\.temperature must be a finite number, got nan"),
    row("texttoken-top-p-a-str", just(lambda ctx: token(ctx, top_p="0.9")), TypeError,
        r"^SamplingConfig\.top_p must be a finite number, got str '0\.9'; pass top_p=0\.9"),
    row("texttoken-vec-plugin-fails-at-episode-end", token_vec_with_plugin, RewardModelError,
        r"reward model 'Flaky' raised KeyError"),
    row("sb3-text-policy-with-a-frozen-lm", just(frozen_sb3_policy), ValueError,
        r"of the LM's \d+ parameter tensors have requires_grad=False .* PPO would train only the value head"),
    row("config-lmppo-beta-a-str", config("agents.lm_ppo:LMPPOConfig", beta="0.1"), TypeError,
        r"^LMPPOConfig\.beta must be a finite number, got str '0\.1'; pass beta=0\.1, not a string$"),
    row("config-lmppo-ptx-coef-nan", config("agents.lm_ppo:LMPPOConfig", ptx_coef=float("nan")), ValueError,
        r"^LMPPOConfig\.ptx_coef must be a finite number, got nan"),
    row("config-lmppo-prompts-a-str", config("agents.lm_ppo:LMPPOConfig", prompts="The pasta was"), TypeError,
        r"LMPPOConfig\.prompts must be a list of strings or None, got a single str 'The pasta was'"),
    row("config-lmppo-kl-estimator-k2", config("agents.lm_ppo:LMPPOConfig", kl_estimator="k2"), ValueError,
        r"kl_estimator='k2' .* does not estimate the KL"),
    row("config-ppo-learning-rate-inf", config("agents.ppo:PPOConfig", learning_rate=float("inf")), ValueError,
        r"^PPOConfig\.learning_rate must be a finite number, got inf"),
    row("config-ppo-num-envs-a-float", config("agents.ppo:PPOConfig", num_envs=4.0), TypeError,
        r"^PPOConfig\.num_envs must be an integer, got float 4\.0"),
    row("config-sft-learning-rate-nan", config("agents.sft:SFTConfig", data_path="d.jsonl", learning_rate=float("nan")),
        ValueError, r"^SFTConfig\.learning_rate must be a finite number, got nan"),
    row("config-dpo-beta-inf", config("agents.dpo:DPOConfig", data_path="d.jsonl", beta=float("inf")), ValueError,
        r"^DPOConfig\.beta must be a finite number, got inf"),
    row("config-rm-weight-decay-nan", config("agents.reward_model:RewardModelConfig", data_path="d.jsonl",
                                             weight_decay=float("nan")), ValueError,
        r"^RewardModelConfig\.weight_decay must be a finite number, got nan"),
    row("config-pipeline-sft-learning-rate-inf", config("agents.pipeline:PipelineConfig",
                                                        sft_learning_rate=float("inf")),
        ValueError, r"^PipelineConfig\.sft_learning_rate must be a finite number, got inf"),
    row("config-eval-temperature-nan", config("agents.evaluate:EvalConfig", models={"sft": "x"},
                                              temperature=float("nan")),
        ValueError, r"^EvalConfig\.temperature must be a finite number, got nan"),
    row("config-sampling-top-k-a-str", config("rlhf_envs.lm.sampling:SamplingConfig", top_k="5"), TypeError,
        r"^SamplingConfig\.top_k must be an integer, got str '5'; pass top_k=5, not a string$"),
    row("config-build-lr-inf", config("rlhf_envs.lm.build_embedded:BuildConfig", lr=float("inf")), ValueError,
        r"^BuildConfig\.lr must be a finite number, got inf"),
    row("cli-ppo-ptx-coef-nan", cli("ppo", "--output-dir", "{out}", "--ptx-coef", "nan"),
        CLIExit, r"^exit 2: rlhf ppo: error: LMPPOConfig\.ptx_coef must be a finite number, got nan; pass a finite "
                 r"value$"),
    row("cli-ppo-output-dir-is-a-file", cli("ppo", "--output-dir", "{data}", data="not a folder"),
        CLIExit, r"^exit 2: rlhf ppo: error: --output-dir '.*data\.jsonl' is an existing file, not a folder; give a "
                 r"folder path$"),
    row("cli-ppo-rerun-into-a-finished-folder", with_run_folder("ppo", "--output-dir", "{out}"),
        CLIExit, r"^exit 2: rlhf ppo: error: --output-dir '.*out' already holds a run; pass --resume to continue it, "
                 r"--overwrite to replace it, or another folder$"),
    row("cli-catgrid-unknown-env-id", cli("catgrid", "--env-id", "Nope-v0", "--out", "{out}"),
        CLIExit, r"^exit 2: rlhf catgrid: error: --env-id 'Nope-v0' is not a registered Gymnasium id; the CatGrid ids "
                 r"are "
                 r"\['CatGrid-v0', 'CatGrid8x8-v0', 'CatGrid8x8Drunk-v0', 'CatGridDrunk-v0'\]$"),
]


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("build, exc, match", ROWS)
def test_bad_input(build, exc, match, lm, saved, tmp_path):
    ctx = Ctx(tmp_path, lm, saved)
    call, check = build(ctx)
    before = _files(tmp_path)
    with pytest.raises(exc, match=match):
        call()
    assert _files(tmp_path) == before, "files were written or changed by a rejected input"
    check()


@pytest.mark.parametrize("command", ["pipeline", "sft", "rm", "dpo", "ppo", "eval", "elo", "catgrid"])
def test_every_command_prints_its_help(command):
    """A ``%`` in an option's help once made ``rlhf pipeline --help`` crash inside argparse."""
    from agents.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = out.getvalue()
    assert text.startswith(f"usage: rlhf {command}") and "(default:" in text and "(default: %" not in text
