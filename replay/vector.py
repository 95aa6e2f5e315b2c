"""Vectorised replay: ``num_envs`` copies of SpecKVReplay-v0 stepped together in numpy.

All traces are flattened into contiguous arrays with offsets (one padding slot after each
trace), the per-env state lives in a few arrays, and the observation matrix is kept
transposed (one contiguous row per feature) so that a step is ~45 numpy calls whatever the
number of environments. Per-env trajectories are *identical* (bit for bit: observations,
rewards, terminations) to the single environment's for the same episode choices and actions
(tests/test_replay_vector.py): the EMA uses the same run-grouped update and the same tables.

Autoreset follows Gymnasium's modes: ``NEXT_STEP`` (default; like CartPole's vector env, the
step after an episode's end resets that env and returns its first observation with reward 0)
or ``SAME_STEP`` (the env is reset in the step that ends it; the last observation is in
``info["final_obs"]``, masked by ``info["_final_obs"]``).

Info (arrays over envs): ``gamma`` (used), ``accepted``, ``modelled_time``, ``episode``
(trace index being played), and at episode ends ``episode_tps`` (modelled tokens/s of the
finished episode), masked by ``_episode_tps``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from speckv_env.base_env import check_gammas
from speckv_env.core import (
    DEFAULT_GAMMAS,
    EMA_FILL,
    EMA_KEEP,
    OBS_DIM,
    OBS_HIGH,
    OBS_INDEX,
    OBS_LOW,
    CostModel,
    ObservationBuilder,
    RewardFn,
    get_reward,
    step_tables,
)

from .costs import Episode, resolver
from .steprule import step_arrays
from .trace import PathLike, Trace

# The per-env state is packed into one int64 matrix with one column per env, so that resetting
# envs to episodes is a single fancy assignment of fresh columns (``_start``). Its rows:
#   integer state   _EP .. _LIM                   (int64)
#   observation     _OBS: OBS_DIM rows in OBS_SPEC order (float64 bits, viewed as float64)
#   side state      _SIDE: _HITS1 .. _LEN         (float64 bits, viewed as float64)
_EP, _BASE, _FI, _END, _GRP, _EOS, _LIM = range(7)
"""Integer rows: trace index; flat index of the trace's first position; flat index of the current
position; flat index of the trace's last token; offset of the episode's step tables; 1 if the
trace ends with EOS; flat index of position max_new_tokens - 1 (the engine's clip)."""
_NI = 7
_OBS = slice(_NI, _NI + OBS_DIM)
_HITS1, _TESTS2, _TIME, _LEN = range(4)
"""Side-state rows: accepted events + 1, tested events + 2 (the Laplace-smoothed mean), modelled
time so far, the trace's length N."""
_SIDE = slice(_NI + OBS_DIM, _NI + OBS_DIM + 4)
_ROWS = _NI + OBS_DIM + 4

# observation rows (indices into the _OBS block), from the one definition in speckv_env.core
_O_TOP1, _O_ENTROPY, _O_MARGIN = OBS_INDEX["draft_top1"], OBS_INDEX["draft_entropy"], OBS_INDEX["draft_margin"]
_O_SIGNALS = slice(_O_TOP1, _O_MARGIN + 1)
_O_EMA = OBS_INDEX["accept_ema"]
_O_MEAN = OBS_INDEX["accept_mean"]
_O_LAST_GAMMA = OBS_INDEX["last_gamma"]
_O_LAST_ACCEPTED = OBS_INDEX["last_accepted"]
_O_LAST_FULL = OBS_INDEX["last_full_accept"]
_O_POSITION = OBS_INDEX["position"]
assert (_O_TOP1, _O_ENTROPY, _O_MARGIN) == (0, 1, 2), "the draft signals lead the observation"


class SpecKVReplayVectorEnv(VectorEnv):
    """``num_envs`` replay environments over full-information traces, batched in numpy.

    Arguments are those of :class:`replay.env.SpecKVReplayEnv` (``logs``/``traces``,
    ``cost_model(s)``, ``allow_cost_model_mismatch``, filters, ``gammas``, ``reward``) plus ``num_envs`` and
    ``autoreset_mode``. ``reset(options={"episodes": [...]})`` fixes the first episode of each
    env; later episodes are drawn uniformly with ``self.np_random``.
    """

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        logs: PathLike | Sequence[PathLike] | None = None,
        traces: Sequence[Trace] | None = None,
        cost_model: CostModel | None = None,
        cost_models: Mapping[str, CostModel] | None = None,
        task: None | str | Sequence[str] = None,
        split: None | str | Sequence[str] = None,
        compression: None | str | Sequence[str] = None,
        mode: None | str | Sequence[str] = None,
        gammas: Sequence[int] = DEFAULT_GAMMAS,
        reward: str = "cost",
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        render_mode: str | None = None,
        allow_cost_model_mismatch: bool = False,
    ) -> None:
        from .env import load_traces

        if render_mode is not None:
            raise ValueError("the vectorised replay has no render modes")
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        filters = {"task": task, "split": split, "compression": compression, "mode": mode}
        trs, found = load_traces(logs, traces, filters)
        cost_of = resolver(cost_model, cost_models, found, allow_cost_model_mismatch)
        self.traces = trs
        self.num_envs = int(num_envs)
        self.autoreset_mode = self._autoreset_mode(autoreset_mode)
        self.metadata = {**self.metadata, "autoreset_mode": self.autoreset_mode}
        self.gammas = check_gammas(gammas, min(t.gamma_max for t in trs))
        self.reward_name = reward
        gmax = max(self.gammas)
        self._gm = max(gmax, 1)
        self._G1 = gmax + 1
        self._gam = np.asarray(self.gammas, dtype=np.int64)
        self._cms = [cost_of(Episode.of_trace(t)) for t in trs]
        base, lens = self._flatten_traces(trs)
        grp = self._build_step_tables(trs, get_reward(reward))
        self._fresh = self._fresh_state(trs, base, lens, grp)
        self._fill = np.asarray(EMA_FILL, dtype=np.float64)
        self._keep_or_one = np.array([1.0, EMA_KEEP])

        # ---- spaces ----
        self.single_action_space = spaces.Discrete(len(self.gammas))
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.single_observation_space = spaces.Box(OBS_LOW, OBS_HIGH, dtype=np.float32)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        # gammas between two -1 sentinels, so that one take + one min validates the actions
        self._gam_ext = np.concatenate([[-1], self._gam, [-1]]).astype(np.int64)

        E = self.num_envs
        self._buf = np.zeros((_ROWS, E), dtype=np.int64)
        self._I = self._buf[0:_NI]
        self._S = self._buf[_OBS].view(np.float64)
        self._F = self._buf[_SIDE].view(np.float64)
        self._prev_done = np.zeros(E, dtype=bool)
        self._started = False
        self._ep_buf = np.zeros(0, dtype=np.int64)
        self._ep_next = 0

    # ---- construction --------------------------------------------------------------------
    def _flatten_traces(self, trs: Sequence[Trace]) -> tuple[np.ndarray, np.ndarray]:
        """Every trace's runs, acceptances and (clipped) signals in flat arrays with one padding
        slot after each trace, and position / max_new_tokens per flat index. Returns each
        trace's base offset and length."""
        lens = np.array([t.n for t in trs], dtype=np.int64)
        base = np.zeros(len(trs), dtype=np.int64)
        base[1:] = np.cumsum(lens + 1)[:-1]
        total = int((lens + 1).sum())
        self._L = np.full(total, -1, dtype=np.int64)  # padding slot: -1 keeps a finished env in place
        self._acc = np.zeros(total, dtype=np.int64)
        sig = np.zeros((3, total), dtype=np.float64)
        # position / max_new_tokens for every flat index (pad slot: N / max_new_tokens)
        self._posn = np.zeros(total, dtype=np.float64)
        for i, t in enumerate(trs):
            b, n = base[i], t.n
            self._L[b : b + n] = t.L
            self._acc[b : b + n] = t.accept
            sig[0, b : b + n] = t.sig_top1
            sig[1, b : b + n] = t.sig_entropy
            sig[2, b : b + n] = t.sig_margin
            self._posn[b : b + n + 1] = np.arange(n + 1, dtype=np.int64) / np.float64(t.max_new_tokens)
        lo, hi = OBS_LOW[_O_SIGNALS, None], OBS_HIGH[_O_SIGNALS, None]
        np.clip(sig, lo.astype(np.float64), hi.astype(np.float64), out=sig)
        self._sig = sig
        return base, lens

    def _build_step_tables(self, trs: Sequence[Trace], reward_fn: RewardFn) -> np.ndarray:
        """Step time and reward per (cost model, sampling) group, flattened ``[group, g_eff, k]``
        into ``self._T`` and ``self._R``; returns each trace's offset into them."""
        groups: dict[tuple[int, bool], int] = {}
        tabs_t: list[np.ndarray] = []
        tabs_r: list[np.ndarray] = []
        grp = np.zeros(len(trs), dtype=np.int64)
        for i, t in enumerate(trs):
            cm = self._cms[i]
            key = (id(cm), t.mode == "sample")
            if key not in groups:
                groups[key] = len(groups)
                times, rewards = step_tables(cm, key[1], self._G1 - 1, reward_fn)
                tabs_t.append(times.ravel())
                tabs_r.append(rewards.ravel())
            grp[i] = groups[key] * self._G1 * self._G1
        self._T = np.concatenate(tabs_t)
        self._R = np.concatenate(tabs_r)
        return grp

    def _fresh_state(self, trs: Sequence[Trace], base: np.ndarray, lens: np.ndarray, grp: np.ndarray) -> np.ndarray:
        """The packed state of every trace at its start: resetting an env to trace i copies
        column i (see the layout above)."""
        ntr = len(trs)
        fresh = np.zeros((_ROWS, ntr), dtype=np.int64)
        ints = fresh[0:_NI]
        ints[_EP] = np.arange(ntr)
        ints[_BASE] = base
        ints[_FI] = base
        ints[_END] = base + lens - 1
        ints[_GRP] = grp
        ints[_EOS] = [t.finish_reason == "eos" for t in trs]
        ints[_LIM] = base + np.array([t.max_new_tokens for t in trs], dtype=np.int64) - 1
        obs = fresh[_OBS].view(np.float64)
        for i, t in enumerate(trs):
            ob = ObservationBuilder(self._gm, t.max_new_tokens, t.compression, self._cms[i].cost_ratio)
            top1, entropy, margin = (float(x) for x in self._sig[:, base[i]])
            obs[:, i] = ob.observe_values(top1, entropy, margin, 0)
        side = fresh[_SIDE].view(np.float64)
        side[_HITS1] = 1.0
        side[_TESTS2] = 2.0
        side[_LEN] = lens
        return fresh

    # ---- helpers -------------------------------------------------------------------------
    @staticmethod
    def _autoreset_mode(mode: AutoresetMode | str) -> AutoresetMode:
        if isinstance(mode, AutoresetMode):
            m = mode
        else:
            key = str(mode).replace("-", "").replace("_", "").lower()
            found = {x.value.lower(): x for x in AutoresetMode}.get(key)
            if found is None:
                raise ValueError(f"autoreset_mode {mode!r} not supported: choose next-step or same-step")
            m = found
        if m == AutoresetMode.DISABLED:
            raise ValueError("autoreset_mode DISABLED is not supported: choose next-step or same-step")
        return m

    @property
    def episode_index(self) -> np.ndarray:
        """Trace index each env is playing (a copy)."""
        return self._I[_EP].copy()

    def _draw_episodes(self, m: int) -> np.ndarray:
        """``m`` uniform trace indices from ``self.np_random`` (drawn in blocks: fewer calls)."""
        if self._ep_next + m > self._ep_buf.shape[0]:
            self._ep_buf = self.np_random.integers(len(self.traces), size=max(4096, 16 * self.num_envs, m))
            self._ep_next = 0
        out = self._ep_buf[self._ep_next : self._ep_next + m]
        self._ep_next += m
        return out

    def _start(self, idx: np.ndarray, eps: np.ndarray) -> None:
        self._buf[:, idx] = self._fresh[:, eps]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        ntr = len(self.traces)
        self._ep_buf = np.zeros(0, dtype=np.int64)
        self._ep_next = 0
        if "episodes" in options:
            eps = np.asarray(options["episodes"], dtype=np.int64).reshape(-1)
            if eps.shape != (self.num_envs,) or (eps < 0).any() or (eps >= ntr).any():
                raise ValueError(
                    f"options['episodes'] must be {self.num_envs} trace indices in 0..{ntr - 1}, "
                    f"got {options['episodes']!r}"
                )
        else:
            eps = self._draw_episodes(self.num_envs).copy()
        self._start(np.arange(self.num_envs), eps)
        self._prev_done[:] = False
        self._started = True
        return self._S.T.astype(np.float32), {"episode": self._I[_EP].copy()}

    def _actions(self, actions: Any) -> np.ndarray:
        a = np.asarray(actions)
        if a.dtype != np.int64:
            if a.dtype.kind not in "iu":
                raise ValueError(f"invalid actions {actions!r}: expected integer indices into gammas {self.gammas}")
            a = a.astype(np.int64)
        if a.shape != (self.num_envs,):
            raise ValueError(f"invalid actions: expected shape ({self.num_envs},), got {a.shape}")
        # one sentinel on each side: a + 1 clipped into the table maps every action outside
        # 0..n-1 (negative ones too: take() would wrap them) onto a -1 sentinel
        g = self._gam_ext.take(a + 1, mode="clip")
        if np.minimum.reduce(g) < 0:
            bad = a[(a < 0) | (a >= self._gam.shape[0])]
            raise ValueError(
                f"invalid action(s) {bad.tolist()}: must be in 0..{self._gam.shape[0] - 1}, "
                f"indices into gammas {self.gammas}"
            )
        return g

    # ---- step ------------------------------------------------------------------------------
    def step(self, actions: Any):
        if not self._started:
            raise RuntimeError("step() before reset(): call reset() first")
        g = self._actions(actions)
        I, S, F = self._I, self._S, self._F  # noqa: E741  (integer state, observation, float state)
        fi = I[_FI]
        # the step rule (replay.steprule), engine clip: limit = max_new_tokens - 1 - t
        geff, k, ones, rej = step_arrays(self._L.take(fi), self._acc.take(fi), g, I[_LIM] - fi)
        ema = S[_O_EMA]
        upd = 1.0 - ema
        upd *= self._fill.take(ones)
        ema += upd
        ema *= self._keep_or_one.take(rej)
        F[_HITS1] += ones
        F[_TESTS2] += ones
        F[_TESTS2] += rej
        np.divide(F[_HITS1], F[_TESTS2], out=S[_O_MEAN])
        np.divide(geff, self._gm, out=S[_O_LAST_GAMMA])
        np.divide(k, self._gm, out=S[_O_LAST_ACCEPTED])
        np.less(rej, np.minimum(k, 1), out=S[_O_LAST_FULL], casting="unsafe")  # k >= g_eff > 0
        fn = fi + k
        fn += 1
        done = fn > I[_END]
        np.take(self._sig, np.where(done, fi, fn), axis=1, out=S[_O_SIGNALS])
        self._posn.take(fn, out=S[_O_POSITION])
        I[_FI] = fn
        ti = geff * self._G1
        ti += k
        ti += I[_GRP]
        reward = self._R.take(ti, mode="clip")  # clip: only envs being autoreset can be out of range
        tm = self._T.take(ti, mode="clip")
        F[_TIME] += tm
        terminated = done & (I[_EOS] == 1)
        truncated = done ^ terminated
        info: dict[str, Any] = {"gamma": geff, "accepted": k, "modelled_time": tm}
        any_done = np.count_nonzero(done) > 0
        if any_done:
            info["episode_tps"] = np.where(done, F[_LEN] / F[_TIME], np.nan)
            info["_episode_tps"] = done
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            pd = self._prev_done
            if np.count_nonzero(pd):
                # these envs ended in the previous step: what was computed for them above is
                # discarded (their flat index sat on the padding slot), and they start anew
                idx = np.flatnonzero(pd)
                self._start(idx, self._draw_episodes(idx.shape[0]))
                reward[idx] = 0.0
                terminated[idx] = False
                truncated[idx] = False
                geff[idx] = 0
                k[idx] = 0
                tm[idx] = 0.0
                if any_done:
                    info["_episode_tps"] = done & ~pd
            self._prev_done = terminated | truncated
            return S.T.astype(np.float32), reward, terminated, truncated, info
        # SAME_STEP
        obs = S.T.astype(np.float32)
        if any_done:
            idx = np.flatnonzero(done)
            final = np.full(self.num_envs, None, dtype=object)
            for i in idx.tolist():
                final[i] = obs[i].copy()
            info["final_obs"] = final
            info["_final_obs"] = done.copy()
            self._start(idx, self._draw_episodes(idx.shape[0]))
            obs[idx] = self._S[:, idx].T
        return obs, reward, terminated, truncated, info
