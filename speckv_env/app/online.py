"""Online comparison on the real models: ``speckv compare --live`` and ``speckv train AGENT --live``.

The replay comparison (:mod:`.compare`) trains and judges controllers on recorded traces, with
modelled time. Here they learn *as they decode* on ``SpecKV-v0`` and are judged by the wall clock:

Phases (one loaded pair, one cost model, prompts from the shipped suites)
    1. **Pretraining on replay** (only what cannot learn live in minutes): the SpecKV MLP
       (random-gamma rollouts over the shipped traces' train split, then its BCE fit) and PPO
       (stable-baselines3 on the vectorised replay). The bandits start from nothing.
    2. **Online learning, live** on the *train* prompts: for each prompt in turn every policy
       decodes it (the order rotated and reversed from prompt to prompt, ABBA-style, so drift on
       a shared host falls on all policies alike). The bandits call ``learn()`` after every
       step and carry what they learned to the next prompt; the MLP is refitted after each of
       its episodes on the replay data plus the acceptance events it saw live; every fixed
       gamma decodes the same prompts. The per-episode measured tokens/s of each bandit against
       the fixed gammas on the same prompts is the **online learning curve**.
       PPO is then fine-tuned live by stable-baselines3 for ``ppo_live_steps`` steps on the
       train prompts (SB3 owns that loop, so it is not interleaved).
    3. **Selection** on the *validation* prompts: the learned controllers decode them
       (interleaved); the one with the highest measured tokens/s is the primary contrast's.
    4. **Evaluation** on the held-out *test* prompts, every policy interleaved per prompt:
       the fixed gammas, the static heuristics, the learned controllers (bandits
       continue-per-episode: each test episode starts from a copy of the state learned in
       phase 2 and keeps learning within the episode), and with ``replay_twins`` the same
       bandits and MLP trained on replay only (``name[replay]``), so online and replay-trained
       controllers are measured side by side on the same prompts in the same run.

Time
    *measured*: ``info["measured_time"]``, the draft and verify seconds of each step, device
    synchronised (prefill and the controller's decision excluded, as in the cost model);
    *modelled*: ``info["modelled_time"]``, the cost model's price of the same steps. Bandits
    learn from the modelled time by default (the env's reward, as in replay) or from the
    measured one (``learn_from="measured"``).

Statistics (reused from the replay comparison)
    Cluster bootstrap over prompts (:func:`agents.stats.cluster_weights`), paired tests of
    measured tokens/s against best-fixed(train) (the fixed gamma of highest measured tokens/s
    on the train prompts in phase 2), one primary contrast chosen on validation, Holm for the
    rest, and the same verdict (:func:`.metrics.judge`).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from speckv_env.core import DEFAULT_GAMMAS, CostModel

from .compare_data import BANDITS, BEST_FIXED, DISPLAY

LIVE_LEARNERS = (*BANDITS, "speckv_mlp", "ppo")
LEARN_FROM = ("modelled", "measured")


@dataclass
class OnlineConfig:
    """Settings of a live comparison (defaults: the full run; :meth:`quick`: minutes on a CPU)."""

    tasks: tuple[str, ...] = ("chat", "code", "math", "summarization")
    """the prompt suites' tasks to draw prompts from"""
    train_prompts: int = 10
    """train prompts per task (online learning, and the choice of best-fixed(train))"""
    validation_prompts: int = 2
    """validation prompts per task (the choice of the primary contrast's controller)"""
    test_prompts: int = 4
    """held-out test prompts per task"""
    max_new_tokens: int = 128
    """new tokens per episode"""
    train_passes: int = 1
    """passes over the train prompts in the online learning phase"""
    compression: str = "fp32"
    """target compression"""
    exact: bool = True
    """row-invariant forwards (SpecKV-v0's default: the tokens do not depend on the gammas)"""
    temperature: float = 0.0
    """0 = greedy; > 0 sampling (position-keyed, the same tokens for every policy)"""
    gammas: tuple[int, ...] = DEFAULT_GAMMAS
    """the gamma set (action space)"""
    fixed_gammas: tuple[int, ...] | None = None
    """the fixed gammas decoded beside the learners (candidates of best-fixed(train)); None: every gamma"""
    learners: tuple[str, ...] = LIVE_LEARNERS
    """learned controllers: bandits, speckv_mlp, ppo"""
    static: tuple[str, ...] = ("hf_heuristic", "cost_aware")
    """controllers that need no training"""
    replay_twins: bool = True
    """also evaluate the bandits and the MLP trained on replay only (name[replay])"""
    learn_from: str = "modelled"
    """the step time the bandits learn from: modelled (the env's reward) or measured"""
    cost_model: str = "auto"
    """auto (this host's cached calibration if any, else the model beside the traces), shipped,
    calibrate (measure now), or a cost-model file"""
    replay_bandit_steps: int = 10_000
    """replay training steps of the bandits' replay twins"""
    mlp_rollout_steps: int = 10_000
    """replay rollout steps of the MLP's pretraining"""
    mlp_epochs: int = 15
    """MLP epochs (pretraining and every live refit)"""
    ppo_steps: int = 50_000
    """PPO pretraining steps on replay"""
    ppo_n_envs: int = 8
    """vectorised replay envs of PPO's pretraining"""
    ppo_kwargs: dict[str, Any] = field(default_factory=lambda: {"n_steps": 256, "batch_size": 256, "n_epochs": 5})
    """PPOAgent keyword arguments (pretraining)"""
    ppo_live_steps: int = 256
    """PPO's live fine-tuning steps (0: none); one SB3 rollout of this many steps per update"""
    warmup_tokens: int = 32
    """a discarded warm-up episode of this many tokens before any timing"""
    threads: int = 2
    """torch CPU threads while decoding (as in calibration)"""
    seed: int = 0
    """seed of the bandits, the MLP and PPO"""
    n_boot: int = 2000
    """bootstrap resamples"""
    level: float = 0.95
    """confidence level"""
    boot_seed: int = 12345
    """seed of the bootstrap resamples"""
    progress: bool = True
    """progress bars"""

    @classmethod
    def quick(cls, **kw: Any) -> OnlineConfig:
        """8 train prompts x 48 tokens, 4 validation and 4 test prompts, fixed gammas 0-4 (the larger
        ones are the slowest to decode and far from the best on this pair), small replay budgets."""
        base: dict[str, Any] = {
            "train_prompts": 2,
            "validation_prompts": 1,
            "test_prompts": 1,
            "max_new_tokens": 48,
            "replay_bandit_steps": 1500,
            "mlp_rollout_steps": 1500,
            "mlp_epochs": 4,
            "ppo_steps": 1024,
            "ppo_n_envs": 4,
            "ppo_kwargs": {"n_steps": 128, "batch_size": 128, "n_epochs": 2},
            "ppo_live_steps": 64,
            "fixed_gammas": (0, 1, 2, 3, 4),
            "n_boot": 1000,
        }
        base.update(kw)
        return cls(**base)

    def __post_init__(self) -> None:
        bad = set(self.learners) - set(LIVE_LEARNERS)
        if bad:
            raise ValueError(f"unknown live learner(s) {sorted(bad)}: choose from {LIVE_LEARNERS}")
        if self.learn_from not in LEARN_FROM:
            raise ValueError(f"learn_from must be one of {LEARN_FROM}, got {self.learn_from!r}")
        self.gammas = tuple(int(g) for g in self.gammas)
        if self.fixed_gammas is not None:
            self.fixed_gammas = tuple(int(g) for g in self.fixed_gammas)
            if not self.fixed_gammas or not set(self.fixed_gammas) <= set(self.gammas):
                raise ValueError(f"fixed_gammas {self.fixed_gammas} must be a non-empty subset of gammas {self.gammas}")
        self.tasks = tuple(self.tasks)


def interleaved_order(names: Sequence[str], i: int) -> list[str]:
    """The order in which the policies decode prompt ``i``: rotated by one every two prompts
    and reversed on odd prompts (two policies: A B, B A, B A, A B, ... = ABBA), so every policy
    takes every place in the order equally often and drift falls on all alike."""
    names = list(names)
    if not names:
        return []
    r = (i // 2) % len(names)
    rot = names[r:] + names[:r]
    return rot if i % 2 == 0 else rot[::-1]


# ---- one episode ---------------------------------------------------------------------------------


def _learning_signal(reward: float, info: dict[str, Any], learn_from: str, env: Any) -> tuple[float, dict[str, Any]]:
    """The reward and info a learner sees: the env's (modelled time), or with ``learn_from =
    "measured"`` the same step priced by its measured seconds (the cost reward recomputed)."""
    if learn_from == "modelled" or info.get("measured_time") is None:
        return reward, info
    t = float(info["measured_time"])
    cm = env.unwrapped.cost_model
    return float(info["emitted"]) - t / cm.t_target, {**info, "modelled_time": t}


def play_episode(
    agent: Any, env: Any, episode: int, seed: int = 0, learn: bool = False, learn_from: str = "modelled"
) -> dict[str, Any]:
    """Decode episode ``episode`` of a live env with ``agent`` (``learn``: call ``learn()`` after
    every step). Returns tokens, steps, modelled and measured seconds, wall seconds (prefill and
    decisions included), the gamma histogram, the emitted ids and the per-step (obs, gamma,
    accepted) the MLP refits on."""
    from agents.training import begin_episode

    t0 = time.perf_counter()
    obs, info = env.reset(options={"episode": int(episode), "episode_seed": int(seed)})
    begin_episode(agent, env, info)
    rec: dict[str, Any] = {"prompt_id": info["prompt_id"], "task": info["task"], "exact": info.get("exact")}
    n = s = 0
    t_mod = t_meas = 0.0
    hist = [0] * len(agent.gammas)
    ids: list[int] = []
    steps: list[tuple[np.ndarray, int, int]] = []
    while True:
        a = int(agent.act(obs))
        nobs, r, term, trunc, si = env.step(a)
        if learn:
            r2, si2 = _learning_signal(float(r), si, learn_from, env)
            agent.learn(obs, a, r2, nobs, si2)
        steps.append((np.asarray(obs, dtype=np.float32), int(si["gamma"]), int(si["accepted"])))
        n += int(si["emitted"])
        s += 1
        t_mod += float(si["modelled_time"])
        t_meas += float(si["measured_time"] or 0.0)
        hist[a] += 1
        ids.extend(int(x) for x in si["tokens"])
        obs = nobs
        if term or trunc:
            break
    rec.update(tokens=n, steps=s, modelled_s=t_mod, measured_s=t_meas, wall_s=time.perf_counter() - t0)
    rec.update(hist=hist, gsum=float(np.dot(hist, agent.gammas)), ids=ids, step_data=steps)
    return rec


# ---- the policies ----------------------------------------------------------------------------------


@dataclass
class Policy:
    """A policy of the live comparison: its agent and how it behaves across episodes.

    ``kind``: "fixed" (no learning), "online" (learns every step; in training its state carries
    over, at evaluation every episode starts from a copy: continue-per-episode), "refit" (the
    MLP: refitted after each training episode), or "frozen" (learned elsewhere)."""

    name: str
    agent: Any
    kind: str = "fixed"
    replay_data: dict[str, np.ndarray] | None = None
    live_steps: list[tuple[np.ndarray, int, int]] = field(default_factory=list)


def _refit_mlp(p: Policy, cfg: OnlineConfig) -> None:
    """Refit the MLP on its replay rollouts plus the acceptance events of its live episodes."""
    from agents.mlp import step_events

    assert p.replay_data is not None
    live = p.live_steps
    ev = np.array([step_events(g, k) for _, g, k in live], dtype=np.float32).reshape(-1, 2)
    X = np.concatenate([p.replay_data["obs"], np.stack([o for o, _, _ in live])]) if live else p.replay_data["obs"]
    hits = np.concatenate([p.replay_data["hits"], ev[:, 0]])
    misses = np.concatenate([p.replay_data["misses"], ev[:, 1]])
    p.agent.fit(X, hits, misses, epochs=cfg.mlp_epochs, batch_size=1024)


def run_policy(p: Policy, env: Any, episode: int, seed: int, training: bool, cfg: OnlineConfig) -> dict[str, Any]:
    """One episode of policy ``p`` (see :class:`Policy` for what learns when)."""
    if p.kind == "online" and not training:  # continue-per-episode: a copy of the learned state
        keep = {id(x): x for x in (env, env.unwrapped, getattr(p.agent, "_env", None)) if x is not None}
        agent = copy.deepcopy(p.agent, dict(keep))
        if hasattr(agent, "rng"):
            agent.rng = np.random.default_rng([int(cfg.seed), int(episode)])
        agent.bind(env)
        return play_episode(agent, env, episode, seed, learn=True, learn_from=cfg.learn_from)
    p.agent.bind(env)
    rec = play_episode(p.agent, env, episode, seed, learn=p.kind == "online", learn_from=cfg.learn_from)
    if p.kind == "refit" and training:
        p.live_steps.extend(rec["step_data"])
        _refit_mlp(p, cfg)
    return rec


def run_interleaved(
    policies: Sequence[Policy],
    env: Any,
    episodes: Sequence[int],
    cfg: OnlineConfig,
    training: bool = False,
    start: int = 0,
    desc: str = "live",
) -> tuple[dict[str, list[dict[str, Any]]], list[list[str]]]:
    """Every policy on every episode, prompt by prompt, in :func:`interleaved_order` (``start``:
    the order index of the first prompt, so later phases continue the rotation). Returns the
    records per policy (in episode order) and the order used for each prompt."""
    from tqdm.auto import tqdm

    by_name = {p.name: p for p in policies}
    recs: dict[str, list[dict[str, Any]]] = {p.name: [] for p in policies}
    orders: list[list[str]] = []
    total = len(episodes) * len(policies)
    with tqdm(total=total, desc=desc, leave=False, disable=not cfg.progress) as bar:
        for j, e in enumerate(episodes):
            order = interleaved_order(list(by_name), start + j)
            orders.append(order)
            for k, name in enumerate(order):
                bar.set_postfix_str(name)
                rec = run_policy(by_name[name], env, e, cfg.seed, training, cfg)
                rec.update(episode=int(e), place=k)
                recs[name].append(rec)
                bar.update()
    return recs, orders


# ---- setup: the pair, the cost model, the prompts, the envs -----------------------------------------


@dataclass
class LiveSetup:
    """What every phase shares: the loaded pair, its cost model, one live env per prompt set."""

    pair: Any
    cost_model: CostModel
    cost_source: str
    prompts: dict[str, list[Any]]
    envs: dict[str, Any]
    logs: Any


def select_live_prompts(cfg: OnlineConfig) -> dict[str, list[Any]]:
    """The first ``n`` prompts of each of ``cfg.tasks`` in the train, validation and test splits."""
    from speckv_env.prompts import load_prompts

    out: dict[str, list[Any]] = {}
    for split, n in (("train", cfg.train_prompts), ("validation", cfg.validation_prompts), ("test", cfg.test_prompts)):
        out[split] = [p for t in cfg.tasks for p in load_prompts(task=t, split=split)[:n]]
    return out


def live_cost_model(cfg: OnlineConfig, logs: Any, cost: Any, pair: Any) -> tuple[CostModel, str]:
    """The cost model that prices the live steps: ``cost`` (a CostModel) if given, else per
    ``cfg.cost_model``: "auto" = this host's cached calibration of this pair and
    kernels if there is one, else the model saved beside the replay traces; "shipped"; "calibrate"
    (measure now, cached as ``SpecKV-v0`` does by default); or a path."""
    from speckv_env.calibrate import cached_calibration, cached_calibration_exists

    if isinstance(cost, CostModel):
        return cost, "given"
    how = str(cost) if cost is not None else cfg.cost_model
    gmax = max(max(cfg.gammas), 8)
    if how == "calibrate" or (how == "auto" and cached_calibration_exists(pair, gmax)):
        return cached_calibration(pair, gamma_max=gmax), "calibration of this host (speckv_env.calibrate cache)"
    if how not in ("auto", "shipped"):
        return CostModel.load(how), how
    from replay.costs import load_cost_models

    folder = Path(logs)
    folder = folder if folder.is_dir() else folder.parent
    return load_cost_models(folder)[cfg.compression], str(folder / f"cost-{cfg.compression}.json")


def make_setup(cfg: OnlineConfig, pair: Any = None, cost: Any = None, logs: Any = None) -> LiveSetup:
    """Load the pair (default: the embedded default pair on the CPU), pick the cost model and
    build one ``SpecKV-v0`` per prompt set (all over the same loaded pair)."""
    import gymnasium as gym

    import speckv_env  # noqa: F401  (registers SpecKV-v0)
    from replay.env import default_logs

    logs = default_logs() if logs is None else Path(logs)
    if pair is None:
        from speckv_env.pair import load_pair

        pair = load_pair(None, None, compression=cfg.compression, device="cpu", exact=cfg.exact)
    cm, src = live_cost_model(cfg, logs, cost, pair)
    prompts = select_live_prompts(cfg)
    envs = {
        split: gym.make(
            "SpecKV-v0",
            pair=pair,
            prompts=ps,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            gammas=cfg.gammas,
            cost_model=cm,
        )
        for split, ps in prompts.items()
        if ps
    }
    return LiveSetup(pair, cm, src, prompts, envs, logs)


def warm_up(setup: LiveSetup, cfg: OnlineConfig) -> None:
    """One discarded episode (fixed gamma 1, ``warmup_tokens`` tokens) before any timing."""
    if cfg.warmup_tokens <= 0 or "train" not in setup.envs:
        return
    from agents.base import make_agent

    env = setup.envs["train"].unwrapped
    env.backend.max_new_tokens, keep = cfg.warmup_tokens, env.backend.max_new_tokens
    try:
        play_episode(make_agent("fixed", g=min(1, max(cfg.gammas)), gammas=cfg.gammas), setup.envs["train"], 0)
    finally:
        env.backend.max_new_tokens = keep


# ---- pretraining on replay ------------------------------------------------------------------------


def _replay_traces(setup: LiveSetup, cfg: OnlineConfig) -> tuple[list[Any], Any]:
    """The replay traces of the train split in the live compression and mode, with cost models."""
    from replay.env import load_traces

    mode = "sample" if cfg.temperature > 0 else "greedy"
    trs, cms = load_traces(setup.logs, None, {"split": "train", "compression": cfg.compression, "mode": mode})
    return trs, cms if len(cms) else {cfg.compression: setup.cost_model}


def pretrain_on_replay(setup: LiveSetup, cfg: OnlineConfig) -> dict[str, Policy]:
    """The learned policies before the live phase: bandits fresh (they learn live), the MLP and
    PPO pretrained on replay, and with ``replay_twins`` the bandits trained on replay only."""
    import torch

    from agents.base import make_agent
    from agents.training import collect_rollouts, replay_env_factory, train_agent

    out: dict[str, Policy] = {}
    needs_replay = "speckv_mlp" in cfg.learners or "ppo" in cfg.learners or cfg.replay_twins
    trs, cms = _replay_traces(setup, cfg) if needs_replay else ([], {})
    ek = {"cost_models": cms, "gammas": cfg.gammas}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small networks: threads only add contention
    try:
        for b in (x for x in BANDITS if x in cfg.learners):
            out[DISPLAY[b]] = Policy(DISPLAY[b], make_agent(b, seed=cfg.seed, gammas=cfg.gammas), "online")
            if cfg.replay_twins:
                tw = train_agent(
                    b, traces=trs, env_kwargs=ek, steps=cfg.replay_bandit_steps, seed=cfg.seed, progress=False
                )
                out[f"{DISPLAY[b]}[replay]"] = Policy(f"{DISPLAY[b]}[replay]", tw, "online")
        if "speckv_mlp" in cfg.learners:
            mlp: Any = make_agent("speckv_mlp", rule="time", seed=cfg.seed, gammas=cfg.gammas)
            data = collect_rollouts(replay_env_factory(trs, **ek)(), cfg.mlp_rollout_steps, seed=cfg.seed)
            mlp.fit(data["obs"], data["hits"], data["misses"], epochs=cfg.mlp_epochs, batch_size=1024)
            if cfg.replay_twins:
                out["mlp-time[replay]"] = Policy("mlp-time[replay]", copy.deepcopy(mlp), "frozen")
            out["mlp-time"] = Policy("mlp-time", mlp, "refit", replay_data=data)
        if "ppo" in cfg.learners:
            ppo = train_agent(
                "ppo", traces=trs, env_kwargs=ek, steps=cfg.ppo_steps, n_envs=cfg.ppo_n_envs, seed=cfg.seed,
                agent_kwargs=dict(cfg.ppo_kwargs), progress=False,
            )  # fmt: skip
            out["ppo"] = Policy("ppo", ppo, "frozen")
    finally:
        torch.set_num_threads(threads)
    return out


def fine_tune_ppo_live(p: Policy, setup: LiveSetup, cfg: OnlineConfig) -> dict[str, Any]:
    """PPO's live fine-tuning: stable-baselines3 on one ``SpecKV-v0`` over the train prompts
    for ``ppo_live_steps`` steps, from the replay-pretrained weights (a rollout of that many
    steps, then one update). Not interleaved: SB3 owns the loop."""
    import gymnasium as gym
    import torch

    from agents.ppo import PPOAgent
    from agents.training import train_agent

    if cfg.ppo_live_steps <= 0:
        return {"live_steps": 0}
    conf = {**p.agent.get_config(), "n_steps": cfg.ppo_live_steps, "batch_size": min(cfg.ppo_live_steps, 64)}
    agent: Any = PPOAgent.from_saved(conf, p.agent.get_state(), p.agent.get_tensors(), p.agent.obs_version)
    env = setup.envs["train"].unwrapped

    def factory() -> Any:
        return gym.make("SpecKV-v0", pair=setup.pair, prompts=env.backend.prompts, max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature, gammas=cfg.gammas, cost_model=setup.cost_model)  # fmt: skip

    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    train_agent(agent, env_factory=factory, steps=cfg.ppo_live_steps, n_envs=1, seed=cfg.seed, progress=False)
    p.agent = agent
    return {"live_steps": int(agent.timesteps), "seconds": time.time() - t0, "episodes": len(agent.train_log)}


# ---- the phases ---------------------------------------------------------------------------------


def fixed_policies(cfg: OnlineConfig) -> list[Policy]:
    from agents.base import make_agent

    gs = cfg.gammas if cfg.fixed_gammas is None else cfg.fixed_gammas
    return [Policy(f"fixed-{g}", make_agent("fixed", g=g, gammas=cfg.gammas)) for g in gs]


def static_policies(cfg: OnlineConfig) -> list[Policy]:
    from agents.base import make_agent

    return [Policy(DISPLAY[s], make_agent(s, gammas=cfg.gammas)) for s in cfg.static]


def _tps(r: Mapping[str, Any], key: str) -> float:
    return float(r["tokens"] / r[key]) if r[key] > 0 else float("nan")


def learning_curves(recs: Mapping[str, list[dict[str, Any]]], online: Sequence[str], best: str) -> dict[str, Any]:
    """Per online learner, one point per training episode: measured and modelled tokens/s, mean
    gamma, the place in the order, and the same for ``best`` (best-fixed(train)) on the same
    prompt (``ratio_measured``: learner / best fixed, measured). ``fixed``: every fixed gamma's
    measured tokens/s per training episode."""

    def point(i: int, r: Mapping[str, Any], ref: Mapping[str, Any]) -> dict[str, Any]:
        tm, tr = _tps(r, "measured_s"), _tps(ref, "measured_s")
        return {
            "episode": i,
            "prompt_id": r["prompt_id"],
            "task": r["task"],
            "measured_tps": tm,
            "modelled_tps": _tps(r, "modelled_s"),
            "mean_gamma": r["gsum"] / max(r["steps"], 1),
            "place": r["place"],
            "best_fixed_measured_tps": tr,
            "best_fixed_modelled_tps": _tps(ref, "modelled_s"),
            "ratio_measured": tm / tr,
            "ratio_modelled": _tps(r, "modelled_s") / _tps(ref, "modelled_s"),
        }

    curves = {n: [point(i, r, recs[best][i]) for i, r in enumerate(recs[n])] for n in online if n in recs}
    fixed = {n: [_tps(r, "measured_s") for r in rs] for n, rs in recs.items() if n.startswith("fixed-")}
    return {"online": curves, "fixed_measured_tps": fixed, "best_fixed": best, "time": "measured"}


def best_fixed_name(recs: Mapping[str, list[dict[str, Any]]]) -> str:
    """best-fixed(train): the fixed gamma of highest measured tokens/s over the train prompts
    (total tokens / total measured seconds; ties: the smaller gamma)."""
    fixed = [n for n in recs if n.startswith("fixed-")]
    if not fixed:
        raise ValueError("no fixed gamma was decoded on the train prompts")

    def tps(n: str) -> float:
        return sum(r["tokens"] for r in recs[n]) / sum(r["measured_s"] for r in recs[n])

    return max(fixed, key=lambda n: (tps(n), -int(n.split("-")[1])))


def learning_phase(setup: LiveSetup, cfg: OnlineConfig, learned: Mapping[str, Policy]) -> dict[str, Any]:
    """Phase 2: online learning on the train prompts, every fixed gamma beside the learners."""
    live = [p for n, p in learned.items() if p.kind in ("online", "refit") and not n.endswith("[replay]")]
    pols = [*live, *fixed_policies(cfg)]
    env = setup.envs["train"]
    n = len(setup.prompts["train"])
    episodes = [e for _ in range(cfg.train_passes) for e in range(n)]
    recs, orders = run_interleaved(pols, env, episodes, cfg, training=True, desc="online learning (train)")
    best = best_fixed_name(recs)
    return {
        "records": recs,
        "orders": orders,
        "best_fixed": best,
        "curves": learning_curves(recs, [p.name for p in live], best),
    }


def evaluation_policies(cfg: OnlineConfig, learned: Mapping[str, Policy], validation: bool) -> list[Policy]:
    """Validation: the learned controllers that can be chosen (no replay twins); test: every
    policy (fixed gammas, static heuristics, learned controllers, replay twins, mlp-tokens)."""
    if validation:
        return [p for n, p in learned.items() if not n.endswith("[replay]")]
    pols = [*fixed_policies(cfg), *static_policies(cfg), *learned.values()]
    if "mlp-time" in learned:
        from .evaluate import mlp_tokens_twin

        pols.append(Policy("mlp-tokens", mlp_tokens_twin(learned["mlp-time"].agent), "frozen"))
    return pols


def _arrays(recs: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    keys = ("tokens", "measured_s", "modelled_s", "steps", "gsum", "wall_s")
    out = {k: np.array([r[k] for r in recs], dtype=np.float64) for k in keys}
    out["hist"] = np.array([r["hist"] for r in recs], dtype=np.float64)
    return out


def _policy_metrics(
    a: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], mask: np.ndarray, W: np.ndarray, cfg: OnlineConfig,
    t_target: float, prompts: np.ndarray,
) -> dict[str, Any]:  # fmt: skip
    """One policy on one subset: measured and modelled tokens/s with cluster-bootstrap intervals,
    paired tests of both against best-fixed(train), tokens/step, mean gamma, gamma shares."""
    from agents import stats

    N, Tm, Tc = a["tokens"][mask], a["measured_s"][mask], a["modelled_s"][mask]
    Nr, Tmr, Tcr = ref["tokens"][mask], ref["measured_s"][mask], ref["modelled_s"][mask]
    S, G, h = a["steps"][mask], a["gsum"][mask], a["hist"][mask].sum(0)
    return {
        "tokens_per_s": stats.ratio_ci(N, Tm, W, cfg.level),
        "modelled_tokens_per_s": stats.ratio_ci(N, Tc, W, cfg.level),
        "measured_over_modelled": float(Tc.sum() / Tm.sum()) if Tm.sum() > 0 else float("nan"),
        "speedup": stats.ratio_ci(N * t_target, Tc, W, cfg.level),
        "tokens_per_step": float(N.sum() / S.sum()),
        "mean_gamma": float(G.sum() / S.sum()),
        "vs_best_fixed": stats.paired_ratio_test(N, Tm, Nr, Tmr, W, cfg.level),
        "modelled_vs_best_fixed": stats.paired_ratio_test(N, Tc, Nr, Tcr, W, cfg.level),
        "gamma_hist": (h / max(h.sum(), 1)).tolist(),
        "episodes": int(mask.sum()),
        "prompts": len(set(prompts[mask])),
        "seeds": 1,
        "tokens": float(N.sum()),
        "measured_s": float(Tm.sum()),
        "modelled_s": float(Tc.sum()),
        "wall_s": float(a["wall_s"][mask].sum()),
    }


def live_metrics(
    recs: Mapping[str, list[dict[str, Any]]], best: str | None, cfg: OnlineConfig, t_target: float
) -> dict[str, Any]:
    """Metrics of every policy overall and per task (one set of cluster-bootstrap resamples over
    prompts per subset, shared by all policies: paired). ``best``: the reference policy (None:
    tokens/s only, as the validation prompts need)."""
    from agents import stats

    from .metrics import _subsets

    first = next(iter(recs.values()))
    prompts = np.array([f"{r['task']}/{r['prompt_id']}" for r in first])
    task = np.array([r["task"] for r in first])
    for n, rs in recs.items():
        if [f"{r['task']}/{r['prompt_id']}" for r in rs] != prompts.tolist():
            raise RuntimeError(f"{n}: decoded other prompts than the other policies")
    arrays = {n: _arrays(rs) for n, rs in recs.items()}
    rng = np.random.default_rng(cfg.boot_seed)
    out: dict[str, Any] = {n: {"subsets": {}} for n in recs}
    for sub, mask in _subsets(task, np.full(task.size, cfg.compression)).items():
        W = stats.cluster_weights(prompts[mask], cfg.n_boot, rng)
        for n, a in arrays.items():
            if best is None:
                m = {"tokens_per_s": stats.ratio_ci(a["tokens"][mask], a["measured_s"][mask], W, cfg.level)}
                m["modelled_tokens_per_s"] = stats.ratio_ci(a["tokens"][mask], a["modelled_s"][mask], W, cfg.level)
            else:
                m = _policy_metrics(a, arrays[best], mask, W, cfg, t_target, prompts)
            out[n]["subsets"][sub] = m
    return out


def twin_contrasts(recs: Mapping[str, list[dict[str, Any]]], cfg: OnlineConfig) -> dict[str, Any]:
    """Each online learner against its replay-trained twin (``name[replay]``) on the same test
    prompts: paired cluster-bootstrap test of measured tokens/s (online minus replay)."""
    from agents import stats

    out: dict[str, Any] = {}
    rng = np.random.default_rng(cfg.boot_seed + 1)
    for n in recs:
        twin = f"{n}[replay]"
        if twin in recs:
            a, b = _arrays(recs[n]), _arrays(recs[twin])
            W = stats.cluster_weights([f"{r['task']}/{r['prompt_id']}" for r in recs[n]], cfg.n_boot, rng)
            out[n] = stats.paired_ratio_test(a["tokens"], a["measured_s"], b["tokens"], b["measured_s"], W, cfg.level)
    return out


def same_tokens(recs: Mapping[str, list[dict[str, Any]]]) -> bool:
    """Whether every policy emitted the same token ids on every prompt (gamma-invariance)."""
    ids = [[tuple(r["ids"]) for r in rs] for rs in recs.values()]
    return all(x == ids[0] for x in ids)


# ---- the pipeline ------------------------------------------------------------------------------------

PRIMARY_RULE_LIVE = (
    "primary contrast (declared): the learned controller with the highest measured tokens/s on the validation "
    "prompts (after learning on the train prompts) against best-fixed(train), on the test prompts; every other "
    "contrast is secondary, Holm-adjusted per subset"
)
BEST_FIXED_RULE_LIVE = (
    "the fixed gamma (of fixed_gammas) of highest measured tokens/s on the train prompts, decoded in the online phase"
)


def _config(config: OnlineConfig | None, quick: bool, overrides: Mapping[str, Any]) -> OnlineConfig:
    if config is not None:
        return OnlineConfig(**{**asdict(config), **overrides}) if overrides else config
    return OnlineConfig.quick(**overrides) if quick else OnlineConfig(**overrides)


def _strip(recs: Mapping[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Records as results.json keeps them (no token ids, no step data)."""
    return {n: [{k: v for k, v in r.items() if k not in ("ids", "step_data")} for r in rs] for n, rs in recs.items()}


def evaluate_phases(
    setup: LiveSetup, cfg: OnlineConfig, learned: Mapping[str, Policy], best: str, start: int
) -> dict[str, Any]:
    """Phases 3 and 4: the learned controllers on the validation prompts, every policy on the
    test prompts (interleaved per prompt), and their metrics; the verdict (:func:`.metrics.judge`)."""
    from .metrics import judge

    out: dict[str, Any] = {}
    val_metrics = None
    if "validation" in setup.envs and learned:
        pols = evaluation_policies(cfg, learned, validation=True)
        n = len(setup.prompts["validation"])
        recs, orders = run_interleaved(pols, setup.envs["validation"], range(n), cfg, start=start, desc="validation")
        val_metrics = live_metrics(recs, None, cfg, setup.cost_model.t_target)
        out["validation"] = {"episodes": n, "orders": orders, "records": _strip(recs)}
        out["validation"]["tokens_per_s"] = {k: v["subsets"]["all"]["tokens_per_s"] for k, v in val_metrics.items()}
        start += n
    pols = evaluation_policies(cfg, learned, validation=False)
    n = len(setup.prompts["test"])
    recs, orders = run_interleaved(pols, setup.envs["test"], range(n), cfg, start=start, desc="test")
    recs[BEST_FIXED] = recs[best]
    split: dict[str, Any] = {"policies": live_metrics(recs, BEST_FIXED, cfg, setup.cost_model.t_target)}
    split["_val_metrics"] = val_metrics
    judge({"heldout": split})
    split.pop("_val_metrics")
    split["online_vs_replay"] = twin_contrasts(recs, cfg)
    split.update(same_tokens=same_tokens(recs), orders=orders, records=_strip(recs), best_fixed=best, **out)
    return split


def cost_model_kernels(cm: CostModel) -> str | None:
    """The kernels a cost model was measured with, as its metadata records them (None: unknown)."""
    meta = cm.meta or {}
    if meta.get("kernels"):
        return str(meta["kernels"])
    old = meta.get("cpu_kernels")  # older cost files record only whether the row-count plans ran
    return None if old is None else ("cpu-row-plans" if old else "stock")


def _loadavg() -> list[float] | None:
    import os

    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _describe_setup(setup: LiveSetup, cfg: OnlineConfig) -> dict[str, Any]:
    from .bench_engine import machine_info

    pair = setup.pair
    return {
        "pair": pair.name,
        "compression": pair.compression,
        "device": str(pair.device),
        "kernels": pair.kernels,
        "exact": bool(pair.exact),
        "mode": "sample" if cfg.temperature > 0 else "greedy",
        "cost_model": {"source": setup.cost_source, **setup.cost_model.to_dict()},
        "cost_model_kernels": cost_model_kernels(setup.cost_model),
        "host": machine_info(),
        "prompts": {k: [f"{p.task}/{p.id}" for p in v] for k, v in setup.prompts.items()},
    }


def training_note(cfg: OnlineConfig, ppo: Mapping[str, Any] | None) -> dict[str, str]:
    """How each learned controller got what it knows (the report says it)."""
    live = f"{cfg.train_passes} pass(es) over the {len(cfg.tasks) * cfg.train_prompts} train prompts"
    notes: dict[str, str] = {
        "bandits": f"learned online from nothing, live: learn() after every step of {live}, learning from the "
        f"{cfg.learn_from} step time; at test, continue-per-episode from that state",
        "mlp-time": f"pretrained on replay ({cfg.mlp_rollout_steps} random-gamma rollout steps over the shipped "
        f"traces' train split, {cfg.mlp_epochs} epochs), then fine-tuned live: refitted after each of its live "
        f"episodes ({live}) on the replay data plus the acceptance events it saw live",
        "ppo": f"pretrained on replay ({cfg.ppo_steps} steps, {cfg.ppo_n_envs} vectorised envs), then fine-tuned "
        f"live by stable-baselines3 for {(ppo or {}).get('live_steps', 0)} steps on the train prompts (not "
        "interleaved); frozen at test",
        "fixed gammas and heuristics": "decoded every train prompt beside the learners (the learning curves' "
        "reference and the choice of best-fixed(train)) and every test prompt; no training",
    }
    keep = {"bandits": bool(set(BANDITS) & set(cfg.learners)), "mlp-time": "speckv_mlp" in cfg.learners}
    keep["ppo"] = "ppo" in cfg.learners
    notes = {k: v for k, v in notes.items() if keep.get(k, True)}
    if cfg.replay_twins:
        notes["replay twins"] = (
            f"name[replay]: the same bandits trained on replay only ({cfg.replay_bandit_steps} steps over the "
            "shipped traces' train split; continue-per-episode at test) and the MLP as pretrained on replay, "
            "before any live fine-tuning"
        )
    return notes


def run_live_comparison(
    out_dir: str | Path = "compare_live",
    quick: bool = False,
    config: OnlineConfig | None = None,
    pair: Any = None,
    cost: CostModel | None = None,
    logs: Any = None,
    **overrides: Any,
) -> dict[str, Any]:
    """``speckv compare --live``: every phase (module docs) on the real models; writes report.md,
    results.json and plots to ``out_dir`` and returns the results."""
    import torch

    cfg = _config(config, quick, overrides)
    t0, started = time.time(), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup = make_setup(cfg, pair, cost, logs)
    torch.set_num_threads(cfg.threads)
    described = _describe_setup(setup, cfg)  # the host as the run starts (threads, load average)
    clock = {"loaded": time.time() - t0}
    learned = pretrain_on_replay(setup, cfg)
    torch.set_num_threads(cfg.threads)
    warm_up(setup, cfg)
    clock["pretrained"] = time.time() - t0
    phase = learning_phase(setup, cfg, learned)
    clock["online_learning_done"] = time.time() - t0
    ppo = fine_tune_ppo_live(learned["ppo"], setup, cfg) if "ppo" in learned else None
    torch.set_num_threads(cfg.threads)
    split = evaluate_phases(setup, cfg, learned, phase["best_fixed"], len(phase["orders"]))
    clock["evaluated"] = time.time() - t0
    described["host"]["loadavg_at_end"] = _loadavg()
    results = {
        "format": "speckv-compare-live/1",
        "source": "live",
        "config": asdict(cfg),
        "setup": described,
        "training": training_note(cfg, ppo),
        "ppo_live": ppo,
        "clock_s": clock,
        "best_fixed_rule": BEST_FIXED_RULE_LIVE,
        "primary_rule": PRIMARY_RULE_LIVE,
        "splits": {"heldout": split},
        "online": {**phase["curves"], "orders": phase["orders"], "records": _strip(phase["records"])},
        "started": started,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    return _write(results, out, t0)


def _write(results: dict[str, Any], out: Path, t0: float) -> dict[str, Any]:
    from .plots import write_live_plots
    from .report import write_live_report
    from .results import jsonable

    results["plots"] = write_live_plots(results, out)
    results["runtime_s"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(jsonable(results), indent=1))
    write_live_report(results, out / "report.md")
    return results


def train_live_main(
    agent: str,
    out: str | Path,
    quick: bool = False,
    pair: Any = None,
    cost: CostModel | None = None,
    logs: Any = None,
    **overrides: Any,
) -> dict[str, Any]:
    """``speckv train AGENT --live``: ``agent`` (a bandit, speckv_mlp or ppo) learns as it decodes
    the train prompts on ``SpecKV-v0`` (phase 2 of the module docs, with the fixed gammas
    beside it), then it and best-fixed(train) decode the test prompts, interleaved. Saves the
    agent to ``out`` (a file, or a folder: ``<out>/<agent>-live-seed<seed>.<ext>``) and returns
    its learning curve and test summary (measured and modelled tokens/s)."""
    import torch

    if agent not in LIVE_LEARNERS:
        raise ValueError(f"--live trains a learner: one of {', '.join(LIVE_LEARNERS)} (got {agent!r})")
    cfg = _config(None, quick, {**overrides, "learners": (agent,), "replay_twins": False})
    setup = make_setup(cfg, pair, cost, logs)
    learned = pretrain_on_replay(setup, cfg)
    torch.set_num_threads(cfg.threads)
    warm_up(setup, cfg)
    phase = learning_phase(setup, cfg, learned)
    ppo = fine_tune_ppo_live(learned["ppo"], setup, cfg) if "ppo" in learned else None
    torch.set_num_threads(cfg.threads)
    (name, pol), best = next(iter(learned.items())), phase["best_fixed"]
    ref = next(p for p in fixed_policies(cfg) if p.name == best)
    recs, orders = run_interleaved([pol, ref], setup.envs["test"], range(len(setup.prompts["test"])), cfg)
    test = {n: {"measured_tps": sum(r["tokens"] for r in rs) / sum(r["measured_s"] for r in rs),
                "modelled_tps": sum(r["tokens"] for r in rs) / sum(r["modelled_s"] for r in rs),
                "episodes": len(rs)} for n, rs in recs.items()}  # fmt: skip
    p = Path(out)
    if p.suffix not in (".json", ".safetensors"):
        p = p / f"{agent}-live-seed{cfg.seed}{'.safetensors' if pol.agent.get_tensors() else '.json'}"
    pol.agent.save(p)
    return {
        "path": str(p),
        "agent": name,
        "training": training_note(cfg, ppo),
        "best_fixed": best,
        "curve": phase["curves"]["online"].get(name, []),
        "test": test,
        "orders": {"train": phase["orders"], "test": orders},
        "setup": _describe_setup(setup, cfg),
    }
