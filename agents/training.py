"""Training and evaluation loops for every agent kind, with recordable learning curves.

``train_agent(name, env_factory=... | traces=..., steps=..., seed=...)``:
  * bandits (and CostAwareAnalytic with estimate="beta"): online, one env, ``learn()`` after
    every step;
  * ``speckv_mlp``: rollouts of a behaviour policy (uniformly random gammas, seeded) collect
    (pre-choice obs, acceptance events), then :meth:`agents.mlp.SpecKVMLP.fit`;
  * ``ppo``: stable-baselines3 on a vectorised env (:func:`make_vec_env`: with ``traces=``
    the numpy-batched ``replay.vector`` env through an SB3 VecEnv adapter, else DummyVecEnv),
    in either action mode: ``env_kwargs={"control": "token"}`` trains a token-mode PPOAgent
    (its ``control`` defaults to the env's). :meth:`agents.ppo.PPOAgent.train` wraps the env
    for training only: the token budget's end made terminal (no bootstrapping) and SB3's
    ``VecNormalize`` (token mode's defaults; see agents/ppo.py for why, and for discount 1.0);
    the logged episodic returns are the raw (unnormalised) ones;
  * the rest (fixed, hf_heuristic, cost_aware, oracle) need no training: returned as built.
The curve is kept on the agent as ``agent.train_log`` (a list of dicts, one per finished
episode or fit epoch) and, with ``tb_log_dir``, written to TensorBoard with CleanRL-style tags
``charts/episodic_return``, ``charts/tokens_per_second``, ``charts/mean_gamma``,
``losses/...``, in run folder ``{env}__{agent}__{seed}__{time}``.

``evaluate_agent(agent, env, episodes=None, seed=0)`` runs whole episodes and returns one
record per episode (modelled tokens/s, tokens/step, mean gamma, gamma histogram ...).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from .base import Agent, make_agent

EnvFactory = Callable[[], Any]


def replay_env_factory(traces: Sequence[Any], **env_kwargs: Any) -> EnvFactory:
    """A factory of ``SpecKVReplay-v0`` envs over in-memory traces."""
    import gymnasium as gym

    import speckv_env  # noqa: F401  (registers the envs)

    def make() -> Any:
        return gym.make("SpecKVReplay-v0", traces=traces, **env_kwargs)

    return make


def _factory(
    env_factory: EnvFactory | None, traces: Sequence[Any] | None, env_kwargs: dict[str, Any] | None
) -> EnvFactory:
    if (env_factory is None) == (traces is None):
        raise ValueError("pass exactly one of env_factory= or traces=")
    if env_factory is not None:
        if env_kwargs:
            raise ValueError("env_kwargs applies to traces= only; bake options into env_factory")
        return env_factory
    assert traces is not None
    return replay_env_factory(traces, **(env_kwargs or {}))


class _Writer:
    """TensorBoard SummaryWriter if a log dir is given, else nothing."""

    def __init__(self, tb_log_dir: str | Path | None, run_name: str) -> None:
        self.w = None
        self.run_dir: Path | None = None
        if tb_log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir = Path(tb_log_dir) / run_name
            self.w = SummaryWriter(str(self.run_dir))

    def scalar(self, tag: str, value: float | None, step: int) -> None:
        if self.w is not None and value is not None and np.isfinite(value):
            self.w.add_scalar(tag, float(value), int(step))

    def close(self) -> None:
        if self.w is not None:
            self.w.flush()
            self.w.close()


def begin_episode(agent: Agent, env: Any, info: dict[str, Any]) -> None:
    """Tell the agent a new episode started (agents that need the episode, e.g. the oracle,
    override ``begin_episode``; others just reset)."""
    agent.begin_episode(env, info)


def _episode_record(step: int, ep_return: float, gammas_used: list[int], info: dict[str, Any]) -> dict[str, Any]:
    s = info.get("episode_summary", {})
    tps = s.get("modelled_tps")
    return {
        "global_step": step,
        "episodic_return": ep_return,
        "tokens_per_second": s.get("modelled_tps"),
        "tokens_per_step": s["tokens"] / s["steps"] if s.get("steps") else None,
        "mean_gamma": float(np.mean(gammas_used)) if gammas_used else None,
        "speedup": tps / s["target_only_tps"] if tps is not None and s.get("target_only_tps") else None,
    }


def _log_episode(w: _Writer, rec: dict[str, Any]) -> None:
    st = rec["global_step"]
    w.scalar("charts/episodic_return", rec["episodic_return"], st)
    w.scalar("charts/tokens_per_second", rec["tokens_per_second"], st)
    w.scalar("charts/tokens_per_step", rec["tokens_per_step"], st)
    w.scalar("charts/mean_gamma", rec.get("mean_gamma"), st)
    w.scalar("charts/speedup", rec["speedup"], st)


def run_online(
    agent: Agent,
    env: Any,
    steps: int,
    seed: int = 0,
    writer: _Writer | None = None,
    progress: bool = False,
    learn: bool = True,
) -> list[dict[str, Any]]:
    """Run ``steps`` env steps with ``agent``, calling learn() after each; return episode records."""
    agent.bind(env)
    obs, info = env.reset(seed=seed)
    begin_episode(agent, env, info)
    log: list[dict[str, Any]] = []
    ep_ret, used = 0.0, []
    it: Any = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"train {agent.name}", leave=False)
    for step in it:
        a = agent.act(obs)
        nobs, r, term, trunc, info = env.step(a)
        if learn:
            agent.learn(obs, a, r, nobs, info)
        ep_ret += r
        used.append(agent.gammas[a])
        if term or trunc:
            rec = _episode_record(step + 1, ep_ret, used, info)
            log.append(rec)
            if writer is not None:
                _log_episode(writer, rec)
            obs, info = env.reset()
            begin_episode(agent, env, info)
            ep_ret, used = 0.0, []
        else:
            obs = nobs
    return log


def collect_rollouts(
    env: Any, steps: int, seed: int = 0, behaviour: Agent | None = None, progress: bool = False
) -> dict[str, np.ndarray]:
    """Rollouts of a behaviour policy (default: uniformly random over gammas, seeded).

    Returns arrays ``obs`` (pre-choice observations), ``gamma`` (used), ``accepted``, ``hits``,
    ``misses`` (acceptance events, see :func:`agents.mlp.step_events`), ``emitted``, ``time``.
    """
    from .mlp import step_events

    u = env.unwrapped
    gammas = tuple(u.gammas)
    rng = np.random.default_rng(seed)
    obs, info = env.reset(seed=seed)
    if behaviour is not None:
        behaviour.bind(env)
        begin_episode(behaviour, env, info)
    OBS = np.empty((steps, len(obs)), np.float32)
    G = np.empty(steps, np.int64)
    K = np.empty(steps, np.int64)
    E = np.empty(steps, np.int64)
    T = np.empty(steps, np.float64)
    it: Any = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="rollouts", leave=False)
    for i in it:
        a = behaviour.act(obs) if behaviour is not None else int(rng.integers(len(gammas)))
        OBS[i] = obs
        obs, r, term, trunc, info = env.step(a)
        G[i], K[i], E[i], T[i] = info["gamma"], info["accepted"], info["emitted"], info["modelled_time"]
        if term or trunc:
            obs, info = env.reset()
            if behaviour is not None:
                begin_episode(behaviour, env, info)
    ev = np.array([step_events(int(g), int(k)) for g, k in zip(G, K)], dtype=np.int64).reshape(-1, 2)
    return {"obs": OBS, "gamma": G, "accepted": K, "hits": ev[:, 0], "misses": ev[:, 1], "emitted": E, "time": T}


class ReplayVecEnvAdapter:
    """stable-baselines3 ``VecEnv`` over :class:`replay.vector.SpecKVReplayVectorEnv` (numpy-batched).

    The vector env runs in SAME_STEP autoreset mode, which is SB3's convention: at an episode's
    end the returned observation is the next episode's first, and the last one is in
    ``infos[i]["terminal_observation"]``; ``infos[i]["TimeLimit.truncated"]`` marks truncation,
    i.e. an episode that stopped at the token budget, not at EOS (SB3 bootstraps through it
    unless the env is wrapped in :func:`agents.ppo.budget_end_is_terminal`, as PPOAgent's token
    mode does for training). ``control`` is the vector env's action mode. A finished episode's info also carries
    ``episode_summary = {"modelled_tps": ...}``. Built lazily as a subclass of SB3's VecEnv.
    """

    def __new__(cls, venv: Any):
        from stable_baselines3.common.vec_env.base_vec_env import VecEnv

        class _Adapter(VecEnv):
            def __init__(self, v: Any) -> None:
                self.venv = v
                super().__init__(v.num_envs, v.single_observation_space, v.single_action_space)
                self._actions: np.ndarray | None = None
                self.gammas = tuple(v.gammas)
                self.control = getattr(v, "control", "step")
                self.obs_version = getattr(v, "obs_version", 1)

            def reset(self):
                seed = self._seeds[0] if any(s is not None for s in self._seeds) else None
                obs, _ = self.venv.reset(seed=seed)
                self._reset_seeds()
                return obs

            def step_async(self, actions: np.ndarray) -> None:
                self._actions = np.asarray(actions, dtype=np.int64).reshape(-1)

            def step_wait(self):
                obs, rew, term, trunc, info = self.venv.step(self._actions)
                done = term | trunc
                infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
                if done.any():
                    fin = info["final_obs"]
                    tps = info.get("episode_tps")
                    for i in np.flatnonzero(done).tolist():
                        infos[i]["terminal_observation"] = fin[i]
                        infos[i]["TimeLimit.truncated"] = bool(trunc[i] and not term[i])
                        if tps is not None:
                            infos[i]["episode_summary"] = {"modelled_tps": float(tps[i])}
                return obs, rew.astype(np.float32), done, infos

            def close(self) -> None:
                self.venv.close()

            def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
                return [getattr(self.venv, attr_name)] * len(list(self._get_indices(indices)))

            def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
                setattr(self.venv, attr_name, value)

            def env_method(self, method_name: str, *args: Any, indices: Any = None, **kwargs: Any) -> list[Any]:
                return [getattr(self.venv, method_name)(*args, **kwargs)] * len(list(self._get_indices(indices)))

            def env_is_wrapped(self, wrapper_class: Any, indices: Any = None) -> list[bool]:
                return [False] * len(list(self._get_indices(indices)))

            def get_images(self):
                return [None] * self.num_envs

        return _Adapter(venv)


def make_vec_env(
    env_factory: EnvFactory | None = None,
    n_envs: int = 4,
    seed: int = 0,
    traces: Sequence[Any] | None = None,
    env_kwargs: dict[str, Any] | None = None,
) -> Any:
    """An SB3 VecEnv. With ``traces=``: the numpy-batched replay vector env through
    :class:`ReplayVecEnvAdapter` (falls back to DummyVecEnv if replay.vector is missing);
    with ``env_factory=``: SB3's DummyVecEnv over ``n_envs`` factory-made envs."""
    if traces is not None:
        try:
            from replay.vector import SpecKVReplayVectorEnv
        except ImportError:
            env_factory = replay_env_factory(traces, **(env_kwargs or {}))
        else:
            v = SpecKVReplayVectorEnv(num_envs=n_envs, traces=traces, autoreset_mode="same-step", **(env_kwargs or {}))
            adapter: Any = ReplayVecEnvAdapter(v)
            adapter.seed(seed)
            return adapter
    if env_factory is None:
        raise ValueError("make_vec_env needs env_factory= or traces=")
    from stable_baselines3.common.vec_env import DummyVecEnv

    venv = DummyVecEnv([env_factory for _ in range(n_envs)])
    venv.seed(seed)
    return venv


def _ppo_callback(writer: _Writer, log: list[dict[str, Any]], gammas: Sequence[int], token: bool = False):
    """CleanRL-style episode records and loss tags during SB3 training. Returns are the env's
    raw rewards (``VecNormalize.get_original_reward`` when training normalises them). In token
    mode the actions are draft (1) / verify (0): the record's ``mean_gamma`` becomes
    ``draft_fraction`` (the share of draft decisions)."""
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import VecNormalize

    values = (0, 1) if token else tuple(gammas)

    class CleanRLTags(BaseCallback):
        def _init_callback(self) -> None:
            n = self.training_env.num_envs
            self.ret = np.zeros(n)
            self.used: list[list[int]] = [[] for _ in range(n)]

        def _on_step(self) -> bool:
            infos, rewards, dones = self.locals["infos"], self.locals["rewards"], self.locals["dones"]
            if isinstance(self.training_env, VecNormalize):
                rewards = self.training_env.get_original_reward()
            actions = self.locals.get("actions")
            self.ret += rewards
            for i, info in enumerate(infos):
                if actions is not None:
                    self.used[i].append(values[int(np.asarray(actions).reshape(-1)[i])])
                if dones[i] and "episode_summary" in info:
                    rec = _episode_record(self.num_timesteps, float(self.ret[i]), self.used[i], info)
                    if token:
                        rec["draft_fraction"] = rec.pop("mean_gamma")
                        writer.scalar("charts/draft_fraction", rec["draft_fraction"], rec["global_step"])
                    log.append(rec)
                    _log_episode(writer, rec)
                if dones[i]:
                    self.ret[i] = 0.0
                    self.used[i] = []
            return True

        def _on_rollout_end(self) -> None:
            vals = self.model.logger.name_to_value
            for k in (
                "policy_gradient_loss",
                "value_loss",
                "entropy_loss",
                "approx_kl",
                "clip_fraction",
                "explained_variance",
            ):
                if f"train/{k}" in vals:
                    writer.scalar(f"losses/{k}", vals[f"train/{k}"], self.num_timesteps)

    return CleanRLTags()


def _build_agent(name: str, u: Any, seed: int, agent_kwargs: dict[str, Any] | None) -> Agent:
    """``make_agent(name, ...)`` with the env's gammas and observation version and, where the
    agent takes them, the seed and the env's action mode (``control``, and token mode's variant
    ``lookahead``) as defaults."""
    import inspect

    from .base import AGENTS, _ensure_registered

    kw = dict(agent_kwargs or {})
    kw.setdefault("gammas", tuple(u.gammas))
    _ensure_registered()
    params = inspect.signature(AGENTS[name].__init__).parameters if name in AGENTS else {}
    if "seed" in params:
        kw.setdefault("seed", seed)
    if "control" in params:
        kw.setdefault("control", getattr(u, "control", "step"))
    if "lookahead" in params and getattr(u, "control", "step") == "token":
        kw.setdefault("lookahead", bool(getattr(u, "lookahead", True)))  # token mode's variant
    kw.setdefault("obs_version", getattr(u, "obs_version", 1))
    return make_agent(name, **kw)


def train_agent(
    name: str | Agent,
    env_factory: EnvFactory | None = None,
    traces: Sequence[Any] | None = None,
    steps: int = 20_000,
    seed: int = 0,
    tb_log_dir: str | Path | None = None,
    progress: bool = True,
    agent_kwargs: dict[str, Any] | None = None,
    env_kwargs: dict[str, Any] | None = None,
    n_envs: int = 4,
    fit_kwargs: dict[str, Any] | None = None,
    run_name: str | None = None,
) -> Agent:
    """Build (or take) an agent and train it for ``steps`` env steps; see the module docs.

    ``name``: a registry name (``make_agent(name, seed=seed, gammas=env gammas, **agent_kwargs)``)
    or an Agent instance (trained in place). ``fit_kwargs`` go to SpecKVMLP.fit.
    """
    factory = _factory(env_factory, traces, env_kwargs)
    env = factory()
    u = env.unwrapped
    agent = name if isinstance(name, Agent) else _build_agent(name, u, seed, agent_kwargs)
    env_id = getattr(getattr(env, "spec", None), "id", None) or type(u).__name__
    run = run_name or f"{env_id}__{agent.name}__{seed}__{int(time.time())}"
    writer = _Writer(tb_log_dir, run)
    log: list[dict[str, Any]] = []
    try:
        if agent.kind == "ppo":
            if traces is not None:
                venv = make_vec_env(n_envs=n_envs, seed=seed, traces=traces, env_kwargs=env_kwargs)
            else:
                venv = make_vec_env(factory, n_envs=n_envs, seed=seed)
            cast(Any, agent).train(  # a PPOAgent
                venv,
                steps,
                tb_log_dir=str(writer.run_dir) if writer.run_dir else None,
                callback=_ppo_callback(writer, log, agent.gammas, getattr(agent, "control", "step") == "token"),
                progress=progress,
            )
            venv.close()
        elif agent.kind == "speckv_mlp":
            agent.bind(env)
            data = collect_rollouts(env, steps, seed=seed, progress=progress)

            def on_epoch(ep: int, loss: float) -> None:
                log.append({"epoch": ep, "loss": loss})
                writer.scalar("losses/bce", loss, ep)

            cast(Any, agent).fit(
                data["obs"], data["hits"], data["misses"], log=on_epoch, progress=progress, **(fit_kwargs or {})
            )
        elif agent.learns:
            log = run_online(agent, env, steps, seed=seed, writer=writer, progress=progress)
        else:
            agent.bind(env)
    finally:
        writer.close()
    agent.train_log = log  # type: ignore[attr-defined]
    return agent


def evaluate_agent(
    agent: Agent, env: Any, episodes: int | None = None, seed: int = 0, learn: bool = False
) -> list[dict[str, Any]]:
    """Run whole episodes; one record per episode.

    Episode i replays the env's episode ``i % num_episodes`` (``episodes=None``: each once),
    reset with seed ``seed + i``. ``learn=True`` keeps online learners learning during
    evaluation. Record keys: episode, prompt_id, task, compression, return, tokens, steps,
    modelled_s, tokens_per_second (modelled), tokens_per_step, mean_gamma, gamma_hist
    ({gamma: count} of the gammas the agent chose), speedup (over target-only decoding).
    """
    agent.bind(env)
    u = env.unwrapped
    n_avail = u.backend.num_episodes()
    episodes = n_avail if episodes is None else int(episodes)
    out = []
    for i in range(episodes):
        obs, info = env.reset(seed=seed + i, options={"episode": i % n_avail})
        begin_episode(agent, env, info)
        ret, hist = 0.0, dict.fromkeys(agent.gammas, 0)
        while True:
            a = agent.act(obs)
            nobs, r, term, trunc, sinfo = env.step(a)
            if learn:
                agent.learn(obs, a, r, nobs, sinfo)
            ret += r
            hist[agent.gammas[a]] += 1
            obs = nobs
            if term or trunc:
                break
        s = sinfo["episode_summary"]
        out.append(
            {
                "episode": i,
                "prompt_id": info.get("prompt_id"),
                "task": info.get("task"),
                "compression": info.get("compression"),
                "return": ret,
                "tokens": s["tokens"],
                "steps": s["steps"],
                "modelled_s": s["modelled_s"],
                "tokens_per_second": s["modelled_tps"],
                "tokens_per_step": s["tokens"] / s["steps"],
                "mean_gamma": sum(g * c for g, c in hist.items()) / max(sum(hist.values()), 1),
                "gamma_hist": hist,
                "speedup": s["modelled_tps"] / s["target_only_tps"],
            }
        )
    return out


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Token-weighted aggregate of evaluate_agent records: total tokens / total modelled time."""
    tok = sum(r["tokens"] for r in records)
    t = sum(r["modelled_s"] for r in records)
    steps = sum(r["steps"] for r in records)
    return {
        "tokens_per_second": tok / t if t > 0 else float("nan"),
        "tokens_per_step": tok / steps if steps else float("nan"),
        "mean_tokens_per_second": float(np.mean([r["tokens_per_second"] for r in records]))
        if records
        else float("nan"),
        "episodes": len(records),
    }
