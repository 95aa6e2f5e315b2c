"""One small interface for every gamma policy, safe persistence, and the agent registry.

An :class:`Agent` maps an observation (see :data:`speckv_env.core.OBS_SPEC`) to an index into
its ``gammas`` (the same index the environment's ``Discrete`` action space takes):

=====================================  =================================================
``act(obs) -> int``                    one decision (deterministic given the agent's state,
                                       except randomised bandits, which draw from their own
                                       seeded ``numpy.random.Generator``)
``act_batch(obs[N, D]) -> int[N]``     many decisions (vectorised where cheap)
``learn(obs, action, reward,           online update after a step (no-op for non-learners);
next_obs, info)``                      ``info`` is the env's step info (``emitted``,
                                       ``modelled_time``, ``gamma``, ``accepted`` ...)
``reset()``                            new episode: clears per-episode state only
``bind(env)``                          take the env's cost model and sampling mode
``save(path)`` / ``load(path)``        JSON (config + small tables) or, for agents with
                                       tensors, one safetensors file whose metadata holds
                                       the same JSON. Never pickle.
=====================================  =================================================

Observation versions (:data:`speckv_env.core.OBS_SPECS`): an agent decides on observations of one
version, ``agent.obs_version`` (1 unless made with ``make_agent(..., obs_version=2)``, or trained by
:func:`agents.training.train_agent` on an env of version 2, which makes it with the env's), saved
with it; ``bind(env)`` with an env of another version raises a ValueError naming both versions.

File format ``speckv-agent/1``: ``{"format": ..., "kind": ..., "obs_version": 1 | 2, "config": {...},
"state": {...}}`` (files without ``obs_version``, saved before versions existed, are version 1)
either as a JSON document, or as the ``__metadata__`` of a safetensors file (``config`` and
``state`` JSON-encoded strings) whose tensors are the agent's arrays. :func:`load_agent`
dispatches on ``kind``; anything malformed raises :class:`AgentFormatError` naming the file.
The JSON is strict (any JSON reader reads it): a non-finite float (a NaN loss, an infinite
bound) is written as ``{"__float__": "nan" | "inf" | "-inf"}`` and read back as that float;
files with bare ``NaN`` tokens, as older versions wrote them, still load.
"""

from __future__ import annotations

import json
import math
import struct
from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from speckv_env.base_env import check_gammas
from speckv_env.core import (
    DEFAULT_GAMMAS,
    OBS_INDEX,
    CostModel,
    check_obs_version,
    check_same_obs_version,
    obs_dim,
    obs_version_of_dim,
)

FORMAT = "speckv-agent/1"
#: verify-time slope (per extra verified token, in target-step units) assumed when an agent
#: only knows the observation's ``cost_ratio`` (no CostModel bound or given).
DEFAULT_VERIFY_SLOPE = 0.05

I_COST_RATIO = OBS_INDEX["cost_ratio"]


class AgentFormatError(ValueError):
    """A saved agent file is malformed, truncated, or holds the wrong kind of agent."""


_FLOAT_TAG = "__float__"
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _encode_floats(x: Any) -> Any:
    """``x`` with every non-finite float tagged (strict JSON has no NaN or Infinity) and numpy
    values made plain."""
    if isinstance(x, dict):
        return {k: _encode_floats(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_encode_floats(v) for v in x]
    if isinstance(x, (np.ndarray, np.generic)):
        return _encode_floats(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return {_FLOAT_TAG: "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}
    return x


def _decode_floats(x: Any) -> Any:
    if isinstance(x, dict):
        if len(x) == 1 and x.get(_FLOAT_TAG) in _NONFINITE:
            return _NONFINITE[x[_FLOAT_TAG]]
        return {k: _decode_floats(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode_floats(v) for v in x]
    return x


def _dumps(x: Any, **kw: Any) -> str:
    return json.dumps(_encode_floats(x), allow_nan=False, **kw)


AGENTS: dict[str, type[Agent]] = {}


def register(cls: type[Agent]) -> type[Agent]:
    AGENTS[cls.kind] = cls
    return cls


def _ensure_registered() -> None:
    # importing the package modules fills AGENTS (heavy deps like torch/SB3 are imported lazily)
    import agents  # noqa: F401


def make_agent(name: str, obs_version: int | None = None, **kwargs: Any) -> Agent:
    """Build an agent by registry name (see :data:`AGENTS`), e.g. ``make_agent("ucb1", seed=0)``;
    ``obs_version``: the observation version it decides on (default 1)."""
    _ensure_registered()
    try:
        cls = AGENTS[name]
    except KeyError:
        raise ValueError(f"unknown agent {name!r}: choose one of {', '.join(sorted(AGENTS))}") from None
    agent = cls(**kwargs)
    if obs_version is not None:
        agent.set_obs_version(obs_version)
    return agent


def env_obs_version(env: Any) -> int | None:
    """The observation version an env observes: its own, a wrapper's inner env's, a vector env's
    or an SB3 VecEnv's (``get_attr``); None where the object does not say (then nothing is checked)."""
    for obj in (env, getattr(env, "unwrapped", None), getattr(env, "venv", None)):
        v = getattr(obj, "obs_version", None)
        if isinstance(v, int):
            return v
    get_attr = getattr(env, "get_attr", None)
    if get_attr is not None:
        try:
            v = get_attr("obs_version", indices=[0])[0]
        except (AttributeError, IndexError, TypeError):
            return None
        return v if isinstance(v, int) else None
    return None


def cost_from_ratio(cost_ratio: float, gamma_max: int, verify_slope: float = DEFAULT_VERIFY_SLOPE) -> CostModel:
    """A cost model known only through the observation's ``cost_ratio`` (t_draft / t_target):
    target step = 1 time unit, verify time 1 + verify_slope * gamma."""
    return CostModel.unit(max(int(gamma_max), 1), draft_ratio=max(float(cost_ratio), 0.0), verify_slope=verify_slope)


def _logit(a: float) -> float:
    a = min(max(a, 1e-300), 1.0)
    if a >= 1.0:
        return math.inf
    return math.log(a) - math.log1p(-a)


class GammaTable:
    """gamma index as a function of the acceptance rate alpha, exact to ~1e-12 in alpha.

    ``rule="time"``: argmax over gammas of ``cost.expected_tokens_per_second(alpha, g)``
    (Leviathan et al.); ``rule="tokens"``: argmax of the expected tokens per step
    ``(1 - a^(g+1)) / (1 - a)`` (the SpecKV paper's objective: the largest gamma wins for
    every alpha > 0). The argmax is piecewise constant in alpha: we locate each change on a
    fine grid, then bisect it to machine precision, so a lookup is one ``bisect`` over a few
    thresholds and equals the brute-force argmax (ties: the smaller gamma for "time", the
    larger for "tokens") except within ~1e-12
    of a threshold. Thresholds are kept both in alpha and in logit(alpha) space, so a model
    that outputs a logit needs no sigmoid.
    """

    def __init__(
        self,
        cost: CostModel | None,
        gammas: Sequence[int],
        sampling: bool = False,
        rule: str = "time",
        grid: int = 2049,
    ) -> None:
        if rule not in ("time", "tokens"):
            raise ValueError(f"unknown gamma rule {rule!r}: choose 'time' or 'tokens'")
        if rule == "time" and cost is None:
            raise ValueError("rule 'time' needs a cost model")
        self.gammas = tuple(gammas)
        self.rule = rule
        self.cost = cost
        self.sampling = sampling
        alphas = np.linspace(0.0, 1.0, grid)
        best = [self.best_exact(float(a)) for a in alphas]
        thr: list[float] = []
        choices = [best[0]]
        for j in range(1, grid):
            if best[j] != best[j - 1]:
                lo, hi = float(alphas[j - 1]), float(alphas[j])
                for _ in range(64):
                    mid = 0.5 * (lo + hi)
                    if mid in (lo, hi):
                        break
                    if self.best_exact(mid) == best[j - 1]:
                        lo = mid
                    else:
                        hi = mid
                thr.append(hi)
                choices.append(best[j])
        self.alpha_thresholds = thr
        self.logit_thresholds = [_logit(t) for t in thr]
        self.choices = choices
        self._thr_np = np.asarray(thr, dtype=np.float64)
        self._lthr_np = np.asarray(self.logit_thresholds, dtype=np.float64)
        self._choices_np = np.asarray(choices, dtype=np.int64)

    def value(self, alpha: float, gamma: int) -> float:
        if self.rule == "time":
            assert self.cost is not None
            return self.cost.expected_tokens_per_second(alpha, gamma, self.sampling)
        a = min(max(alpha, 0.0), 1.0 - 1e-9)
        return (1 - a ** (gamma + 1)) / (1 - a)

    def best_exact(self, alpha: float) -> int:
        vals = [self.value(alpha, g) for g in self.gammas]
        if self.rule == "tokens":
            # expected tokens grow with gamma for every alpha > 0; in floating point a^(g+1)
            # underflows for tiny alpha and makes ties, which go to the larger gamma here
            m = max(vals)
            return max((i for i, v in enumerate(vals) if v == m), key=lambda i: self.gammas[i])
        return int(np.argmax(vals))

    def index(self, alpha: float) -> int:
        return self.choices[bisect_right(self.alpha_thresholds, alpha)]

    def index_logit(self, z: float) -> int:
        return self.choices[bisect_right(self.logit_thresholds, z)]

    def index_batch(self, alpha: np.ndarray) -> np.ndarray:
        return self._choices_np[np.searchsorted(self._thr_np, alpha, side="right")]

    def index_logit_batch(self, z: np.ndarray) -> np.ndarray:
        return self._choices_np[np.searchsorted(self._lthr_np, z, side="right")]


def env_lookahead(env: Any) -> bool | None:
    """Token mode's variant of ``env`` (True: look-ahead, False: draft-then-decide; a gymnasium
    env, its wrappers, the vector replay or an SB3 VecEnv), or None where the object does not say."""
    for obj in (env, getattr(env, "unwrapped", None), getattr(env, "venv", None)):
        v = getattr(obj, "lookahead", None)
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
    get_attr = getattr(env, "get_attr", None)
    if get_attr is not None:
        try:
            v = get_attr("lookahead", indices=[0])[0]
        except (AttributeError, IndexError, TypeError):
            return None
        return bool(v) if isinstance(v, (bool, np.bool_)) else None
    return None


def check_token_variant(name: str, lookahead: bool, env: Any) -> None:
    """Refuse to run a token-mode agent built (tuned, trained) for one variant of token mode in an
    env of the other (``lookahead``: :data:`speckv_env.core.TOKEN_OBS_SPEC` means different
    signals in each)."""
    from speckv_env.core import token_variant

    v = env_lookahead(env)
    if v is not None and v != bool(lookahead):
        raise ValueError(
            f"{name} was built for token mode's {token_variant(lookahead)} variant (lookahead={bool(lookahead)}) "
            f"but the env runs the {token_variant(v)} variant (lookahead={v}): make the env with "
            f"lookahead={bool(lookahead)}, or build (tune, train) {name} with lookahead={v}"
        )


class Agent:
    """Base class of every gamma policy. Subclasses set ``kind`` and register themselves."""

    kind: ClassVar[str] = "agent"
    #: the action mode the agent decides in ("token": token mode's stopping rules; PPO per instance)
    control: str = "step"
    #: the observation version the agent decides on (:meth:`set_obs_version`; saved with it)
    obs_version: int = 1
    #: whether what the agent learned is shaped by the observation version (MLP, LinUCB, PPO,
    #: the survival models): such an agent refuses observations of another version; the others
    #: (rules, context-free bandits, the oracle) read only values every version has in the same
    #: place and take the env's version when bound (:meth:`check_obs_version`)
    obs_state: ClassVar[bool] = False
    #: whether learn() changes the policy (the training loop skips calling it otherwise)
    learns: bool = False  # a class default; an agent may decide per instance (cost_aware with estimate="beta")

    def __init__(self, gammas: Sequence[int] = DEFAULT_GAMMAS) -> None:
        self.gammas: tuple[int, ...] = check_gammas(gammas)
        self.name: str = self.kind

    @property
    def obs_dim(self) -> int:
        """Length of the observation the agent decides on (its version's, in its action mode)."""
        return obs_dim(self.obs_version, self.control)

    def set_obs_version(self, version: int) -> Agent:
        """Decide on observations of ``version`` (1 or 2): before training (agents whose learned
        state has the observation's shape resize it in :meth:`_on_obs_version`)."""
        self.obs_version = check_obs_version(version)
        self._on_obs_version()
        return self

    def _on_obs_version(self) -> None:
        """Hook: the observation version changed (agents with observation-shaped state rebuild it)."""

    def check_obs_version(self, version: int, what: str = "the env") -> None:
        """Observations of ``version`` are coming: an agent without observation-shaped state
        (:attr:`obs_state` False) takes that version; the others raise a ValueError naming both
        versions if it is not theirs."""
        if not self.obs_state:
            if version != self.obs_version:
                self.set_obs_version(version)
            return
        check_same_obs_version(self.obs_version, version, f"agent {self.name!r}", what)

    def _check_obs_batch(self, obs: np.ndarray) -> None:
        if obs.ndim != 2 or obs.shape[1] != self.obs_dim:
            other = obs_version_of_dim(obs.shape[-1], self.control) if obs.ndim == 2 else None
            if other is not None:
                self.check_obs_version(other, f"this batch ({obs.shape[-1]} values)")
                if obs.shape[1] == self.obs_dim:
                    return
            raise ValueError(f"act_batch expects an array of shape (N, {self.obs_dim}), got {obs.shape}")

    # ---- decisions -------------------------------------------------------------------
    def act(self, obs: np.ndarray) -> int:
        raise NotImplementedError

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs)
        self._check_obs_batch(obs)
        return np.fromiter((self.act(o) for o in obs), dtype=np.int64, count=len(obs))

    def learn(self, obs: np.ndarray, action: int, reward: float, next_obs: np.ndarray, info: dict[str, Any]) -> None:
        """Online update after one step; a no-op for agents that do not learn online."""

    def reset(self) -> None:
        """Start of an episode: clear per-episode state, keep what was learned."""

    def begin_episode(self, env: Any, info: dict[str, Any]) -> None:
        """Called by the training/evaluation loops after ``env.reset()``; default: ``reset()``.
        Agents that must know the episode (the oracle) override it."""
        self.reset()

    def bind(self, env: Any) -> Agent:
        """Check the env's gamma set and observation version match and remember nothing else
        (see CostModelMixin)."""
        u = getattr(env, "unwrapped", env)
        version = env_obs_version(env)
        if version is not None:
            self.check_obs_version(version)
        env_gammas = tuple(getattr(u, "gammas", self.gammas))
        if env_gammas != self.gammas:
            raise ValueError(f"{self.name}: agent gammas {self.gammas} differ from the env's {env_gammas}")
        return self

    def gamma_of(self, index: int) -> int:
        return self.gammas[index]

    # ---- persistence -----------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-able)."""
        return {"gammas": list(self.gammas)}

    def get_state(self) -> dict[str, Any]:
        """Learned state as JSON-able small tables."""
        return {}

    def set_state(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"unexpected state keys {sorted(state)}")

    def get_tensors(self) -> dict[str, np.ndarray]:
        """Learned arrays too big for JSON (saved with safetensors)."""
        return {}

    def set_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        if tensors:
            raise ValueError(f"unexpected tensors {sorted(tensors)}")

    def save(self, path: str | Path) -> Path:
        """Write the agent to ``path``: JSON, or safetensors when the agent has tensors."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tensors = self.get_tensors()
        doc = {
            "format": FORMAT,
            "kind": self.kind,
            "obs_version": self.obs_version,
            "config": self.get_config(),
            "state": self.get_state(),
        }
        if not tensors:
            p.write_text(_dumps(doc, indent=1))
            return p
        from safetensors.numpy import save_file

        meta = {
            "format": FORMAT,
            "kind": self.kind,
            "obs_version": str(self.obs_version),
            "config": _dumps(doc["config"]),
            "state": _dumps(doc["state"]),
        }
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(p), metadata=meta)
        return p

    @classmethod
    def load(cls, path: str | Path) -> Agent:
        agent = load_agent(path)
        if cls is not Agent and not isinstance(agent, cls):
            raise AgentFormatError(f"{path}: holds a {agent.kind!r} agent, not a {cls.kind!r} agent")
        return agent

    @classmethod
    def from_saved(
        cls, config: dict[str, Any], state: dict[str, Any], tensors: dict[str, np.ndarray], obs_version: int = 1
    ) -> Agent:
        agent = cls(**config)
        agent.set_obs_version(obs_version)  # before the state, whose shapes may follow the version
        agent.set_tensors(tensors)
        agent.set_state(state)
        return agent

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "gammas")
        return f"{type(self).__name__}({cfg})"


def _read_doc(p: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"agent file {p} does not exist") from None
    except IsADirectoryError:
        raise AgentFormatError(f"{p}: is a directory, not an agent file") from None
    if not data.strip():
        raise AgentFormatError(f"{p}: empty file, not a saved agent")
    if data.lstrip()[:1] == b"{":
        try:
            parsed = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AgentFormatError(f"{p}: not valid agent JSON (truncated or corrupted?): {e}") from None
        if not isinstance(parsed, dict):
            raise AgentFormatError(f"{p}: agent JSON must be an object, got {type(parsed).__name__}")
        return parsed, {}
    # safetensors: 8-byte little-endian header size, JSON header, tensor data
    if len(data) < 8:
        raise AgentFormatError(f"{p}: truncated ({len(data)} bytes): neither agent JSON nor safetensors")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise AgentFormatError(
            f"{p}: truncated or not a safetensors file (header says {n} bytes, file has {len(data) - 8})"
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
        meta = header.get("__metadata__") or {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise AgentFormatError(f"{p}: corrupted safetensors header: {e}") from None
    try:
        from safetensors.numpy import load as st_load

        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error type
        raise AgentFormatError(f"{p}: truncated or corrupted safetensors data: {e}") from None
    doc: dict[str, Any] = {"format": meta.get("format"), "kind": meta.get("kind")}
    if "obs_version" in meta:
        doc["obs_version"] = meta["obs_version"]
    for key in ("config", "state"):
        try:
            doc[key] = json.loads(meta.get(key, "{}"))
        except json.JSONDecodeError as e:
            raise AgentFormatError(f"{p}: metadata {key!r} is not valid JSON: {e}") from None
    return doc, tensors


def load_agent(path: str | Path) -> Agent:
    """Load any saved agent, dispatching on its ``kind``. Raises AgentFormatError if malformed."""
    _ensure_registered()
    p = Path(path)
    doc, tensors = _read_doc(p)
    if doc.get("format") != FORMAT:
        raise AgentFormatError(f"{p}: not a saved agent (format {doc.get('format')!r}, expected {FORMAT!r})")
    kind = doc.get("kind")
    if kind not in AGENTS:
        raise AgentFormatError(f"{p}: unknown agent kind {kind!r} (known: {', '.join(sorted(AGENTS))})")
    config, state = _decode_floats(doc.get("config")), _decode_floats(doc.get("state", {}))
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise AgentFormatError(f"{p}: 'config' and 'state' must be JSON objects")
    raw = doc.get("obs_version", 1)  # files saved before observation versions: version 1
    try:
        version = check_obs_version(int(raw) if isinstance(raw, str) and raw.isdigit() else raw)
    except ValueError as e:
        raise AgentFormatError(f"{p}: {e}") from None
    try:
        return AGENTS[kind].from_saved(config, state, tensors, obs_version=version)
    except AgentFormatError:
        raise
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise AgentFormatError(f"{p}: malformed {kind!r} agent: {type(e).__name__}: {e}") from None


class CostModelMixin:
    """Where an agent gets its cost model, in order of preference:

    1. an explicit ``cost_model=`` (CostModel or its dict), saved with the agent;
    2. the env given to ``bind(env)``: its current ``cost_model`` (re-read at each decision, so
       a data set mixing compressions is followed episode by episode) and ``sampling`` mode;
    3. the observation alone: ``cost_ratio`` (t_draft / t_target) with
       :data:`DEFAULT_VERIFY_SLOPE` for the verify time (see :func:`cost_from_ratio`).

    Tables (:class:`GammaTable`) are cached per cost model object / per cost_ratio value.
    """

    gammas: tuple[int, ...]
    rule: str = "time"

    def _init_cost(self, cost_model: CostModel | dict | None, sampling: bool, verify_slope: float) -> None:
        if isinstance(cost_model, dict):
            cost_model = CostModel.from_dict(cost_model)
        self.cost_model: CostModel | None = cost_model
        self.sampling = bool(sampling)
        self.verify_slope = float(verify_slope)
        self._env: Any = None
        self._tables: dict[Any, GammaTable] = {}
        self._last_key: Any = None
        self._last_table: GammaTable | None = None

    def _cost_config(self) -> dict[str, Any]:
        return {
            "cost_model": self.cost_model.to_dict() if self.cost_model is not None else None,
            "sampling": self.sampling,
            "verify_slope": self.verify_slope,
        }

    def bind(self, env: Any) -> Any:
        Agent.bind(self, env)  # type: ignore[arg-type]
        u = getattr(env, "unwrapped", env)
        self._env = u
        backend = getattr(u, "backend", None)
        if backend is not None:
            self.sampling = bool(getattr(backend, "sampling", self.sampling))
        return self

    def table_for(self, cost_ratio: float) -> GammaTable:
        if self.rule == "tokens":
            key: Any = "tokens"
        elif self.cost_model is not None:
            key = "fixed"
        elif self._env is not None:
            key = self._env.cost_model
        else:
            key = cost_ratio
        last = self._last_key
        if key is last or (not isinstance(key, CostModel) and not isinstance(last, CostModel) and key == last):
            return self._last_table  # type: ignore[return-value]
        t = self._tables.get(id(key) if isinstance(key, CostModel) else key)
        if t is None or (isinstance(key, CostModel) and t.cost is not key):
            if self.rule == "tokens":
                cost = None
            elif isinstance(key, CostModel):
                cost = key
            elif key == "fixed":
                cost = self.cost_model
            else:
                cost = cost_from_ratio(cost_ratio, max(self.gammas), self.verify_slope)
            t = GammaTable(cost, self.gammas, self.sampling, rule=self.rule)
            if len(self._tables) > 256:
                self._tables.clear()
            self._tables[id(key) if isinstance(key, CostModel) else key] = t
        self._last_key, self._last_table = key, t
        return t
