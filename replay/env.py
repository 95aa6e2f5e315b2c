"""``SpecKVReplay-v0``: the SpecKV environment replayed from recorded logs (no models, no torch)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from speckv_env.base_env import OBS_VERSION_DOC, TOKEN_MODE_DOC, SpecKVBaseEnv, action_to_index
from speckv_env.core import (
    DEFAULT_GAMMAS,
    DEFAULT_OBS_VERSION,
    OBS_SPEC,
    CostModel,
    check_control,
    check_lookahead,
    check_obs_version,
    episode_summary,
    step_tables,
)

from .backend import TraceBackend
from .costs import CostModelSet, Episode, load_cost_models, resolver
from .schema import canonical_splits
from .trace import PathLike, Trace, read_traces

DEFAULT_TRACES_DIR = Path(__file__).resolve().parent.parent / "speckv_env" / "data" / "traces"
"""Where the shipped profiling data set lives (``speckv_env/data/traces/``)."""

_INT_TYPES = (int, np.int64, np.int32, np.intp)


def _obs_table() -> str:
    rows = [
        f"    | {i:<3} | {name:<17} | {lo:<4g} | {hi:<4g} | {desc} |" for i, (name, lo, hi, desc) in enumerate(OBS_SPEC)
    ]
    head = (
        "    | Num | Observation       | Min  | Max  | Description |\n"
        "    |-----|-------------------|------|------|-------------|"
    )
    return head + "\n" + "\n".join(rows)


def default_logs() -> Path:
    """The shipped profiling data set, or a clear error while none is shipped."""
    d = DEFAULT_TRACES_DIR
    if d.is_dir() and any(d.glob("*.parquet")):
        return d
    raise FileNotFoundError(
        f"no default replay data is shipped yet (expected Parquet traces under {d}); "
        "pass logs=<file, folder or list of speckv-trace/1 files>, traces=[...] (in memory), "
        "or source='speckv-paper' for the imported SpecKV paper step logs"
    )


def _paths(logs: PathLike | Sequence[PathLike]) -> list[Path]:
    return [Path(logs)] if isinstance(logs, (str, Path)) or hasattr(logs, "__fspath__") else [Path(p) for p in logs]


def _keep(value: str, want: None | str | Sequence[str]) -> bool:
    return want is None or (value == want if isinstance(want, str) else value in want)


def load_traces(
    logs: PathLike | Sequence[PathLike] | None, traces: Sequence[Trace] | None, filters: Mapping[str, Any]
) -> tuple[list[Trace], CostModelSet]:
    """The traces an environment replays (``traces=`` in memory, else read from ``logs`` or the
    shipped data set), filtered, and the cost models found beside the files (every folder's,
    with conflicts between folders reported)."""
    filters = {**filters, "split": canonical_splits(filters.get("split"))}
    found = CostModelSet()
    where = "the traces passed"
    if traces is not None:
        if logs is not None:
            raise ValueError("pass either logs= or traces=, not both")
        trs = [t for t in traces if all(_keep(getattr(t, k), v) for k, v in filters.items())]
    else:
        paths = _paths(logs if logs is not None else default_logs())
        where = ", ".join(str(p) for p in paths)
        trs = read_traces(paths, **filters)
        for folder in dict.fromkeys(p if p.is_dir() else p.parent for p in paths):
            found.update(load_cost_models(folder))
    if not trs:
        raise ValueError(f"no traces left after the filters {filters} in {where}")
    return trs, found


def _is_step_log(paths: Sequence[Path]) -> bool:
    import pyarrow.parquet as pq

    from .schema import STEPS_SCHEMA_VERSIONS_READ

    for p in paths:
        files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
        for f in files[:1]:
            try:
                md = pq.read_schema(f).metadata or {}
            except Exception:  # malformed files are reported by the reader
                return False
            return md.get(b"speckv_schema", b"").decode() in STEPS_SCHEMA_VERSIONS_READ
    return False


def _require_rollouts(traces: Sequence[Trace]) -> None:
    """Token mode replays the draft's rollouts: every trace must be ``speckv-trace/2``."""
    old = [t for t in traces if not t.has_rollouts]
    if old:
        t = old[0]
        raise ValueError(
            f"control='token' needs speckv-trace/2 traces (with the draft's rollouts), but {len(old)} of "
            f"{len(traces)} are {t.schema_version}, e.g. {t.trace_id!r} from {t.source}: re-record them with "
            "`speckv profile` (step mode still replays them)"
        )


def require_obs_v2(traces: Sequence[Trace]) -> None:
    """Observation version 2 reads the prompt's tokens, the draft's top-1 tokens and the target's
    signals: every trace must be ``speckv-trace/2`` (a ValueError naming the first file that is not)."""
    old = [t for t in traces if not t.has_rollouts]
    if old:
        t = old[0]
        raise ValueError(
            f"obs_version=2 needs speckv-trace/2 traces (prompt tokens, the draft's top-1 tokens and the target's "
            f"signals), but {len(old)} of {len(traces)} are {t.schema_version}, e.g. {t.trace_id!r} from {t.source}: "
            "re-record them with `speckv profile`, or use obs_version=1"
        )


class SpecKVReplayEnv(SpecKVBaseEnv):
    """Placeholder; the docstring is filled in below from OBS_SPEC."""

    def __init__(
        self,
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
        render_mode: str | None = None,
        source: str | None = None,
        on_undetermined: str = "raise",
        paper_features: bool = False,
        recorded_gamma: None | int | Sequence[int] = None,
        allow_cost_model_mismatch: bool = False,
        control: str = "step",
        lookahead: bool = True,
        obs_version: int = DEFAULT_OBS_VERSION,
    ) -> None:
        filters = {"task": task, "split": split, "compression": compression, "mode": mode}
        backend: Any
        check_control(control)
        check_lookahead(lookahead, control)
        check_obs_version(obs_version)
        if source is not None or (logs is not None and traces is None and _is_step_log(self._paths(logs))):
            if obs_version == 2:
                where = source if source is not None else ", ".join(str(p) for p in self._paths(logs or []))
                raise ValueError(
                    f"obs_version=2 needs full-information speckv-trace/2 traces, but {where} is a step log "
                    "(speckv-steps: no prompt tokens, draft top-1 tokens or target signals): use obs_version=1"
                )
            if control == "token":
                raise ValueError(
                    "control='token' needs full-information traces with the draft's rollouts (speckv-trace/2); "
                    "step logs record only the chosen gamma's outcome"
                )
            if source is not None and source != "speckv-paper":
                raise ValueError(f"unknown source {source!r}: the only named source is 'speckv-paper'")
            backend = self._step_log_backend(
                logs if source is None else source,
                filters,
                resolver_args=(cost_model, cost_models, allow_cost_model_mismatch),
                on_undetermined=on_undetermined,
                paper_features=paper_features,
                recorded_gamma=recorded_gamma,
            )
        else:
            if paper_features or recorded_gamma is not None:
                raise ValueError("paper_features= and recorded_gamma= apply to step logs (speckv-steps) only")
            trs, found = load_traces(logs, traces, filters)
            if control == "token":
                _require_rollouts(trs)
            if obs_version == 2:
                require_obs_v2(trs)
            backend = TraceBackend(trs, resolver(cost_model, cost_models, found, allow_cost_model_mismatch))
        super().__init__(
            backend,
            gammas=gammas,
            reward=reward,
            render_mode=render_mode,
            control=control,
            lookahead=lookahead,
            obs_version=obs_version,
        )
        # the fast path (TraceBackend.advance) for full-information traces; None: step logs,
        # or the generic SpecKVBaseEnv.step path when set to None by hand (the tests compare both)
        self._trace_backend: TraceBackend | None = backend if type(backend) is TraceBackend else None
        self._tables: dict[tuple[int, bool], tuple[list[list[float]], list[list[float]]]] = {}
        self._gamma_list = list(self.gammas)
        self._n_actions = len(self.gammas)

    # ---- construction helpers ----------------------------------------------------------
    @staticmethod
    def _paths(logs: PathLike | Sequence[PathLike]) -> list[Path]:
        return _paths(logs)

    @staticmethod
    def _keep(value: str, want: None | str | Sequence[str]) -> bool:
        return _keep(value, want)

    @staticmethod
    def _step_log_backend(
        src: Any,
        filters: dict[str, Any],
        resolver_args: tuple[Any, Any, bool],
        on_undetermined: str,
        paper_features: bool,
        recorded_gamma: None | int | Sequence[int],
    ) -> Any:
        from .importers import StepLogBackend, load_step_log

        steps, cms = load_step_log(src, **filters)
        if recorded_gamma is not None:
            # step logs only: keep runs recorded at these gammas (e.g. the largest one, where
            # every smaller gamma's outcome is determined at every recorded step)
            keep = [recorded_gamma] if isinstance(recorded_gamma, int) else list(recorded_gamma)
            first = steps[steps["step"] == 0].set_index("run_id")["gamma"]
            steps = steps[steps["run_id"].map(first).isin(keep)]
            if len(steps) == 0:
                raise ValueError(f"no recorded runs at gamma {keep} in the step log")
        resolve = resolver(resolver_args[0], resolver_args[1], cms, resolver_args[2])
        return StepLogBackend(
            steps,
            lambda run, where: resolve(Episode.of_run(run)),
            on_undetermined=on_undetermined,
            paper_features=paper_features,
        )

    # ---- step logs (StepLogBackend) ------------------------------------------------------
    def _step_log_step(self, action: Any):
        """A step over a censored step log: the recorded step's counterfactual outcome."""
        if self._done:
            raise RuntimeError("step() called on a finished episode: call reset() first")
        requested = self.gammas[action_to_index(action, len(self.gammas), self.gammas)]
        out = self.backend.step(requested)
        cm = self.cost_model
        skipped = bool(out.extra.get("skipped", False))
        if skipped:  # on_undetermined="skip": the step is passed over
            t_model, reward, emitted = 0.0, 0.0, 0
        else:
            t_model = cm.step_time(out.gamma, out.accepted, self.backend.sampling)
            reward = float(self._reward_fn(out, t_model, cm))
            emitted = out.emitted
            self._builder.update(out.gamma, out.accepted, out.events)
        s = self._stats
        s["steps"] += 1
        s["tokens"] += emitted
        s["modelled_s"] += t_model
        self._done = out.done
        if self._v2 and not out.done:  # (full-information traces only: step logs refuse version 2)
            self._features = self.backend.obs_features()  # type: ignore[attr-defined]
        obs = self._builder.observe(self.backend.signals(), self.backend.position(), self._features)
        info: dict[str, Any] = {
            "gamma": out.gamma,
            "requested_gamma": requested,
            "accepted": out.accepted,
            "emitted": emitted,
            "modelled_time": t_model,
            "measured_time": None,
            "position": self.backend.position(),
            **out.extra,
        }
        if out.done:
            info["episode_summary"] = episode_summary(s, cm, out.finish_reason)
        terminated = bool(out.done and out.finish_reason == "eos")
        return obs, reward, terminated, bool(out.done) and not terminated, info

    # ---- fast path (TraceBackend) --------------------------------------------------------
    def _step_tables(self, b: TraceBackend) -> tuple[list[list[float]], list[list[float]]]:
        """Per (cost model, sampling): modelled time and reward for every (g_eff, k), as lists
        (python floats index faster than numpy scalars)."""
        key = (id(b.cost_model), b.sampling)
        tab = self._tables.get(key)
        if tab is None:
            times, rewards = step_tables(b.cost_model, b.sampling, max(self.gammas), self._reward_fn)
            tab = self._tables[key] = (times.tolist(), rewards.tolist())
        return tab

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = super().reset(seed=seed, options=options)
        b = self._trace_backend
        if b is not None:
            self._tt, self._rt = self._step_tables(b)
            info["trace_id"] = b.trace.trace_id
        return obs, info

    def step(self, action: Any):
        """One speculation step at gamma ``gammas[action]``, or one decision in token mode (see
        the class docstring)."""
        if self._token:
            return super().step(action)
        b = self._trace_backend
        if b is None:
            return self._step_log_step(action)
        # SpecKVBaseEnv.step fused for TraceBackend.advance (identical results; tested)
        if self._done:
            raise RuntimeError("step() called on a finished episode: call reset() first")
        if type(action) in _INT_TYPES and 0 <= action < self._n_actions:
            g = self._gamma_list[action]
        else:
            g = self._gamma_list[action_to_index(action, self._n_actions, self.gammas)]
        t = b._pos
        geff, k, ones, rejected, tokens, pos, done, top1, entropy, margin = b.advance(g)
        bl = self._builder
        bl.update_run(geff, k, ones, rejected)
        t_model = self._tt[geff][k]
        reward = self._rt[geff][k]
        s = self._stats
        s["steps"] += 1
        s["tokens"] += k + 1
        s["modelled_s"] += t_model
        self._text.extend(tokens)
        if self._v2:  # the features where the draft signals are taken: the new position, or t once ended
            self._features = b.obs_features(t if done else pos)
        obs = bl.observe_values(top1, entropy, margin, pos, self._features)
        info: dict[str, Any] = {
            "gamma": geff,
            "requested_gamma": g,
            "accepted": k,
            "tokens": tokens,
            "emitted": k + 1,
            "modelled_time": t_model,
            "measured_time": None,
            "draft_time": None,
            "verify_time": None,
            "position": pos,
        }
        if not done:
            return obs, reward, False, False, info
        self._done = True
        finish = b.trace.finish_reason
        info["episode_summary"] = episode_summary(s, self.cost_model, finish)
        terminated = finish == "eos"
        return obs, reward, terminated, not terminated, info


SpecKVReplayEnv.__doc__ = f"""Speculative decoding replayed from recorded logs; gamma (drafted tokens) is the action.

    ## Description
    A draft model proposes gamma tokens, the target verifies them in one forward pass and
    keeps the longest agreeing prefix plus one token of its own. Choosing gamma trades
    draft work against accepted tokens. This environment replays *full-information traces*
    (``speckv-trace/1``, see replay/SCHEMA.md): because greedy decoding (and sampling with
    position-keyed randomness) emits the same text whatever gammas are chosen, one trace per
    prompt answers every policy exactly, in microseconds, with no models and no torch.
    It can also replay censored step logs (``speckv-steps/2`` or ``/1``, e.g. the SpecKV paper's CSV
    imported by :mod:`replay.importers`), which answer only the gammas their data determines.

    ## Action Space
    ``Discrete(len(gammas))``: action ``i`` drafts ``gammas[i]`` tokens (default gammas
    0..8; 0 = a plain target step). Near the end of an episode gamma is clipped to the
    tokens still to come (``info["gamma"]`` is the gamma used, ``info["requested_gamma"]``
    the one asked for). Invalid actions raise ``ValueError``.

    ## Observation Space
    ``Box(13,)`` float32 (observation version 1, the default; version 2: ``Box(18,)``, see
    "Observation versions"), only what a controller knows *before* choosing gamma
    (post-draft features of the same step would be leakage):

{_obs_table()}

    ## Rewards
    ``reward="cost"`` (default): emitted tokens - modelled step time / target-only token
    time, so a higher return means a higher modelled end-to-end tokens/s (zero = as fast as
    target-only decoding). ``"tokens"``: tokens emitted per step (the SpecKV paper's reward;
    the largest gamma always wins it). ``"time"``: minus the modelled step time in
    target-only token units. Step times come from the episode's calibrated
    :class:`~speckv_env.core.CostModel` (by compression), so replay is deterministic.

    ## Starting State
    ``reset()`` picks an episode (trace) uniformly with ``self.np_random`` (or
    ``options={{"episode": i}}``) and starts at output position 0 with fresh running stats.

    ## Episode End
    Terminated when the trace's last token is EOS (``finish_reason == "eos"``); truncated
    when it ends at ``max_new_tokens``. ``info["episode_summary"]`` carries tokens, steps and
    modelled tokens/s at the last step.

    ## Arguments
    - ``logs``: a ``speckv-trace/1`` file, folder of part files, or list of them, or a
      ``speckv-steps`` step log. The cost models ``cost-<compression>.json`` beside them are
      matched to each episode by pair, compression, device and draft fingerprint
      (:mod:`replay.costs`; conflicts and episodes without a model raise). Default: the
      shipped profiling data set under ``speckv_env/data/traces/``.
    - ``traces``: in-memory list of :class:`~replay.trace.Trace` (tests, examples).
    - ``cost_model`` (one for all) or ``cost_models`` (``{{compression: CostModel}}``):
      explicit models win over the files; one measured for another pair, compression, device
      or draft than the episode's raises unless ``allow_cost_model_mismatch=True``.
    - ``task``, ``split``, ``compression``, ``mode``: keep only matching episodes (a value or
      a list of values).
    - ``gammas``: the gamma set (default 0..8; at most the traces' ``gamma_max``).
    - ``reward``: ``"cost"`` | ``"tokens"`` | ``"time"``.
    - ``render_mode``: ``None`` or ``"ansi"``.
    - ``obs_version``: 1 (default) or 2 (see "Observation versions"; ``speckv-trace/2`` traces only).
    - ``source="speckv-paper"``: replay the SpecKV paper's imported step logs.
    - ``on_undetermined`` (step logs only): what to do when the requested gamma's outcome is not
      determined by the log (the recorded step accepted all of its gamma and more was asked):
      ``"raise"`` (default) raises :class:`~replay.importers.UndeterminedOutcomeError`;
      ``"clip"`` answers the largest determined gamma instead (the tokens the step drafted;
      ``info["gamma"]`` shows it, ``info["undetermined"]`` is True); ``"skip"`` passes the
      step over (reward 0, no modelled time, no tokens, ``info["skipped"]`` True).
      Step-log replay follows the *recorded* steps: the position advances as recorded
      whatever gamma is chosen, and each step is answered counterfactually (a per-step,
      bandit-style evaluation), so it is not an exact replay of a policy's trajectory.
    - ``paper_features`` (step logs only): observe the paper's *post-draft* signals of the
      current step (computed over the tokens drafted in that very step). They are leakage for
      a controller that chooses gamma before drafting; off by default, when the previous
      step's signals are observed instead (zeros at the first step). Entropy is converted
      from bits to nats; the paper recorded no top-1/top-2 margin (observed as 0).
    - ``control``: ``"step"`` (default) or ``"token"``; ``lookahead`` (token mode, default True):
      its variant, look-ahead or draft-then-decide (``False``), below.

{OBS_VERSION_DOC}
{TOKEN_MODE_DOC}    Needs ``speckv-trace/2`` traces (the draft's rollouts); on version 1 traces or step logs
    token mode is an error naming the file.

    ## Vector form
    ``gym.make_vec("SpecKVReplay-v0", num_envs=256, vectorization_mode="vector_entry_point",
    traces=..., cost_model=...)`` gives :class:`replay.vector.SpecKVReplayVectorEnv`: the
    same trajectories, bit for bit, batched in numpy (full-information traces only), in step
    mode and in token mode (``control="token"``).

    ## Example
    >>> import gymnasium as gym, speckv_env
    >>> from replay.trace import synthetic_dataset
    >>> from speckv_env.core import CostModel
    >>> env = gym.make("SpecKVReplay-v0", traces=synthetic_dataset(8), cost_model=CostModel.unit())
    >>> obs, info = env.reset(seed=0)
    >>> obs, reward, terminated, truncated, info = env.step(4)
    """
