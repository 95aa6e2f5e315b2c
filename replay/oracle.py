"""The clairvoyant oracle: the gamma sequence of minimum modelled time over a trace.

Replay over a full-information trace is deterministic, and the emitted tokens do not depend
on the gammas, so the fastest policy for a trace is a shortest path over output positions:

    dp[N] = 0
    dp[t] = min over g in gammas of  step_time(g_eff, k) + dp[t + k + 1],
            g_eff = min(g, max_new_tokens - 1 - t),  k = min(L[t], g_eff)   (replay.steprule)

The oracle knows the future (L[t]), so it is not a policy a controller can reach; it is the
ceiling against which regret is measured. The (N x len(gammas)) candidate costs and successor
positions are computed with numpy; only the backward recursion is a loop over positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from speckv_env.core import DEFAULT_GAMMAS, CostModel

from .backend import resolve_cost_model
from .steprule import step, step_arrays
from .trace import Trace


@dataclass
class OracleResult:
    """The oracle's path over one trace.

    ``gammas``: requested gamma at each step of the optimal path (the smallest of tied
    gammas); ``positions``: start position of each step; ``best_gamma[t]``: the optimal
    gamma for a step starting at any position ``t`` (the oracle policy as a lookup table);
    ``total_time``: modelled seconds of the path; ``tokens``: N; ``tokens_per_s``.
    """

    trace_id: str
    gammas: np.ndarray
    positions: np.ndarray
    best_gamma: np.ndarray
    total_time: float
    tokens: int
    tokens_per_s: float

    @property
    def steps(self) -> int:
        return int(self.gammas.shape[0])


def oracle(trace: Trace, cost_model: CostModel, gammas: Sequence[int] = DEFAULT_GAMMAS) -> OracleResult:
    """Minimum-modelled-time gamma sequence for ``trace`` under ``cost_model``."""
    gs = np.asarray(sorted({int(g) for g in gammas}), dtype=np.int64)
    if gs.size == 0 or gs[0] < 0:
        raise ValueError(f"gammas must be non-empty and non-negative, got {tuple(gammas)}")
    if gs[-1] > trace.gamma_max:
        raise ValueError(
            f"gammas go up to {gs[-1]} but trace {trace.trace_id!r} records runs only up to "
            f"gamma_max = {trace.gamma_max}"
        )
    n = trace.n
    table = np.nan_to_num(cost_model.step_time_table(range(int(gs[-1]) + 1), trace.sampling), nan=np.inf)
    t = np.arange(n, dtype=np.int64)[:, None]
    # the step rule at every (position, gamma), engine clip: limit = max_new_tokens - 1 - t
    geff, k, _, _ = step_arrays(
        trace.L.astype(np.int64)[:, None], trace.accept[:, None], gs[None, :], trace.max_new_tokens - 1 - t
    )
    cost = table[geff, k]  # (N, G)
    nxt = t + k + 1
    dp = np.zeros(n + 1)
    choice = np.zeros(n, dtype=np.int64)
    cost_l = cost.tolist()
    nxt_l = nxt.tolist()
    dpl = [0.0] * (n + 1)
    for p in range(n - 1, -1, -1):
        row_c, row_n = cost_l[p], nxt_l[p]
        best, arg = row_c[0] + dpl[row_n[0]], 0
        for j in range(1, len(row_c)):
            v = row_c[j] + dpl[row_n[j]]
            if v < best:
                best, arg = v, j
        dpl[p] = best
        choice[p] = arg
    dp[:] = dpl
    path_g, path_p = [], []
    p = 0
    while p < n:
        j = int(choice[p])
        path_p.append(p)
        path_g.append(int(gs[j]))
        p = int(nxt[p, j])
    total = float(dp[0])
    return OracleResult(
        trace_id=trace.trace_id,
        gammas=np.asarray(path_g, dtype=np.int16),
        positions=np.asarray(path_p, dtype=np.int32),
        best_gamma=gs[choice].astype(np.int16),
        total_time=total,
        tokens=n,
        tokens_per_s=n / total if total > 0 else float("inf"),
    )


def oracle_dataset(
    traces: Sequence[Trace],
    cost_models: CostModel | Mapping[str, CostModel],
    gammas: Sequence[int] = DEFAULT_GAMMAS,
) -> tuple[list[OracleResult], float]:
    """Oracle per trace, and the aggregate tokens/s (total tokens / total modelled time)."""
    res = [
        oracle(tr, resolve_cost_model(cost_models, tr.compression, f"trace {tr.trace_id!r}"), gammas) for tr in traces
    ]
    tot_t = sum(r.total_time for r in res)
    return res, (sum(r.tokens for r in res) / tot_t if tot_t > 0 else float("nan"))


def fixed_gamma_time(trace: Trace, cost_model: CostModel, gamma: int) -> float:
    """Modelled time of replaying ``trace`` at one fixed gamma (a baseline for regret)."""
    L = trace.L
    n = trace.n
    t, total = 0, 0.0
    accept = trace.accept
    while t < n:
        g, k, _, _ = step(int(L[t]), bool(accept[t]), gamma, trace.max_new_tokens - 1 - t)
        total += cost_model.step_time(g, k, trace.sampling)
        t += k + 1
    return total
