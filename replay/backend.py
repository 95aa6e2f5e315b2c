"""A :class:`speckv_env.core.Backend` over full-information traces (exact replay).

Episode ``i`` is trace ``i``. A step follows the step rule of :mod:`replay.steprule` (engine
clip: g_eff = min(g, max_new_tokens - 1 - t), k = min(L[t], g_eff), emits tokens[t : t + k + 1]
and moves to t + k + 1). Measured times are not replayed
(``draft_s``/``verify_s`` are None); the environment prices each step with the episode's
cost model, matched to the trace by :mod:`replay.costs`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from speckv_env.core import CostModel, DraftSignals, EpisodeInfo, StepOutcome, compression_level, pre_decision_features

from . import steprule
from .costs import Episode
from .trace import Trace

CostModels = CostModel | Mapping[str, CostModel]


def resolve_cost_model(cost_models: CostModels, compression: str, where: str = "") -> CostModel:
    """Pick the cost model for ``compression``: a single model applies to all; a mapping is
    looked up by exact compression, then by level (none/int8/nf4), then by ``"*"``. (Lookup by
    compression only: environments match by pair, device and fingerprint, see replay.costs.)"""
    if isinstance(cost_models, CostModel):
        return cost_models
    for key in (compression, compression_level(compression), "*"):
        if key in cost_models:
            return cost_models[key]
    have = ", ".join(sorted(cost_models)) or "none"
    raise ValueError(
        f"no cost model for compression {compression!r}{' (' + where + ')' if where else ''}; have: {have}. "
        f"Pass cost_models={{{compression!r}: CostModel(...)}} or save cost-{compression}.json beside the logs."
    )


def trace_features(trace: Trace) -> np.ndarray:
    """Observation version 2's five features at every output position of a ``speckv-trace/2``
    trace, ``(N, 5)`` float32 (:func:`speckv_env.core.pre_decision_features` on the trace's
    columns: the lookup over ``prompt_tokens + tokens[:t]``, ``draft_argmax[t]``, the target's
    signals at t - 1, none at t = 0). Version 1 traces lack those columns: a ValueError naming
    the file."""
    if not trace.has_rollouts:
        raise ValueError(
            f"{trace.source}: trace {trace.trace_id!r} is {trace.schema_version}: observation version 2 needs "
            "speckv-trace/2 traces (prompt tokens, the draft's top-1 tokens and the target's signals; record "
            "them with speckv profile), or use obs_version=1"
        )
    n, start = trace.n, int(trace.prompt_tokens.shape[0])
    ctx = np.concatenate([trace.prompt_tokens.astype(np.int64), trace.tokens.astype(np.int64)])
    top1 = np.full(n, np.nan, dtype=np.float32)
    ent = np.full(n, np.nan, dtype=np.float32)
    top1[1:], ent[1:] = trace.tgt_top1[:-1], trace.tgt_entropy[:-1]
    return pre_decision_features(ctx, start + np.arange(n), trace.draft_argmax, top1, ent, trace.mode == "sample")


def trace_is_exact(trace: Trace) -> bool:
    """True when ``trace`` was recorded with row-invariant forwards (``meta["exact"]``), so its
    outcomes for other gammas are what live decoding would give. Older traces do not say so:
    their counterfactual answers can differ from live play at near-ties (compressed targets)."""
    return bool((trace.meta or {}).get("exact", False))


class TraceBackend:
    """Replays full-information traces; implements :class:`speckv_env.core.Backend`."""

    def __init__(self, traces: Sequence[Trace], cost_models: CostModels | Callable[[Episode], CostModel]) -> None:
        """``cost_models``: one model, a mapping by compression (:func:`resolve_cost_model`), or
        a function of the trace's :class:`~replay.costs.Episode` (:func:`replay.costs.resolver`)."""
        self.traces = list(traces)
        if not self.traces:
            raise ValueError("TraceBackend needs at least one trace (the filters may have removed them all)")
        if callable(cost_models) and not isinstance(cost_models, CostModel):
            self.cost_models = [cost_models(Episode.of_trace(t)) for t in self.traces]
        else:
            self.cost_models = [
                resolve_cost_model(cost_models, t.compression, f"trace {t.trace_id!r}") for t in self.traces
            ]
        # gammas up to the smallest recorded gamma_max are answerable for every episode
        self.gamma_max = min(t.gamma_max for t in self.traces)
        self._cache: dict[int, tuple[list[int], list[int], list[bool], list[float], list[float], list[float]]] = {}
        self._features: dict[int, np.ndarray] = {}  # observation version 2, per trace (computed on first use)
        self._load(0)

    # ---- internals ------------------------------------------------------------------
    def _lists(self, index: int) -> tuple[list[int], list[int], list[bool], list[float], list[float], list[float]]:
        c = self._cache.get(index)
        if c is None:
            t = self.traces[index]
            c = (
                t.tokens.tolist(),
                t.L.tolist(),
                t.accept.tolist(),
                t.sig_top1.tolist(),
                t.sig_entropy.tolist(),
                t.sig_margin.tolist(),
            )
            self._cache[index] = c
        return c

    def _load(self, index: int) -> None:
        tr = self.traces[index]
        self.index = index
        self.trace = tr
        self.max_new_tokens = tr.max_new_tokens
        self.compression = tr.compression
        self.sampling = tr.mode == "sample"
        self.cost_model = self.cost_models[index]
        self._tokens, self._L, self._accept, self._top1, self._ent, self._margin = self._lists(index)
        self._n = tr.n
        self._pos = 0
        self._j = 0  # token mode: tokens drafted so far in the current step

    # ---- Backend protocol -----------------------------------------------------------
    def num_episodes(self) -> int:
        return len(self.traces)

    def reset(self, index: int, seed: int | None) -> EpisodeInfo:
        """Start episode ``index`` (``seed`` is unused: a trace has no randomness left)."""
        if not 0 <= index < len(self.traces):
            raise IndexError(f"episode {index} out of range: {len(self.traces)} traces")
        self._load(index)
        tr = self.trace
        return EpisodeInfo(
            prompt_id=tr.prompt_id,
            task=tr.task,
            compression=tr.compression,
            mode=tr.mode,
            max_new_tokens=tr.max_new_tokens,
            extra={"trace_id": tr.trace_id, "split": tr.split, "n": tr.n, "exact": trace_is_exact(tr)},
        )

    def signals(self) -> DraftSignals:
        """The draft's signals at the current decision: at the step's position, or (token mode,
        j tokens drafted) those of the distribution its rollout drafts token j from."""
        t, j = self._pos, self._j
        if j == 0:
            return DraftSignals(self._top1[t], self._ent[t], self._margin[t])
        tr = self.trace
        return DraftSignals(float(tr.roll_top1[t, j]), float(tr.roll_entropy[t, j]), float(tr.roll_margin[t, j]))

    def drafted_signals(self) -> DraftSignals:
        """Token mode, draft-then-decide (j >= 1 tokens drafted): the signals of the distribution
        the rollout drafted token j from (``roll_*[t, j - 1]``)."""
        t, j = self._pos, self._j
        if j < 1:
            raise RuntimeError("drafted_signals() needs a drafted token in the current step")
        tr = self.trace
        i = j - 1
        return DraftSignals(float(tr.roll_top1[t, i]), float(tr.roll_entropy[t, i]), float(tr.roll_margin[t, i]))

    # ---- token mode (speckv-trace/2 traces) ---------------------------------------------
    def draft_token(self, lookahead: bool = True) -> float:
        """Draft the rollout's next token at this step; return its own draft probability.
        (``lookahead`` changes the cost only, which the environment charges.)"""
        tr = self.trace
        if not tr.has_rollouts:
            raise ValueError(
                f"{tr.source}: trace {tr.trace_id!r} is {tr.schema_version} (no draft rollouts): token mode "
                "needs speckv-trace/2 traces (record them with speckv profile)"
            )
        t, j = self._pos, self._j
        if j >= min(tr.gamma_max, self.max_new_tokens - 1 - t):
            raise ValueError(f"cannot draft more than {j} tokens at position {t}: verify")
        self._j = j + 1
        return float(tr.roll_p[t, j])

    def verify(self) -> StepOutcome:
        """Verify the tokens drafted at this step (the step rule at gamma = tokens drafted)."""
        j, self._j = self._j, 0
        return self.step(j)

    def position(self) -> int:
        return self._pos

    def obs_features(self, position: int | None = None) -> np.ndarray:
        """Observation version 2's five features at ``position`` (default: the current step's
        start) of the current trace (:func:`trace_features`)."""
        f = self._features.get(self.index)
        if f is None:
            f = self._features[self.index] = trace_features(self.trace)
        return f[self._pos if position is None else position]

    def step(self, gamma: int) -> StepOutcome:
        t = self._pos
        n = self._n
        if t >= n:
            raise RuntimeError("step() past the end of the trace: reset first")
        g, k, ones, rejected = steprule.step(self._L[t], self._accept[t], int(gamma), self.max_new_tokens - 1 - t)
        self._pos = t + k + 1
        done = self._pos >= n
        return StepOutcome(
            gamma=g,
            accepted=k,
            tokens=self._tokens[t : t + k + 1],
            done=done,
            finish_reason=self.trace.finish_reason if done else None,
            events=steprule.events(ones, rejected),
        )

    def advance(self, gamma: int) -> tuple[int, int, int, bool, list[int], int, bool, float, float, float]:
        """:meth:`step` without building a :class:`StepOutcome`: the replay env's fast path.

        Returns ``(g_eff, k, ones, rejected, tokens, position, done, top1, entropy, margin)``: the step
        rule's answer (:func:`replay.steprule.step`), the tokens emitted, the new position, whether
        the trace ended, and the
        draft's signals the next observation shows (at the new position, or at this step's start
        once the trace has ended, as :class:`~speckv_env.base_env.SpecKVBaseEnv` keeps them)."""
        t = self._pos
        n = self._n
        if t >= n:
            raise RuntimeError("advance() past the end of the trace: reset first")
        g, k, ones, rejected = steprule.step(self._L[t], self._accept[t], gamma, self.max_new_tokens - 1 - t)
        pos = self._pos = t + k + 1
        done = pos >= n
        s = t if done else pos
        return g, k, ones, rejected, self._tokens[t:pos], pos, done, self._top1[s], self._ent[s], self._margin[s]

    def close(self) -> None:
        pass
