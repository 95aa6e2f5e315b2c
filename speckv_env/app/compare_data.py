"""The comparison's settings and data: :class:`CompareConfig`, the policy names, and
:class:`_Data` (every trace with its per-episode constants and cached vector envs)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from speckv_env.core import DEFAULT_GAMMAS, CostModel, check_obs_version

if TYPE_CHECKING:
    from replay.costs import CostModelSet

POLICY_GROUPS = (
    "fixed",
    "hf_heuristic",
    "cost_aware",
    "speckv_mlp",
    "epsilon_greedy",
    "ucb1",
    "thompson",
    "exp3",
    "linucb",
    "ppo",
    "oracle",
    "survival",
    "token",
)
"""Policy groups of the comparison; ``token``: token mode's stopping rules (traces with rollouts)."""
BANDITS = ("epsilon_greedy", "ucb1", "thompson", "exp3", "linucb")
DISPLAY = {
    "hf_heuristic": "hf-heuristic",
    "cost_aware": "cost-aware",
    "epsilon_greedy": "epsilon-greedy",
    "ucb1": "ucb1",
    "thompson": "thompson",
    "exp3": "exp3",
    "linucb": "linucb",
    "ppo": "ppo",
    "oracle": "oracle",
}
BEST_FIXED = "best-fixed(train)"
LEARNED = ("mlp-time", "mlp-tokens", "survival(train)", "epsilon-greedy", "ucb1", "thompson", "exp3", "linucb", "ppo")
SPLITS = ("heldout", "loto", "loco")
VAL_SPLITS = ("val", "validation")


@dataclass
class CompareConfig:
    """Settings of a comparison (defaults: the full comparison; :meth:`quick` for demos/tests)."""

    seeds: int = 5
    """number of seeds for every stochastic policy (bandits, MLP, PPO)"""
    gammas: tuple[int, ...] = DEFAULT_GAMMAS
    """the gamma set (action space)"""
    splits: tuple[str, ...] = SPLITS
    """which splits to run: heldout, loto (leave one task out), loco (leave one compression out)"""
    policies: tuple[str, ...] = POLICY_GROUPS
    """policy groups to include (see POLICY_GROUPS)"""
    bandit_steps: int = 10_000
    """online training steps of each bandit on the training episodes (per fold and seed)"""
    paper_recorded_gammas: tuple[int, ...] = (8,)
    """paper mode: evaluate on the runs recorded at these gammas. At the largest (8) every gamma
    <= 8 is determined at every recorded step, so nothing has to be clipped; () = all runs"""
    bandit_splits: tuple[str, ...] = ("heldout",)
    """splits on which the bandits run (their per-step online evaluation is the slowest part;
    add "loto"/"loco" when time allows)"""
    mlp_rollout_steps: int = 10_000
    """random-gamma rollout steps that label the MLP's training data (per fold and seed)"""
    mlp_epochs: int = 15
    """MLP training epochs"""
    mlp_batch_size: int = 1024
    """MLP minibatch size"""
    ppo_steps: int = 50_000
    """PPO environment steps (per fold and seed)"""
    ppo_splits: tuple[str, ...] = ("heldout",)
    """splits on which PPO is trained (it is the slowest learner; add loto/loco if time allows)"""
    ppo_n_envs: int = 8
    """vectorised replay envs feeding PPO"""
    ppo_kwargs: dict[str, Any] = field(default_factory=lambda: {"n_steps": 256, "batch_size": 256, "n_epochs": 5})
    """PPOAgent keyword arguments"""
    ppo_token_steps: int = 1_000_000
    """token mode's PPO (``ppo-token(train)``): decisions of training (1M: it keeps improving up to
    there on synthetic data; about a minute on the 2-core CPU host), 64 envs, discount 1"""
    n_boot: int = 2000
    """bootstrap resamples (>= 1000)"""
    level: float = 0.95
    """confidence level of the intervals"""
    tensorboard: bool = True
    """write TensorBoard runs under out_dir/tb"""
    progress: bool = True
    """tqdm progress bars"""
    boot_seed: int = 12345
    """seed of the bootstrap resamples"""
    obs_version: int = 0
    """the observation version every policy decides on (speckv_env.core.OBS_SPECS): 1, 2, or 0 = 2
    when every trace is speckv-trace/2, else 1 (the comparison records the version it used)"""

    @classmethod
    def quick(cls, **kw: Any) -> CompareConfig:
        """Few seeds and steps, fewer bandits: seconds, for demos and tests."""
        base: dict[str, Any] = {
            "seeds": 2,
            "bandit_steps": 1500,
            "mlp_rollout_steps": 1500,
            "mlp_epochs": 4,
            "ppo_steps": 1024,
            "ppo_n_envs": 4,
            "ppo_kwargs": {"n_steps": 128, "batch_size": 128, "n_epochs": 2},
            "ppo_token_steps": 16_384,
            "n_boot": 1000,
            "policies": (
                "fixed",
                "hf_heuristic",
                "cost_aware",
                "speckv_mlp",
                "ucb1",
                "thompson",
                "linucb",
                "ppo",
                "oracle",
                "survival",
                "token",
            ),
        }
        base.update(kw)
        return cls(**base)


class _Data:
    """All traces with their per-episode constants, and cached vector envs.

    ``cost_models``: a :class:`replay.costs.CostModelSet` (models found beside logs: each trace
    is matched by pair, compression, device and draft fingerprint, and conflicts are errors) or
    a mapping by compression (in-memory models, looked up by compression)."""

    def __init__(
        self,
        traces: Sequence[Any],
        cost_models: Mapping[str, CostModel],
        gammas: Sequence[int],
        obs_version: int = 1,
    ) -> None:
        from replay.backend import resolve_cost_model
        from replay.costs import CostModelSet, Episode
        from replay.env import require_obs_v2

        self.traces = list(traces)
        if not self.traces:
            raise ValueError("no traces to compare on")
        self.obs_version = check_obs_version(obs_version)
        if self.obs_version == 2:
            require_obs_v2(self.traces)
        self.cms: Mapping[str, CostModel] = cost_models if isinstance(cost_models, CostModelSet) else dict(cost_models)
        self.gammas = tuple(gammas)
        if isinstance(self.cms, CostModelSet):
            self.cm = [self.cms.match(Episode.of_trace(t)) for t in self.traces]
        else:
            self.cm = [resolve_cost_model(self.cms, t.compression, f"trace {t.trace_id!r}") for t in self.traces]
        self.N = np.array([t.n for t in self.traces], dtype=np.float64)
        self.t_target = np.array([cm.t_target for cm in self.cm], dtype=np.float64)
        self.task = np.array([t.task for t in self.traces])
        self.compression = np.array([t.compression for t in self.traces])
        self.mode = np.array([t.mode for t in self.traces])
        self.split = np.array([t.split for t in self.traces])
        self.trace_id = np.array([t.trace_id for t in self.traces])
        self.prompt = np.array([prompt_key(t) for t in self.traces])
        self._venvs: dict[Any, Any] = {}
        self._counts: dict[int, np.ndarray] = {}

    def cost_group(self) -> np.ndarray:
        """A label per episode naming its cost model: the compression, or where one compression
        has several models (several devices or pairs), compression, device and pair."""
        ids = {id(cm): cm for cm in self.cm}
        per_comp: dict[str, set[int]] = {}
        for c, cm in zip(self.compression, self.cm):
            per_comp.setdefault(str(c), set()).add(id(cm))
        return np.array(
            [
                str(c) if len(per_comp[str(c)]) == 1 else f"{c} ({ids[id(cm)].device}, {ids[id(cm)].pair})"
                for c, cm in zip(self.compression, self.cm)
            ]
        )

    def fixed_counts(self, g: int) -> np.ndarray:
        """Per episode, the steps of fixed gamma ``g`` as counts ``(episodes, g + 1, g + 1)`` of
        (gamma drafted, accepted): they do not depend on the cost model, so the episode can be
        priced under any model (:meth:`fixed_time_under`)."""
        from replay.steprule import step

        if g not in self._counts:
            out = np.zeros((len(self.traces), g + 1, g + 1))
            for i, tr in enumerate(self.traces):
                L, acc, t = tr.L, tr.accept, 0
                while t < tr.n:
                    ge, k, _, _ = step(int(L[t]), bool(acc[t]), g, tr.max_new_tokens - 1 - t)
                    out[i, ge, k] += 1
                    t += k + 1
            self._counts[g] = out
        return self._counts[g]

    def fixed_time_under(self, g: int, idx: np.ndarray, cm: CostModel) -> np.ndarray:
        """Modelled time of fixed gamma ``g`` on episodes ``idx``, every step priced by ``cm``
        (each episode keeps its own decoding mode)."""
        counts = self.fixed_counts(g)[idx]
        out = np.zeros(len(idx))
        for sampling in (False, True):
            sel = (self.mode[idx] == "sample") == sampling
            if sel.any():
                tab = np.nan_to_num(cm.step_time_table(list(range(g + 1)), sampling))
                out[sel] = (counts[sel] * tab[None]).sum(axis=(1, 2))
        return out

    def groups(self, idx: np.ndarray) -> list[tuple[tuple[str, str], np.ndarray]]:
        out = []
        for c in sorted(set(self.compression[idx])):
            for m in sorted(set(self.mode[idx])):
                sel = idx[(self.compression[idx] == c) & (self.mode[idx] == m)]
                if sel.size:
                    out.append(((c, m), sel))
        return out

    def venv(self, key: Any, idx: np.ndarray):
        from replay.vector import SpecKVReplayVectorEnv

        v = self._venvs.get(key)
        if v is None:
            v = SpecKVReplayVectorEnv(
                num_envs=len(idx),
                traces=[self.traces[i] for i in idx],
                cost_models=self.cms,
                gammas=self.gammas,
                obs_version=self.obs_version,
            )
            self._venvs[key] = v
        return v

    def env_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of a replay env over (some of) these traces."""
        return {"cost_models": self.cms, "gammas": self.gammas, "obs_version": self.obs_version}

    def summary(self) -> dict[str, Any]:
        """The data set as results.json describes it."""
        labels = self.cost_group()
        return {
            "episodes": len(self.traces),
            "tokens": float(self.N.sum()),
            "tasks": sorted(set(self.task)),
            "compressions": sorted(set(self.compression)),
            "modes": sorted(set(self.mode)),
            "splits": {s: int((self.split == s).sum()) for s in sorted(set(self.split))},
            "prompts": len(set(self.prompt)),
            "pairs": sorted({t.pair for t in self.traces}),
            "devices": sorted({t.device for t in self.traces}),
            "synthetic": bool(all(t.meta.get("synthetic") for t in self.traces)),
            "obs_version": self.obs_version,
            "cost_models": {g: self.cm[int(np.flatnonzero(labels == g)[0])].to_dict() for g in sorted(set(labels))},
        }


def resolve_obs_version(requested: int, traces: Sequence[Any]) -> int:
    """The comparison's observation version: ``requested`` (1 or 2), or for 0 (auto) 2 when every
    trace is ``speckv-trace/2`` (their prompt tokens and target signals supply version 2), else 1."""
    if requested == 0:
        return 2 if traces and all(t.has_rollouts for t in traces) else 1
    return check_obs_version(requested)


def prompt_key(t: Any) -> str:
    """The prompt an episode decodes (the cluster of the bootstrap): task and prompt id, or the
    trace id when the trace records no prompt id."""
    return f"{t.task}/{t.prompt_id}" if t.prompt_id else str(t.trace_id)


def load_traces(logs: Any, traces: Any, cost_models: Any) -> tuple[list[Any], Mapping[str, CostModel]]:
    """Traces and cost models from ``logs`` (a folder/file or list; None: the shipped data set),
    or ``traces`` + ``cost_models`` in memory.

    Files are read by :func:`replay.env.load_traces`, the replay environments' loader: the cost
    models found beside several folders are collected in a :class:`replay.costs.CostModelSet`
    (each trace is later matched by pair, compression, device and draft fingerprint, and two
    different models for one key are an error: a later folder never silently replaces an earlier
    folder's model), and logs holding no traces are an error. ``cost_models`` given with ``logs``
    replace the found ones for the compressions they name (re-scoring, as with
    ``allow_cost_model_mismatch=True``: no matching checks)."""
    from replay.costs import CostModelSet
    from replay.env import load_traces as load_replay_traces

    if traces is not None:
        if cost_models is None:
            raise ValueError("traces= needs cost_models= ({compression: CostModel})")
        cms = cost_models if isinstance(cost_models, Mapping) else {t.compression: cost_models for t in traces}
        return list(traces), cms if isinstance(cms, CostModelSet) else dict(cms)
    trs, found = load_replay_traces(logs, None, {})
    if not cost_models:
        return trs, found
    return trs, _by_compression(trs, found, cost_models)


def _by_compression(trs: Sequence[Any], found: CostModelSet, cost_models: Any) -> dict[str, CostModel]:
    """One cost model per compression of ``trs``: the explicit one (by compression, level, ``"*"``,
    or one model for all; unchecked), else the trace's model among ``found``. A plain mapping by
    compression is then enough only if it is unambiguous, so it is resolved per trace here."""
    from replay.costs import Episode, resolve

    explicit = dict(cost_models) if isinstance(cost_models, Mapping) else {"*": cost_models}
    resolved: dict[str, CostModel] = {}
    for t in trs:
        cm = resolve(Episode.of_trace(t), None, explicit, found, allow_mismatch=True)
        prev = resolved.setdefault(t.compression, cm)
        if prev is not cm:
            raise ValueError(
                f"compression {t.compression!r} has several cost models in these logs; pass cost_models= for it"
            )
    return resolved
