"""The environment logic shared by SpecKV-v0 (live) and SpecKVReplay-v0 (replay).

The environment never knows whether a step came from models or from a log: it talks to a
:class:`speckv_env.core.Backend`.

Render modes (both environments): ``"ansi"`` returns a one-line summary of the episode so far;
``"rgb_array"`` returns a picture of it (:func:`draw_episode`: per step, gamma drafted and
tokens accepted, as a bar chart drawn straight into a ``uint8`` array); ``"human"`` prints a
line per step as it happens (and the summary on ``render()``). What a frame needs is recorded
only in those two modes, so the default (``None``) costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .core import (
    DEFAULT_GAMMAS,
    DEFAULT_OBS_VERSION,
    Backend,
    DraftSignals,
    ObservationBuilder,
    StepOutcome,
    check_control,
    check_lookahead,
    check_obs_version,
    episode_summary,
    get_reward,
    obs_bounds,
)

OBS_VERSION_DOC = """    ## Observation versions (``obs_version``)
    ``obs_version=1`` (the default) observes the 13 values above (``speckv_env.core.OBS_SPEC``);
    ``obs_version=2`` adds five (``speckv_env.core.OBS_V2_FEATURES``, ``Box(18,)``; token mode 21):
    ``lookup_match`` (the context lookup's match length / 8, 0 = no match), ``lookup_agrees`` (its
    proposal equals the draft's top-1 token), ``target_top1`` and ``target_entropy`` (the target's
    distribution at the last verified position; 0 and 0 before the first verification) and
    ``sampling`` (1 = temperature > 0), all computed by ``speckv_env.core.pre_decision_features``
    in the live and the replay environments alike. Token mode shows the step start's values for
    every decision of the step. Version 2 needs the prompt's tokens and the target's signals: the
    live env and ``speckv-trace/2`` traces have them; version 1 traces and step logs do not (a
    clear error naming the file). Version 1 stays the default so that every data source and every
    agent saved before versions existed keep working; agents record the version they were
    trained on and refuse an env of another.
"""
"""The observation-version section of both environments' docstrings."""

TOKEN_MODE_DOC = """    ## Token mode (``control="token"``)
    One step is one decision of the field's per-token stopping rules: action ``Discrete(2)``,
    1 = draft one more token, 0 = stop and verify what is drafted (0 drafted = a plain target
    step). Drafting stops by force at ``max(gammas)`` and at the token budget (the step then
    verifies at once; 1 when nothing may be drafted verifies too). Observation ``Box(16,)``
    (``speckv_env.core.TOKEN_OBS_SPEC``; ``obs_version=2``: ``Box(21,)``, the step mode's 18 values
    then the same three): the step mode's 13 values, whose draft signals are those
    of the distribution the next token would be drafted from, then ``drafted`` (tokens drafted in
    this step / max gamma), ``survival`` (the product of their own draft probabilities) and
    ``last_draft_p`` (the last one's; 1 before drafting). Rewards: a decision that drafts and looks
    at the next distribution costs one draft forward (``-t_draft / t_target`` under ``"cost"``);
    a verification earns its emitted tokens minus the rest of the step's modelled time
    (``CostModel.verify_charge``), so the return is still N - T / t_target. ``info``: ``decision``
    ("draft" or "verify"), ``drafted``, ``draft_p``, and at verifications the step mode's keys
    plus ``lookahead`` and ``step_time``. The emitted tokens are the step mode's, whatever the
    decisions.

    ``lookahead=False`` (token mode only; default True, the above) is *draft-then-decide*, Hugging
    Face's rule: a decision with j >= 1 tokens drafted sees the signals (top1, entropy, margin) of
    the distribution token j was drafted *from* and ``last_draft_p`` = token j's own probability
    (at j = 0 the step's observation, as above). Action 1 at j = 0 drafts token 1 from the
    observation's distribution (free); at j >= 1 it first feeds token j to the draft (one forward,
    ``-t_draft / t_target``) and drafts token j + 1. A chosen stop after g tokens then costs exactly
    the step mode's step at gamma g, and verifications charge
    ``CostModel.verify_charge(g, k, sampling, lookahead=False)``.
"""
"""The token-mode section of both environments' docstrings (``SpecKV-v0``, ``SpecKVReplay-v0``)."""

TOKEN_ACTIONS: tuple[str, ...] = ("verify", "draft")
"""Token mode's actions, by index: 0 = stop and verify what is drafted, 1 = draft one more token."""

RENDER_HEIGHT = 160
RENDER_WIDTH = 320
"""Size of the ``rgb_array`` frames (multiples of 16, as video encoders prefer)."""

# colours of the rgb_array frame
_BACKGROUND = (255, 255, 255)
_GRID = (232, 232, 232)
_TRACK = (225, 225, 225)
_PROGRESS = (90, 90, 90)
_FINISHED = (44, 160, 44)
_REJECTED = (244, 170, 160)  # drafted, not accepted
_ACCEPTED = (31, 119, 180)  # drafted and accepted
_ALL_ACCEPTED = (44, 160, 44)  # every drafted token accepted
_TARGET_STEP = (150, 150, 150)  # gamma 0: a plain target step


def draw_episode(
    steps: Sequence[tuple[int, int]],
    gamma_max: int,
    position: int,
    max_new_tokens: int,
    done: bool = False,
    height: int = RENDER_HEIGHT,
    width: int = RENDER_WIDTH,
) -> np.ndarray:
    """A picture of an episode so far as a ``(height, width, 3)`` ``uint8`` array.

    Top: a progress bar, tokens emitted / ``max_new_tokens`` (green once the episode ended).
    Below: one bar per step, left to right, on a grid with one line per gamma: the bar's
    height is the gamma drafted, its lower part (blue; green when every drafted token was
    accepted) the tokens accepted, the rest (red) the rejected ones; a plain target step
    (gamma 0) is a short grey mark. Bars narrow as steps accumulate; when there are more steps
    than pixel columns, the latest ones are shown. Pure numpy, about a millisecond a frame.
    """
    pad = 4
    gmax = max(int(gamma_max), 1)
    if height < 2 * pad + 16 + gmax or width < 2 * pad + 1:
        raise ValueError(f"a {height}x{width} frame is too small for a chart of gammas up to {gmax}")
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[:] = _BACKGROUND
    bar_top, bar_bottom = pad, pad + 8
    left, right = pad, width - pad
    frac = min(max(position / max(max_new_tokens, 1), 0.0), 1.0)
    frame[bar_top:bar_bottom, left:right] = _TRACK
    frame[bar_top:bar_bottom, left : left + int(round(frac * (right - left)))] = _FINISHED if done else _PROGRESS
    top, bottom = bar_bottom + 8, height - pad
    chart_h, chart_w = bottom - top, right - left
    unit = max(chart_h // gmax, 1)
    chart = frame[bottom - unit * gmax : bottom, left:right]
    chart[::unit] = _GRID  # a line at the top of each gamma level
    frame[bottom, left:right] = _PROGRESS  # the axis
    if not len(steps):
        return frame
    data = np.asarray(steps, dtype=np.int64).reshape(-1, 2)[-chart_w:]
    n = len(data)
    slot = max(1, min(16, chart_w // n))
    gap = 1 if slot >= 3 else 0
    col = np.arange(chart_w)
    step_of = col // slot
    on = (step_of < n) & (col % slot < slot - gap)
    g = np.zeros(chart_w, dtype=np.int64)
    k = np.zeros(chart_w, dtype=np.int64)
    g[on] = np.minimum(data[step_of[on], 0], gmax)
    k[on] = np.minimum(data[step_of[on], 1], g[on])
    up = np.arange(chart.shape[0] - 1, -1, -1)[:, None]  # pixels above the chart's bottom
    chart[up < (g * unit)[None, :]] = _REJECTED
    full = (k == g) & (g > 0)
    chart[(up < (k * unit)[None, :]) & ~full[None, :]] = _ACCEPTED
    chart[(up < (k * unit)[None, :]) & full[None, :]] = _ALL_ACCEPTED
    chart[(up < 2) & (on & (g == 0))[None, :]] = _TARGET_STEP
    return frame


class _RecordingBuilder(ObservationBuilder):
    """The observation builder, also keeping each step's (gamma, accepted) for rendering.

    Every step of every environment path reports its outcome to the builder (``update`` or,
    on the replay env's fused path, ``update_run``), so this is the one place that sees them all.
    """

    def __init__(self, *args: Any, history: list[tuple[int, int]], on_step: Any = None) -> None:
        super().__init__(*args)
        self.history = history
        self.on_step = on_step
        self._in_update = False

    def update_run(self, gamma: int, accepted: int, ones: int, rejected: bool) -> None:
        super().update_run(gamma, accepted, ones, rejected)
        if not self._in_update:
            self._record(gamma, accepted)

    def update(self, gamma: int, accepted: int, events: Sequence[int]) -> None:
        self._in_update = True  # one record per step, however many runs its events form
        try:
            super().update(gamma, accepted, events)
        finally:
            self._in_update = False
        self._record(gamma, accepted)

    def _record(self, gamma: int, accepted: int) -> None:
        self.history.append((int(gamma), int(accepted)))
        if self.on_step is not None:
            self.on_step(int(gamma), int(accepted))


def check_gammas(gammas: Sequence[int], gamma_max: int | None = None) -> tuple[int, ...]:
    try:
        gs = tuple(int(g) for g in gammas)
    except (TypeError, ValueError):
        raise ValueError(f"gammas must be a sequence of non-negative integers, got {gammas!r}") from None
    if not gs:
        raise ValueError("gammas must not be empty")
    if any(g < 0 for g in gs) or any(int(g) != g for g in gammas):
        raise ValueError(f"gammas must be non-negative integers, got {gammas!r}")
    if len(set(gs)) != len(gs):
        raise ValueError(f"gammas must be distinct, got {gammas!r}")
    if gamma_max is not None and max(gs) > gamma_max:
        raise ValueError(
            f"gammas go up to {max(gs)} but this backend answers gamma <= {gamma_max} "
            f"(traces record acceptance runs only up to gamma_max = {gamma_max})"
        )
    return gs


def action_to_index(action: Any, n: int, gammas: Sequence[Any]) -> int:
    """Validate an action (int, numpy integer, or size-1 array) and return it as an int.
    ``gammas``: what the indices name (the gammas, or token mode's :data:`TOKEN_ACTIONS`)."""
    what = "token-mode actions" if tuple(gammas) == TOKEN_ACTIONS else "gammas"
    a = action
    if isinstance(a, np.ndarray):
        if a.size != 1:
            raise ValueError(f"invalid action {action!r}: expected one index into {what} {tuple(gammas)}")
        a = a.reshape(()).item()
    if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer, float, np.floating)):
        raise ValueError(f"invalid action {action!r}: expected an integer index into {what} {tuple(gammas)}")
    if isinstance(a, (float, np.floating)) and not float(a).is_integer():
        raise ValueError(f"invalid action {action!r}: expected an integer index into {what} {tuple(gammas)}")
    i = int(a)
    if not 0 <= i < n:
        raise ValueError(f"invalid action {i}: must be in 0..{n - 1}, an index into {what} {tuple(gammas)}")
    return i


class SpecKVBaseEnv(gym.Env):
    """Speculative decoding as an MDP; see :class:`speckv_env.env.SpecKVEnv` for the full docs."""

    metadata = {"render_modes": ["ansi", "human", "rgb_array"], "render_fps": 4}

    def __init__(
        self,
        backend: Backend,
        gammas: Sequence[int] = DEFAULT_GAMMAS,
        reward: str = "cost",
        render_mode: str | None = None,
        control: str = "step",
        lookahead: bool = True,
        obs_version: int = DEFAULT_OBS_VERSION,
    ) -> None:
        self.backend = backend
        self.gammas = check_gammas(gammas, backend.gamma_max)
        self.control = check_control(control)
        self.obs_version = check_obs_version(obs_version)
        self._v2 = self.obs_version == 2
        if self._v2 and not callable(getattr(backend, "obs_features", None)):
            raise ValueError(
                f"obs_version=2 needs a backend with the prompt's tokens and the target's signals; "
                f"{type(backend).__name__} has none: use obs_version=1"
            )
        self._features: np.ndarray | None = None  # version 2: the five features of the current step
        self._token = control == "token"
        self.lookahead = check_lookahead(lookahead, control)
        self._drafted = 0  # token mode: tokens drafted so far in the current step
        self._survival = 1.0  # token mode: product of their own draft probabilities
        self._last_p = 1.0  # token mode: the last drafted token's own draft probability
        self.reward_name = reward
        self._reward_fn = get_reward(reward)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode {render_mode!r} not supported; choose from {self.metadata['render_modes']}")
        self.render_mode = render_mode
        self.cost_model = backend.cost_model
        low, high = obs_bounds(self.obs_version, self.control)
        self.observation_space = spaces.Box(low, high, dtype=np.float32)
        if self._token:
            self.action_space = spaces.Discrete(len(TOKEN_ACTIONS))
        else:
            self.action_space = spaces.Discrete(len(self.gammas))
        self._history: list[tuple[int, int]] = []
        self._builder = self._make_builder()
        self._episode: Any = None
        self._done = True
        self._last_signals = DraftSignals(0.0, 0.0, 0.0)
        self._text: list[int] = []
        self._stats = {"steps": 0, "tokens": 0, "modelled_s": 0.0, "measured_s": 0.0}

    # ---- gymnasium API ---------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        n = self.backend.num_episodes()
        if "episode" in options:
            index = int(options["episode"])
            if not 0 <= index < n:
                raise ValueError(f"options['episode'] = {index} out of range: this environment has {n} episodes")
        else:
            index = int(self.np_random.integers(n))
        ep_seed = options.get("episode_seed")
        if ep_seed is None:
            ep_seed = int(self.np_random.integers(2**31 - 1))
        self._episode = self.backend.reset(index, int(ep_seed))
        # a data set may mix compressions: the cost model and compression are per episode
        self.cost_model = self.backend.cost_model
        self._history = []
        self._builder = self._make_builder()
        self._done = False
        self._text = []
        self._stats = {"steps": 0, "tokens": 0, "modelled_s": 0.0, "measured_s": 0.0}
        self._drafted, self._survival, self._last_p = 0, 1.0, 1.0
        self._last_signals = self.backend.signals()
        if self._v2:
            self._features = self.backend.obs_features()  # type: ignore[attr-defined]  # checked in __init__
        obs = self._observe()
        info = {
            "episode_index": index,
            "episode_seed": int(ep_seed),
            "prompt_id": self._episode.prompt_id,
            "task": self._episode.task,
            "compression": self._episode.compression,
            "mode": self._episode.mode,
            **(self._episode.extra or {}),  # e.g. "exact": whether other gammas would emit the same tokens
        }
        if self.render_mode == "human":
            print(
                f"episode {index}: prompt {self._episode.prompt_id} ({self._episode.task}, {self._episode.compression})"
            )
        return obs, info

    def _observe(self) -> np.ndarray:
        """The observation at the current decision (token mode: plus where the step stands)."""
        obs = self._builder.observe(self._last_signals, self.backend.position(), self._features)
        if not self._token:
            return obs
        drafted = min(self._drafted / max(self.gammas), 1.0) if max(self.gammas) else 0.0
        return np.concatenate((obs, np.array((drafted, self._survival, self._last_p), dtype=np.float32)))

    def token_cap(self) -> int:
        """Token mode: the most tokens the current step may draft (``max(gammas)`` and the budget)."""
        return max(min(max(self.gammas), self.backend.max_new_tokens - 1 - self.backend.position()), 0)

    def step(self, action: Any):
        if self._done:
            raise RuntimeError("step() called on a finished episode: call reset() first")
        if self._token:
            return self._token_step(action)
        i = action_to_index(action, len(self.gammas), self.gammas)
        requested = self.gammas[i]
        out = self.backend.step(requested)
        t_model = self.cost_model.step_time(out.gamma, out.accepted, self.backend.sampling)
        reward = float(self._reward_fn(out, t_model, self.cost_model))
        obs, terminated, truncated, info = self._emit(out, t_model)
        info["requested_gamma"] = requested
        return obs, reward, terminated, truncated, info

    # ---- token mode ---------------------------------------------------------------------
    def _token_step(self, action: Any):
        """One decision: 1 = draft one more token, 0 = verify what is drafted (DESIGN.md).

        A draft decision that reaches :meth:`token_cap` verifies at once (no choice is left), as
        does 1 when nothing may be drafted. Costs: a token drafted and looked past (look-ahead), or
        fed to the draft before the next one is drafted (draft-then-decide, j >= 1), is charged one
        draft forward at its decision; the verification charges the rest of the step's time
        (:meth:`CostModel.verify_charge`), so the return is N - T / t_target as in step mode."""
        a = action_to_index(action, len(TOKEN_ACTIONS), TOKEN_ACTIONS)
        cap, j = self.token_cap(), self._drafted
        if a == 0 or j >= cap:
            return self._token_verify(lookahead=self.lookahead and j > 0, decision=TOKEN_ACTIONS[a])
        cm = self.cost_model
        if self.lookahead:
            looks = j + 1 < cap
            charged = cm.t_draft if looks else 0.0  # the forward past the new token
        else:
            looks = False
            charged = cm.t_draft if j > 0 else 0.0  # the deferred forward that feeds token j
        p = self.backend.draft_token(looks)  # type: ignore[attr-defined]  # token backends
        self._drafted, self._survival, self._last_p = j + 1, self._survival * p, p
        if j + 1 >= cap:  # the cap: verify now
            return self._token_verify(lookahead=False, decision="draft", draft_p=p, charged=charged)
        t_model = charged
        reward = float(self._reward_fn(StepOutcome(0, 0, [], False), t_model, cm))
        self._stats["modelled_s"] += t_model
        if self.lookahead:
            self._last_signals = self.backend.signals()
        else:
            self._last_signals = self.backend.drafted_signals()  # type: ignore[attr-defined]
        info = {
            "decision": "draft",
            "drafted": j + 1,
            "draft_p": p,
            "tokens": [],
            "emitted": 0,
            "modelled_time": t_model,
            "position": self.backend.position(),
        }
        return self._observe(), reward, False, False, info

    def _token_verify(self, lookahead: bool, decision: str, draft_p: float | None = None, charged: float = 0.0):
        """Token mode: verify the step's drafted tokens and emit (the step mode's step, priced by
        :meth:`CostModel.verify_charge`, plus ``charged``: the draft forward of the decision that
        reached the cap in draft-then-decide)."""
        out = self.backend.verify()  # type: ignore[attr-defined]  # token backends
        cm = self.cost_model
        t_model = cm.verify_charge(out.gamma, out.accepted, self.backend.sampling, lookahead)
        if charged:
            t_model = charged + t_model
        reward = float(self._reward_fn(out, t_model, cm))
        obs, terminated, truncated, info = self._emit(out, t_model)
        info.update(
            decision=decision,
            drafted=out.gamma,
            draft_p=draft_p,
            lookahead=lookahead,
            step_time=cm.step_time(out.gamma, out.accepted, self.backend.sampling, lookahead),
        )
        return obs, reward, terminated, truncated, info

    def _emit(self, out: StepOutcome, t_model: float) -> tuple[np.ndarray, bool, bool, dict[str, Any]]:
        """Account a verified step (both modes): observation, end flags and the step's info."""
        self._builder.update(out.gamma, out.accepted, out.events)
        measured = None
        if out.draft_s is not None and out.verify_s is not None:
            measured = out.draft_s + out.verify_s
            self._stats["measured_s"] += measured
        self._stats["steps"] += 1
        self._stats["tokens"] += out.emitted
        self._stats["modelled_s"] += t_model
        self._text.extend(out.tokens)
        self._done = out.done
        self._drafted, self._survival, self._last_p = 0, 1.0, 1.0
        if not out.done:
            self._last_signals = self.backend.signals()
            if self._v2:
                self._features = self.backend.obs_features()  # type: ignore[attr-defined]
        info: dict[str, Any] = {
            "gamma": out.gamma,
            "accepted": out.accepted,
            "tokens": list(out.tokens),
            "emitted": out.emitted,
            "modelled_time": t_model,
            "measured_time": measured,
            "draft_time": out.draft_s,
            "verify_time": out.verify_s,
            "position": self.backend.position(),
        }
        if out.extra:
            info.update(out.extra)
        if out.done:
            info["episode_summary"] = episode_summary(self._stats, self.cost_model, out.finish_reason)
        terminated = bool(out.done and out.finish_reason == "eos")
        return self._observe(), terminated, bool(out.done and not terminated), info

    def _make_builder(self) -> ObservationBuilder:
        """The observation builder for an episode (one that records the steps when rendering needs them)."""
        args = (max(self.gammas), self.backend.max_new_tokens, self.backend.compression, self.cost_model.cost_ratio)
        if self.render_mode in ("rgb_array", "human"):
            on_step = self._print_step if self.render_mode == "human" else None
            return _RecordingBuilder(*args, history=self._history, on_step=on_step)
        return ObservationBuilder(*args)

    def _print_step(self, gamma: int, accepted: int) -> None:
        bar = "#" * accepted + "." * (gamma - accepted)
        print(f"step {len(self._history):>4}  gamma {gamma:>2}  accepted {accepted:>2}  {bar}")

    def _summary(self) -> str:
        s = self._stats
        return (
            f"prompt={getattr(self._episode, 'prompt_id', None)} steps={s['steps']} tokens={s['tokens']} "
            f"modelled_s={s['modelled_s']:.4f}"
        )

    def render(self):
        """``"ansi"``: a one-line summary; ``"rgb_array"``: the episode so far as an
        ``(RENDER_HEIGHT, RENDER_WIDTH, 3)`` uint8 picture (:func:`draw_episode`); ``"human"``:
        prints the summary (the steps are printed as they happen) and returns None."""
        if self.render_mode == "ansi":
            return self._summary()
        if self.render_mode == "rgb_array":
            return draw_episode(
                self._history, max(self.gammas), self.backend.position(), self.backend.max_new_tokens, self._done
            )
        if self.render_mode == "human":
            print(self._summary())
        return None

    def close(self) -> None:
        self.backend.close()

    @property
    def emitted_tokens(self) -> list[int]:
        """Token ids emitted so far in this episode."""
        return list(self._text)
