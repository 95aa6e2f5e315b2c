"""The environment logic shared by SpecKV-v0 (live) and SpecKVReplay-v0 (replay).

The environment never knows whether a step came from models or from a log: it talks to a
:class:`speckv_env.core.Backend`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .core import (
    DEFAULT_GAMMAS,
    OBS_HIGH,
    OBS_LOW,
    Backend,
    DraftSignals,
    ObservationBuilder,
    get_reward,
)


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


def action_to_index(action: Any, n: int, gammas: Sequence[int]) -> int:
    """Validate an action (int, numpy integer, or size-1 array) and return it as an int."""
    a = action
    if isinstance(a, np.ndarray):
        if a.size != 1:
            raise ValueError(f"invalid action {action!r}: expected one index into gammas {tuple(gammas)}")
        a = a.reshape(()).item()
    if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer, float, np.floating)):
        raise ValueError(f"invalid action {action!r}: expected an integer index into gammas {tuple(gammas)}")
    if isinstance(a, (float, np.floating)):
        if not float(a).is_integer():
            raise ValueError(f"invalid action {action!r}: expected an integer index into gammas {tuple(gammas)}")
    i = int(a)
    if not 0 <= i < n:
        raise ValueError(f"invalid action {i}: must be in 0..{n - 1}, an index into gammas {tuple(gammas)}")
    return i


class SpecKVBaseEnv(gym.Env):
    """Speculative decoding as an MDP; see :class:`speckv_env.env.SpecKVEnv` for the full docs."""

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        backend: Backend,
        gammas: Sequence[int] = DEFAULT_GAMMAS,
        reward: str = "cost",
        render_mode: str | None = None,
    ) -> None:
        self.backend = backend
        self.gammas = check_gammas(gammas, backend.gamma_max)
        self.reward_name = reward
        self._reward_fn = get_reward(reward)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode {render_mode!r} not supported; choose from {self.metadata['render_modes']}")
        self.render_mode = render_mode
        self.cost_model = backend.cost_model
        self.action_space = spaces.Discrete(len(self.gammas))
        self.observation_space = spaces.Box(OBS_LOW, OBS_HIGH, dtype=np.float32)
        self._builder = ObservationBuilder(
            max(self.gammas), backend.max_new_tokens, backend.compression, self.cost_model.cost_ratio
        )
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
        self._builder = ObservationBuilder(
            max(self.gammas), self.backend.max_new_tokens, self.backend.compression, self.cost_model.cost_ratio
        )
        self._done = False
        self._text = []
        self._stats = {"steps": 0, "tokens": 0, "modelled_s": 0.0, "measured_s": 0.0}
        self._last_signals = self.backend.signals()
        obs = self._builder.observe(self._last_signals, 0)
        info = {
            "episode_index": index,
            "episode_seed": int(ep_seed),
            "prompt_id": self._episode.prompt_id,
            "task": self._episode.task,
            "compression": self._episode.compression,
            "mode": self._episode.mode,
        }
        return obs, info

    def step(self, action: Any):
        if self._done:
            raise RuntimeError("step() called on a finished episode: call reset() first")
        i = action_to_index(action, len(self.gammas), self.gammas)
        requested = self.gammas[i]
        out = self.backend.step(requested)
        t_model = self.cost_model.step_time(out.gamma, out.accepted, self.backend.sampling)
        reward = float(self._reward_fn(out, t_model, self.cost_model))
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
        terminated = bool(out.done and out.finish_reason == "eos")
        truncated = bool(out.done and not terminated)
        if not out.done:
            self._last_signals = self.backend.signals()
        obs = self._builder.observe(self._last_signals, self.backend.position())
        info: dict[str, Any] = {
            "gamma": out.gamma,
            "requested_gamma": requested,
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
            s = self._stats
            info["episode_summary"] = {
                "tokens": s["tokens"],
                "steps": s["steps"],
                "modelled_s": s["modelled_s"],
                "modelled_tps": s["tokens"] / s["modelled_s"] if s["modelled_s"] > 0 else float("nan"),
                "measured_s": s["measured_s"] if s["measured_s"] > 0 else None,
                "measured_tps": s["tokens"] / s["measured_s"] if s["measured_s"] > 0 else None,
                "target_only_tps": self.cost_model.target_only_tps,
                "finish_reason": out.finish_reason,
            }
        return obs, reward, terminated, truncated, info

    def render(self):
        if self.render_mode == "ansi":
            s = self._stats
            return f"prompt={getattr(self._episode, 'prompt_id', None)} steps={s['steps']} tokens={s['tokens']} modelled_s={s['modelled_s']:.4f}"
        return None

    def close(self) -> None:
        self.backend.close()

    @property
    def emitted_tokens(self) -> list[int]:
        """Token ids emitted so far in this episode."""
        return list(self._text)
