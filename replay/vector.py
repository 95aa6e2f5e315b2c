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

Info (arrays over envs): ``gamma`` (used), ``accepted``, ``modelled_time``, and at episode ends
``episode_tps`` (modelled tokens/s of the finished episode), masked by ``_episode_tps``; the
trace index each env plays is ``info["episode"]`` at reset and :attr:`episode_index` any time.

Token mode (``control="token"``, speckv-trace/2 traces): one step is one decision per env,
``Discrete(2)`` (1 = draft one more token, 0 = stop and verify), with the scalar env's
semantics decision by decision (same observations of ``TOKEN_OBS_SPEC``, rewards, ends; tested
in tests/test_token_vector.py): a draft decision that looks ahead is charged ``t_draft``, a
verification ``CostModel.verify_charge``, and a draft decision that reaches the cap verifies at
once. The state gains the tokens drafted in the step (an integer row) and the observation's
three token rows; the draft's rollout signals and probabilities are flattened like the trace's
(``W = max(max(gammas), 1)`` entries per position: the position's own signals, then the
rollout's). Token-mode info adds ``verified`` (the decision verified), ``drafted`` (tokens
drafted in the step after the decision), ``lookahead``, ``draft_p`` (the drafted token's own
probability, NaN where none was drafted) and ``step_time`` (the whole step's modelled time);
``gamma``, ``accepted``, ``lookahead`` and ``step_time`` are 0 (False) where nothing was verified.
``lookahead=False`` is token mode's draft-then-decide variant (``speckv_env.base_env.TOKEN_MODE_DOC``):
the signals table then holds, at entry j >= 1, the distribution token j was drafted from, and
the planes of :func:`token_tables` price its deferred forwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from speckv_env.base_env import TOKEN_ACTIONS, check_gammas
from speckv_env.core import (
    DEFAULT_GAMMAS,
    DEFAULT_OBS_VERSION,
    EMA_FILL,
    EMA_KEEP,
    OBS_DIM,
    OBS_HIGH,
    OBS_INDEX,
    OBS_LOW,
    OBS_SPEC,
    OBS_V2_FEATURES,
    TOKEN_OBS_DIM,
    TOKEN_OBS_SPEC,
    CostModel,
    ObservationBuilder,
    RewardFn,
    StepOutcome,
    check_control,
    check_lookahead,
    check_obs_version,
    get_reward,
    obs_bounds,
    step_tables,
)

from .costs import Episode, resolver
from .steprule import step_arrays
from .trace import PathLike, Trace

# The per-env state is packed into one int64 matrix with one column per env, so that resetting
# envs to episodes is a single fancy assignment of fresh columns (``_start``). Its rows:
#   integer state   _EP .. _J                     (int64)
#   observation     _OBS: TOKEN_OBS_DIM rows in TOKEN_OBS_SPEC order, then observation version 2's
#                   five rows (OBS_V2_FEATURES) (float64 bits, viewed as float64); version 1's step
#                   mode observes the first OBS_DIM of them (OBS_SPEC), token mode the first
#                   TOKEN_OBS_DIM; version 2 picks its order from them (``_out_rows``)
#   side state      _SIDE: _HITS1 .. _LEN         (float64 bits, viewed as float64)
_EP, _BASE, _FI, _END, _GRP, _EOS, _LIM, _J = range(8)
"""Integer rows: trace index; flat index of the trace's first position; flat index of the current
position; flat index of the trace's last token; offset of the episode's step tables; 1 if the
trace ends with EOS; flat index of position max_new_tokens - 1 (the engine's clip); token mode:
tokens drafted so far in the current step."""
_NI = 8
_NV2 = len(OBS_V2_FEATURES)
_NOBS = TOKEN_OBS_DIM + _NV2
_OBS = slice(_NI, _NI + _NOBS)
_HITS1, _TESTS2, _TIME, _LEN = range(4)
"""Side-state rows: accepted events + 1, tested events + 2 (the Laplace-smoothed mean), modelled
time so far, the trace's length N."""
_SIDE = slice(_NI + _NOBS, _NI + _NOBS + 4)
_ROWS = _NI + _NOBS + 4

# observation rows (indices into the _OBS block), from the one definition in speckv_env.core
_O_TOP1, _O_ENTROPY, _O_MARGIN = OBS_INDEX["draft_top1"], OBS_INDEX["draft_entropy"], OBS_INDEX["draft_margin"]
_O_SIGNALS = slice(_O_TOP1, _O_MARGIN + 1)
_O_EMA = OBS_INDEX["accept_ema"]
_O_MEAN = OBS_INDEX["accept_mean"]
_O_LAST_GAMMA = OBS_INDEX["last_gamma"]
_O_LAST_ACCEPTED = OBS_INDEX["last_accepted"]
_O_LAST_FULL = OBS_INDEX["last_full_accept"]
_O_POSITION = OBS_INDEX["position"]
_TOKEN_INDEX = {s[0]: i for i, s in enumerate(TOKEN_OBS_SPEC)}
_O_DRAFTED, _O_SURVIVAL, _O_LAST_P = (_TOKEN_INDEX[n] for n in ("drafted", "survival", "last_draft_p"))
_O_V2 = slice(TOKEN_OBS_DIM, _NOBS)  # observation version 2's five rows
assert (_O_TOP1, _O_ENTROPY, _O_MARGIN) == (0, 1, 2), "the draft signals lead the observation"
assert TOKEN_OBS_SPEC[:OBS_DIM] == OBS_SPEC, "token mode's observation extends the step mode's"

# token mode's tables hold five planes per (cost model, sampling) group, indexed [plane, g, k]
_P_VERIFY, _P_VERIFY_LOOKAHEAD, _P_DRAFT, _P_VERIFY_FED, _P_FREE = range(5)
"""Planes: a verification without / with lookahead (``CostModel.verify_charge``); a draft
decision charged one forward (entry [0, 0]: one ``t_draft``: look-ahead's forward past the new
token, or draft-then-decide's deferred one); a draft decision that feeds the last token and
reaches the cap, so verifies at once (draft-then-decide: ``t_draft`` plus the verification
without lookahead); a draft decision charged nothing (entry [0, 0]: draft-then-decide's first
token)."""
_N_PLANES = 5


def token_tables(
    cost: CostModel, sampling: bool, gamma_max: int, reward_fn: RewardFn
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token mode's modelled time, reward and whole-step time of every decision outcome, as
    ``(5, gamma_max + 1, gamma_max + 1)`` float64 tables indexed ``[plane, g, k]`` (planes
    :data:`_P_VERIFY`, :data:`_P_VERIFY_LOOKAHEAD`, :data:`_P_DRAFT`, :data:`_P_VERIFY_FED`,
    :data:`_P_FREE`), from the cost model's own :meth:`~speckv_env.core.CostModel.verify_charge`
    and :meth:`~speckv_env.core.CostModel.step_time` and the reward function, as the scalar env
    charges them (``SpecKVBaseEnv._token_step``)."""
    g1 = gamma_max + 1
    shape = (_N_PLANES, g1, g1)
    times, rewards, steps = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    for plane, lookahead, charged in (
        (_P_VERIFY, False, 0.0),
        (_P_VERIFY_LOOKAHEAD, True, 0.0),
        (_P_VERIFY_FED, False, cost.t_draft),
    ):
        for g in range(g1):
            for k in range(g + 1):
                t = cost.verify_charge(g, k, sampling, lookahead)
                if charged:
                    t = charged + t
                times[plane, g, k] = t
                rewards[plane, g, k] = float(reward_fn(StepOutcome(g, k, [0] * (k + 1), False), t, cost))
                steps[plane, g, k] = cost.step_time(g, k, sampling, lookahead)
    for plane, t in ((_P_DRAFT, cost.t_draft), (_P_FREE, 0.0)):
        times[plane, 0, 0] = t
        rewards[plane, 0, 0] = float(reward_fn(StepOutcome(0, 0, [], False), t, cost))
    return times, rewards, steps


class SpecKVReplayVectorEnv(VectorEnv):
    """``num_envs`` replay environments over full-information traces, batched in numpy.

    Arguments are those of :class:`replay.env.SpecKVReplayEnv` (``logs``/``traces``,
    ``cost_model(s)``, ``allow_cost_model_mismatch``, filters, ``gammas``, ``reward``,
    ``control``, ``lookahead``) plus ``num_envs`` and ``autoreset_mode``. ``reset(options={"episodes": [...]})``
    fixes the first episode of each env; later episodes are drawn uniformly with
    ``self.np_random``. ``control="token"`` (speckv-trace/2 traces only) decides per drafted
    token, as the scalar env does (module docstring).
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
        control: str = "step",
        lookahead: bool = True,
        obs_version: int = DEFAULT_OBS_VERSION,
    ) -> None:
        from .env import _require_rollouts, load_traces, require_obs_v2

        if render_mode is not None:
            raise ValueError("the vectorised replay has no render modes")
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.control = check_control(control)
        self._token = control == "token"
        self.lookahead = check_lookahead(lookahead, control)
        self.obs_version = check_obs_version(obs_version)
        self._v2 = self.obs_version == 2
        filters = {"task": task, "split": split, "compression": compression, "mode": mode}
        trs, found = load_traces(logs, traces, filters)
        if self._token:
            _require_rollouts(trs)
        if self._v2:
            require_obs_v2(trs)
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
        self._cap = gmax  # token mode: SpecKVBaseEnv.token_cap is max(gammas), and the budget
        self._gam = np.asarray(self.gammas, dtype=np.int64)
        self._cms = [cost_of(Episode.of_trace(t)) for t in trs]
        base, lens = self._flatten_traces(trs)
        self._flatten_features(trs, base)
        if self._token:
            self._flatten_rollouts(trs, base)
        grp = self._build_step_tables(trs, get_reward(reward))
        self._fresh = self._fresh_state(trs, base, lens, grp)
        self._fill = np.asarray(EMA_FILL, dtype=np.float64)
        self._keep_or_one = np.array([1.0, EMA_KEEP])
        self._spaces()

        E = self.num_envs
        self._buf = np.zeros((_ROWS, E), dtype=np.int64)
        self._I = self._buf[0:_NI]
        self._S = self._buf[_NI : _NI + (_NOBS if self._v2 else self._nobs)].view(np.float64)
        self._F = self._buf[_SIDE].view(np.float64)
        self._prev_done = np.zeros(E, dtype=bool)
        self._started = False
        self._ep_buf = np.zeros(0, dtype=np.int64)
        self._ep_next = 0

    def _spaces(self) -> None:
        """Action and observation spaces, and the action table :meth:`_actions` validates with."""
        if self._token:
            self._nobs = TOKEN_OBS_DIM
            self.single_action_space = spaces.Discrete(len(TOKEN_ACTIONS))
            values = np.arange(len(TOKEN_ACTIONS), dtype=np.int64)
            self._names = f"token actions {TOKEN_ACTIONS}"
        else:
            self._nobs = OBS_DIM
            self.single_action_space = spaces.Discrete(len(self.gammas))
            values = self._gam
            self._names = f"gammas {self.gammas}"
        low, high = obs_bounds(self.obs_version, self.control)
        self.single_observation_space = spaces.Box(low, high, dtype=np.float32)
        # version 2: the observation's rows in its order (version 1's, the five, token mode's three)
        token_rows = [_O_DRAFTED, _O_SURVIVAL, _O_LAST_P] if self._token else []
        self._out_rows = np.array([*range(OBS_DIM), *range(TOKEN_OBS_DIM, _NOBS), *token_rows], dtype=np.intp)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        # the action's values (gammas, or token mode's 0/1) between two -1 sentinels, so that one
        # take + one min validates the actions
        self._act_ext = np.concatenate([[-1], values, [-1]]).astype(np.int64)
        self._reset_info: tuple[tuple[str, Any], ...] = (("gamma", 0), ("accepted", 0), ("modelled_time", 0.0))
        if self._token:
            self._reset_info += (
                ("verified", False),
                ("drafted", 0),
                ("lookahead", False),
                ("draft_p", np.nan),
                ("step_time", 0.0),
            )

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

    def _flatten_features(self, trs: Sequence[Trace], base: np.ndarray) -> None:
        """Observation version 2: the five features of every flat index (``(5, total)`` float64,
        from :func:`replay.backend.trace_features`, the scalar env's one definition; the padding
        slots hold zeros and are never observed)."""
        if not self._v2:
            self._feat = np.zeros((_NV2, 0))
            return
        from .backend import trace_features

        feat = np.zeros((_NV2, self._L.shape[0]), dtype=np.float64)
        for i, t in enumerate(trs):
            feat[:, base[i] : base[i] + t.n] = trace_features(t).T
        self._feat = feat

    def _obs(self) -> np.ndarray:
        """The observations of every env, ``(num_envs, D)`` float32."""
        if self._v2:
            return self._S.take(self._out_rows, axis=0).T.astype(np.float32)
        return self._S.T.astype(np.float32)

    def _flatten_rollouts(self, trs: Sequence[Trace], base: np.ndarray) -> None:
        """Token mode: the signals each decision shows and the drafted tokens' own probabilities,
        ``W`` entries per flat index (``[fi * W + j]``: j tokens drafted at position fi): entry 0
        the position's own signals, entries j > 0 the rollout's (``TraceBackend.signals``; in
        draft-then-decide, ``TraceBackend.drafted_signals``: the row before);
        ``roll_p[t, j]`` for the token drafted at j (``TraceBackend.draft_token``). Stored as the
        traces' float32 (clipped like the observation; the padding slots hold zeros)."""
        W = self._W = self._gm
        total = self._L.shape[0]
        sig = np.zeros((3, total, W), dtype=np.float32)
        p = np.zeros((total, W), dtype=np.float32)
        for i, t in enumerate(trs):
            b, n = base[i], t.n
            for row, own, roll in zip(
                sig, (t.sig_top1, t.sig_entropy, t.sig_margin), (t.roll_top1, t.roll_entropy, t.roll_margin)
            ):
                row[b : b + n, 0] = own
                if self.lookahead:
                    row[b : b + n, 1:] = roll[:, 1:W]
                else:  # draft-then-decide: token j's own distribution (TraceBackend.drafted_signals)
                    row[b : b + n, 1:] = roll[:, 0 : W - 1]
            p[b : b + n] = t.roll_p[:, :W]
        lo, hi = OBS_LOW[_O_SIGNALS, None, None], OBS_HIGH[_O_SIGNALS, None, None]
        np.clip(sig, lo, hi, out=sig)
        self._tsig = sig.reshape(3, total * W)
        self._tp = p.reshape(total * W)

    def _build_step_tables(self, trs: Sequence[Trace], reward_fn: RewardFn) -> np.ndarray:
        """Step time and reward per (cost model, sampling) group, flattened ``[group, g_eff, k]``
        into ``self._T`` and ``self._R`` (token mode: ``[group, plane, g, k]`` of
        :func:`token_tables`, and the whole step's time in ``self._ST``); returns each trace's
        offset into them."""
        groups: dict[tuple[int, bool], int] = {}
        tabs: list[tuple[np.ndarray, ...]] = []
        grp = np.zeros(len(trs), dtype=np.int64)
        for i, t in enumerate(trs):
            cm = self._cms[i]
            key = (id(cm), t.mode == "sample")
            if key not in groups:
                groups[key] = len(groups)
                if self._token:
                    tabs.append(token_tables(cm, key[1], self._G1 - 1, reward_fn))
                else:
                    tabs.append(step_tables(cm, key[1], self._G1 - 1, reward_fn))
            grp[i] = groups[key] * tabs[0][0].size
        self._T = np.concatenate([tab[0].ravel() for tab in tabs])
        self._R = np.concatenate([tab[1].ravel() for tab in tabs])
        if self._token:
            self._ST = np.concatenate([tab[2].ravel() for tab in tabs])
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
            obs[:OBS_DIM, i] = ob.observe_values(top1, entropy, margin, 0)
            if self._v2:
                obs[_O_V2, i] = self._feat[:, base[i]]
        # token mode before drafting: nothing drafted, survival and last draft probability 1
        obs[_O_SURVIVAL] = 1.0
        obs[_O_LAST_P] = 1.0
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
        return self._obs(), {"episode": self._I[_EP].copy()}

    def _actions(self, actions: Any) -> np.ndarray:
        """Validate a batch of actions; return what they name (gammas, or token mode's 0/1)."""
        a = np.asarray(actions)
        if a.dtype != np.int64:
            if a.dtype.kind not in "iu":
                raise ValueError(f"invalid actions {actions!r}: expected integer indices into {self._names}")
            a = a.astype(np.int64)
        if a.shape != (self.num_envs,):
            raise ValueError(f"invalid actions: expected shape ({self.num_envs},), got {a.shape}")
        # one sentinel on each side: a + 1 clipped into the table maps every action outside
        # 0..n-1 (negative ones too: take() would wrap them) onto a -1 sentinel
        g = self._act_ext.take(a + 1, mode="clip")
        if np.minimum.reduce(g) < 0:
            n = self._act_ext.shape[0] - 2
            bad = a[(a < 0) | (a >= n)]
            raise ValueError(f"invalid action(s) {bad.tolist()}: must be in 0..{n - 1}, indices into {self._names}")
        return g

    def _account_events(self, ones: np.ndarray, rej: np.ndarray) -> None:
        """The acceptance events of the steps verified now (``ones`` ones, then a rejection where
        ``rej``; none where both are 0) into the EMA and the smoothed mean (the run-grouped
        update of :class:`~speckv_env.core.ObservationBuilder`, bit for bit)."""
        S, F = self._S, self._F
        ema = S[_O_EMA]
        upd = 1.0 - ema
        upd *= self._fill.take(ones)
        ema += upd
        ema *= self._keep_or_one.take(rej)
        F[_HITS1] += ones
        F[_TESTS2] += ones
        F[_TESTS2] += rej
        np.divide(F[_HITS1], F[_TESTS2], out=S[_O_MEAN])

    # ---- step ------------------------------------------------------------------------------
    def step(self, actions: Any):
        """One speculation step per env at gamma ``gammas[actions[e]]`` (step mode), or one
        decision per env (token mode: 1 = draft one more token, 0 = verify)."""
        if not self._started:
            raise RuntimeError("step() before reset(): call reset() first")
        if self._token:
            return self._token_step(actions)
        g = self._actions(actions)
        I, S = self._I, self._S  # noqa: E741  (integer state, observation)
        fi = I[_FI]
        # the step rule (replay.steprule), engine clip: limit = max_new_tokens - 1 - t
        geff, k, ones, rej = step_arrays(self._L.take(fi), self._acc.take(fi), g, I[_LIM] - fi)
        self._account_events(ones, rej)
        np.divide(geff, self._gm, out=S[_O_LAST_GAMMA])
        np.divide(k, self._gm, out=S[_O_LAST_ACCEPTED])
        np.less(rej, np.minimum(k, 1), out=S[_O_LAST_FULL], casting="unsafe")  # k >= g_eff > 0
        fn = fi + k
        fn += 1
        done = fn > I[_END]
        at = np.where(done, fi, fn)  # an ended episode keeps the observation's signals
        np.take(self._sig, at, axis=1, out=S[_O_SIGNALS])
        if self._v2:
            np.take(self._feat, at, axis=1, out=S[_O_V2])
        self._posn.take(fn, out=S[_O_POSITION])
        I[_FI] = fn
        ti = geff * self._G1
        ti += k
        ti += I[_GRP]
        reward = self._R.take(ti, mode="clip")  # clip: only envs being autoreset can be out of range
        tm = self._T.take(ti, mode="clip")
        info: dict[str, Any] = {"gamma": geff, "accepted": k, "modelled_time": tm}
        return self._finish(reward, done, info)

    def _token_step(self, actions: Any):
        """Token mode: one decision per env, ``SpecKVBaseEnv._token_step`` batched. A draft
        decision below the cap drafts the rollout's next token and looks ahead (charged
        ``t_draft``; draft-then-decide: charged ``t_draft`` when it first feeds the last token, at
        j >= 1, nothing at j = 0); a stop, a draft that reaches the cap (no lookahead) and a draft with a cap of
        0 verify the tokens drafted by the step rule at gamma = tokens drafted."""
        a = self._actions(actions)
        I, S = self._I, self._S  # noqa: E741  (integer state, observation)
        fi, j = I[_FI], I[_J]
        lim = I[_LIM] - fi
        cap = np.minimum(lim, self._cap)
        np.maximum(cap, 0, out=cap)
        draft = j < cap
        draft &= a == 1
        j1 = j + draft  # tokens drafted after this decision
        cont = j1 < cap
        cont &= draft  # drafted and looked ahead: no verification now
        ver = ~cont
        look = j > 0
        if self.lookahead:
            look &= ~draft  # a chosen stop after drafting: the last token was looked past
            cont_plane, ver_plane = cont * _P_DRAFT, look * _P_VERIFY_LOOKAHEAD
        else:  # draft-then-decide: a draft at j >= 1 feeds token j first (charged), none looks past
            fed = look & draft
            look[:] = False
            cont_plane = np.where(fed, _P_DRAFT, _P_FREE) * cont
            ver_plane = (fed & ver) * _P_VERIFY_FED
        geff, k, ones, rej = step_arrays(self._L.take(fi), self._acc.take(fi), j1, lim)
        ones *= ver
        rej &= ver
        self._account_events(ones, rej)
        np.divide(geff, self._gm, out=S[_O_LAST_GAMMA], where=ver)
        np.divide(k, self._gm, out=S[_O_LAST_ACCEPTED], where=ver)
        np.less(rej, np.minimum(k, 1), out=S[_O_LAST_FULL], where=ver, casting="unsafe")
        fn = k + 1
        fn *= ver
        fn += fi
        done = fn > I[_END]
        jn = j1 * cont  # drafted in the step at the next decision
        ridx = fi * self._W
        ridx += j
        p = self._tp.take(ridx)  # the drafted token's own probability (where draft)
        surv = S[_O_SURVIVAL]
        surv *= p
        np.copyto(surv, 1.0, where=ver)
        np.copyto(S[_O_LAST_P], p)
        np.copyto(S[_O_LAST_P], 1.0, where=ver)
        np.divide(jn, self._gm, out=S[_O_DRAFTED])
        sidx = fn * self._W
        sidx += jn
        np.copyto(sidx, ridx, where=done)  # an ended episode keeps the signals of its last decision
        S[_O_SIGNALS] = self._tsig.take(sidx, axis=1)
        if self._v2:  # the step start's features (the new step's, or this one's once ended)
            np.take(self._feat, np.where(done, fi, fn), axis=1, out=S[_O_V2])
        self._posn.take(fn, out=S[_O_POSITION])
        I[_FI] = fn
        I[_J] = jn
        ti = geff * self._G1
        ti += k
        ti *= ver
        plane = cont_plane + ver_plane
        plane *= self._G1 * self._G1
        ti += plane
        ti += I[_GRP]
        reward = self._R.take(ti, mode="clip")  # clip: only envs being autoreset can be out of range
        tm = self._T.take(ti, mode="clip")
        draft_p = np.full(self.num_envs, np.nan)
        np.copyto(draft_p, p, where=draft)
        info: dict[str, Any] = {
            "gamma": geff * ver,
            "accepted": k * ver,
            "modelled_time": tm,
            "verified": ver,
            "drafted": j1,
            "lookahead": look,
            "draft_p": draft_p,
            "step_time": self._ST.take(ti, mode="clip"),
        }
        return self._finish(reward, done, info)

    def _finish(self, reward: np.ndarray, done: np.ndarray, info: dict[str, Any]):
        """Both modes, after the state moved: time, end flags, episode summaries and autoreset."""
        I, F = self._I, self._F  # noqa: E741
        F[_TIME] += info["modelled_time"]
        terminated = done & (I[_EOS] == 1)
        truncated = done ^ terminated
        any_done = np.count_nonzero(done) > 0
        if any_done:
            # only where done: an env may have spent no time yet (draft-then-decide's free first draft)
            info["episode_tps"] = np.divide(F[_LEN], F[_TIME], out=np.full(self.num_envs, np.nan), where=done)
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
                for key, value in self._reset_info:
                    info[key][idx] = value
                if any_done:
                    info["_episode_tps"] = done & ~pd
            self._prev_done = terminated | truncated
            return self._obs(), reward, terminated, truncated, info
        # SAME_STEP
        obs = self._obs()
        if any_done:
            idx = np.flatnonzero(done)
            final = np.full(self.num_envs, None, dtype=object)
            for i in idx.tolist():
                final[i] = obs[i].copy()
            info["final_obs"] = final
            info["_final_obs"] = done.copy()
            self._start(idx, self._draw_episodes(idx.shape[0]))
            obs[idx] = self._obs()[idx]
        return obs, reward, terminated, truncated, info
