"""PPO (stable-baselines3) as a gamma policy (step mode) or a per-token stopping rule (token
mode), saved without pickle.

Training goes through SB3 (``PPO("MlpPolicy", venv, device="cpu", tensorboard_log=...)``) on a
vectorised env (see :func:`agents.training.make_vec_env`). After training, the actor's weights
are exported to numpy: act() is a deterministic numpy forward pass (argmax of the action
logits), identical to ``policy.predict(obs, deterministic=True)`` (tested).

**Modes.** ``control="step"`` (the default, unchanged): the observation is ``OBS_SPEC`` and the
action an index into ``gammas``. ``control="token"``: the observation is ``TOKEN_OBS_SPEC`` and
the action ``Discrete(2)`` (1 = draft one more token, 0 = verify); ``lookahead`` (token mode,
default True) is the token-mode variant it trains and runs in (an env of the other is refused;
:func:`agents.training.train_agent` takes it from the env). The config records the mode;
``bind()``, ``train()`` and loading refuse an env or a file of the other mode with an error
naming both.

**What training optimises in token mode** (the defaults ``discount=None``, ``normalize=None``,
``budget_end_terminal=None`` resolve per mode; step mode keeps 0.99, no normalisation and SB3's
bootstrapping):

* ``discount = 1.0`` with ``gae_lambda = 0.95``. The objective is the undiscounted return
  N - T / t_target (tokens/s). With a discount below 1 a decision's credit for the tokens a
  longer draft accepts later in the step (and for the time it saves later in the episode) is
  shrunk geometrically, which biases the policy toward myopic early stops; the variance that
  discounting usually buys down is handled by GAE's lambda < 1 instead. Measured on synthetic
  version 2 traces (``CostModel.unit(draft_ratio=0.1)``, 64 envs, n_steps 128, batch 1024,
  4 epochs): at 1M steps 0.99 was ahead by about 2% held-out tokens/s (3 seeds each: 1.79 vs
  1.83), at 3M steps they were equal (1.854 vs 1.855): 1.0 learns a little slower here, since
  a draft decision's consequences land within its step (at most max(gammas) decisions), where
  0.99's bias is small.
* Observation normalisation (SB3 ``VecNormalize``, ``norm_obs``): the running mean and variance
  are exported with the actor, so ``act()`` stays a pure numpy function of the raw observation:
  ``clip((obs - mean) / sqrt(var + 1e-8), -clip_obs, clip_obs)`` then the MLP, equal to SB3's
  deterministic predict on ``VecNormalize.normalize_obs(obs)`` (tested). Reward normalisation
  (``norm_reward``, scaled by the running std of the return) applies during training only; the
  statistics continue across ``train()`` calls and are saved.
* The token budget's end is the end of the task. The replay envs report an episode that stops at
  ``max_new_tokens`` as *truncated* (Gymnasium's convention), and SB3 bootstraps a truncated
  episode from the value of its last observation (``TimeLimit.truncated``), as if the task went
  on. Here nothing follows the budget's last token (the return N - T / t_target is complete), so
  training wraps the env in :class:`BudgetEndIsTerminal`, which drops that flag: PPO treats the
  budget's end as a termination. Only training sees the wrapper; the envs are unchanged.

Persistence: the SB3 ``.zip`` pickles parts of the model, so it is not used. ``save()`` writes
the policy's ``state_dict`` (actor and critic) and, with normalisation, ``obs_rms.mean`` /
``obs_rms.var`` with safetensors plus a JSON config (the mode, the normalisation settings) and
state (timesteps, the statistics' counts and the return statistics); ``load()`` rebuilds an
``ActorCriticPolicy`` with the same architecture and loads the weights.
Per-step ``learn()`` is a no-op: PPO learns from rollouts in :meth:`PPOAgent.train`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from speckv_env.core import (
    DEFAULT_GAMMAS,
    check_control,
    check_lookahead,
    obs_bounds,
    obs_dim,
    obs_version_of_dim,
)

from .base import Agent, check_token_variant, env_obs_version, register

ACTIVATIONS = ("tanh", "relu")
#: discount per mode when ``discount=None`` (step mode: SB3's usual 0.99, unchanged)
DEFAULT_DISCOUNT = {"step": 0.99, "token": 1.0}
NORM_EPS = 1e-8  # VecNormalize's epsilon
_RMS = ("obs_rms.mean", "obs_rms.var")


def _control_of(env: Any) -> str | None:
    """The env's action mode (``control``), or None where the object does not say."""
    for obj in (env, getattr(env, "unwrapped", None), getattr(env, "venv", None)):
        c = getattr(obj, "control", None)
        if isinstance(c, str):
            return c
    get_attr = getattr(env, "get_attr", None)
    if get_attr is not None:
        try:
            c = get_attr("control", indices=[0])[0]
        except (AttributeError, IndexError, TypeError):
            return None
        return c if isinstance(c, str) else None
    return None


def budget_end_is_terminal(venv: Any) -> Any:
    """``venv`` wrapped in :class:`BudgetEndIsTerminal` (built lazily: SB3 is imported here)."""
    from stable_baselines3.common.vec_env import VecEnvWrapper

    class BudgetEndIsTerminal(VecEnvWrapper):
        """Drop ``TimeLimit.truncated`` from finished episodes' infos, so that SB3 does not
        bootstrap them: the token budget's end is the end of the task (training only)."""

        def reset(self):
            return self.venv.reset()

        def step_wait(self):
            obs, rew, done, infos = self.venv.step_wait()
            for i in np.flatnonzero(done).tolist():
                infos[i].pop("TimeLimit.truncated", None)
            return obs, rew, done, infos

    return BudgetEndIsTerminal(venv)


@register
class PPOAgent(Agent):
    kind = "ppo"
    obs_state = True  # learned on one observation version

    def __init__(
        self,
        net_arch: Sequence[int] = (64, 64),
        activation: str = "tanh",
        learning_rate: float = 3e-4,
        n_steps: int = 256,
        batch_size: int = 64,
        n_epochs: int = 10,
        discount: float | None = None,
        gae_lambda: float = 0.95,
        ent_coef: float = 0.01,
        seed: int = 0,
        gammas: Sequence[int] = DEFAULT_GAMMAS,
        control: str = "step",
        normalize: bool | None = None,
        norm_reward: bool | None = None,
        clip_obs: float = 10.0,
        budget_end_terminal: bool | None = None,
        lookahead: bool = True,
    ) -> None:
        super().__init__(gammas)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: choose one of {ACTIVATIONS}")
        self.control = check_control(control)
        self.lookahead = check_lookahead(lookahead, self.control)
        token = self.control == "token"
        self.net_arch = tuple(int(h) for h in net_arch)
        self.activation = activation
        self.learning_rate = float(learning_rate)
        self.n_steps = int(n_steps)
        self.batch_size = int(batch_size)
        self.n_epochs = int(n_epochs)
        self.discount = float(DEFAULT_DISCOUNT[self.control] if discount is None else discount)
        self.gae_lambda = float(gae_lambda)
        self.ent_coef = float(ent_coef)
        self.seed = int(seed)
        self.normalize = bool(token if normalize is None else normalize)
        self.norm_reward = bool(self.normalize if norm_reward is None else norm_reward)
        self.clip_obs = float(clip_obs)
        self.budget_end_terminal = bool(token if budget_end_terminal is None else budget_end_terminal)
        self.model: Any = None  # the SB3 PPO object after train()
        self.policy: Any = None
        self.timesteps = 0
        # VecNormalize's running statistics (its initial values: mean 0, var 1, count 1e-4)
        self.obs_mean = np.zeros(self.obs_dim, np.float64)
        self.obs_var = np.ones(self.obs_dim, np.float64)
        self.obs_count = 1e-4
        self.ret_stats = (0.0, 1.0, 1e-4)  # the return's running mean, var, count
        self._build_policy()

    # ---- SB3 objects ----------------------------------------------------------------------
    def spaces(self):
        from gymnasium import spaces

        low, high = obs_bounds(self.obs_version, self.control)
        n = 2 if self.control == "token" else len(self.gammas)
        return spaces.Box(low, high, dtype=np.float32), spaces.Discrete(n)

    def _on_obs_version(self) -> None:
        """A new observation version: fresh statistics and policy of its size (before training)."""
        if self.obs_mean.shape != (self.obs_dim,):
            if self.model is not None or self.timesteps:
                old = obs_version_of_dim(self.obs_mean.shape[0], self.control)
                raise ValueError(f"{self.name}: trained on observation version {old}: it cannot change version")
            self.obs_mean = np.zeros(self.obs_dim, np.float64)
            self.obs_var = np.ones(self.obs_dim, np.float64)
            self._build_policy()

    def _policy_kwargs(self) -> dict[str, Any]:
        from torch import nn

        act = {"tanh": nn.Tanh, "relu": nn.ReLU}[self.activation]
        return {"net_arch": list(self.net_arch), "activation_fn": act}

    def _build_policy(self) -> None:
        import torch
        from stable_baselines3.common.policies import ActorCriticPolicy

        torch.manual_seed(self.seed)
        obs_space, act_space = self.spaces()
        self.policy = ActorCriticPolicy(obs_space, act_space, lambda _: self.learning_rate, **self._policy_kwargs())
        self.policy.set_training_mode(False)
        self._export()

    def _export(self) -> None:
        """Copy the actor (policy_net + action_net) and the observation statistics to numpy."""
        sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in self.policy.state_dict().items()}
        layers = []
        i = 0
        while f"mlp_extractor.policy_net.{i}.weight" in sd:
            layers.append((sd[f"mlp_extractor.policy_net.{i}.weight"], sd[f"mlp_extractor.policy_net.{i}.bias"]))
            i += 2
        self._layers = layers
        self._Wa, self._ba = sd["action_net.weight"], sd["action_net.bias"]
        self._act_fn = np.tanh if self.activation == "tanh" else (lambda h: np.maximum(h, 0.0))
        self._std = np.sqrt(self.obs_var + NORM_EPS)

    def check_env(self, env: Any) -> None:
        """Refuse an env of the other action mode (or whose observations do not fit)."""
        control = _control_of(env)
        if control is not None and control != self.control:
            raise ValueError(
                f"{self.name}: a control={self.control!r} agent cannot run in a control={control!r} env "
                f"(train or load a PPOAgent(control={control!r}) for it)"
            )
        if self.control == "token":
            check_token_variant(self.name, self.lookahead, env)
        space = getattr(env, "observation_space", None)
        shape = getattr(getattr(env, "single_observation_space", space), "shape", None)
        version = env_obs_version(env)
        if version is not None:
            self.check_obs_version(version)
        if shape is not None and tuple(shape)[-1:] != (self.obs_dim,):
            raise ValueError(
                f"{self.name}: a control={self.control!r} agent observes {self.obs_dim} values, "
                f"the env {tuple(shape)[-1]} (step mode observes {obs_dim(self.obs_version)}, token mode "
                f"{obs_dim(self.obs_version, 'token')})"
            )

    def bind(self, env: Any) -> Agent:
        self.check_env(env)
        if self.control == "token":
            return self  # token mode's actions are draft/verify: the gamma set only caps drafting
        return super().bind(env)

    def wrap_env(self, venv: Any) -> Any:
        """The training env: ``venv`` with the budget's end made terminal and ``VecNormalize``
        (as configured), its statistics continued from the agent's."""
        if self.budget_end_terminal:
            venv = budget_end_is_terminal(venv)
        if not self.normalize:
            return venv
        from stable_baselines3.common.vec_env import VecNormalize

        vn = VecNormalize(
            venv, norm_obs=True, norm_reward=self.norm_reward, clip_obs=self.clip_obs, gamma=self.discount
        )
        obs_rms: Any = vn.obs_rms  # a RunningMeanStd (Box observations)
        obs_rms.mean, obs_rms.var, obs_rms.count = self.obs_mean.copy(), self.obs_var.copy(), self.obs_count
        ret_rms: Any = vn.ret_rms
        ret_rms.mean, ret_rms.var, ret_rms.count = (np.float64(x) for x in self.ret_stats)
        return vn

    def _take_stats(self, vn: Any) -> None:
        from stable_baselines3.common.vec_env import VecNormalize

        if isinstance(vn, VecNormalize):
            rms: Any = vn.obs_rms
            self.obs_mean = np.asarray(rms.mean, np.float64).copy()
            self.obs_var = np.asarray(rms.var, np.float64).copy()
            self.obs_count = float(rms.count)
            r = vn.ret_rms
            self.ret_stats = (float(np.asarray(r.mean)), float(np.asarray(r.var)), float(r.count))

    def make_model(self, venv: Any, tb_log_dir: str | None = None, verbose: int = 0):
        """The SB3 PPO object on ``venv`` (created once; later calls reuse it with the new env)."""
        from stable_baselines3 import PPO

        if self.model is None:
            self.model = PPO(
                "MlpPolicy",
                venv,
                learning_rate=self.learning_rate,
                n_steps=self.n_steps,
                batch_size=self.batch_size,
                n_epochs=self.n_epochs,
                gamma=self.discount,
                gae_lambda=self.gae_lambda,
                ent_coef=self.ent_coef,
                policy_kwargs=self._policy_kwargs(),
                tensorboard_log=tb_log_dir,
                seed=self.seed,
                device="cpu",
                verbose=verbose,
            )
            if self.timesteps:  # continue from loaded weights
                self.model.policy.load_state_dict(self.policy.state_dict())
            self.policy = self.model.policy
        else:
            self.model.set_env(venv)
        return self.model

    def train(
        self,
        venv: Any,
        total_timesteps: int,
        tb_log_dir: str | None = None,
        callback: Any = None,
        progress: bool = False,
        tb_log_name: str = "PPO",
    ) -> PPOAgent:
        """Train on ``venv`` (an SB3 VecEnv of this agent's mode; wrapped by :meth:`wrap_env`)."""
        import torch

        self.check_env(venv)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small networks: extra threads only add contention
        try:
            self._learn(self.wrap_env(venv), total_timesteps, tb_log_dir, callback, progress, tb_log_name)
        finally:
            torch.set_num_threads(threads)
        return self

    def _learn(self, venv, total_timesteps, tb_log_dir, callback, progress, tb_log_name) -> None:
        model = self.make_model(venv, tb_log_dir)
        model.learn(
            total_timesteps=total_timesteps,
            callback=callback,
            progress_bar=progress,
            reset_num_timesteps=self.timesteps == 0,
            tb_log_name=tb_log_name,
        )
        self.timesteps = int(model.num_timesteps)
        self._take_stats(venv)
        self.policy.set_training_mode(False)
        self._export()

    # ---- decisions ------------------------------------------------------------------------
    def normalize_obs(self, obs: np.ndarray) -> np.ndarray:
        """What the policy network sees: the raw observation, normalised as in training
        (VecNormalize's formula, float64 then float32); unchanged without normalisation."""
        x = np.asarray(obs, dtype=np.float32)
        if not self.normalize:
            return x
        z = np.clip((x - self.obs_mean) / self._std, -self.clip_obs, self.clip_obs)
        return z.astype(np.float32)

    def logits(self, obs: np.ndarray) -> np.ndarray:
        h = self.normalize_obs(obs)
        f = self._act_fn
        for W, b in self._layers:
            h = f(W @ h + b) if h.ndim == 1 else f(h @ W.T + b)
        return (self._Wa @ h + self._ba) if h.ndim == 1 else (h @ self._Wa.T + self._ba)

    def act(self, obs: np.ndarray) -> int:
        return int(np.argmax(self.logits(obs)))

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        x = np.asarray(obs, dtype=np.float32)
        x = x.reshape(1, -1) if x.ndim == 1 else x
        self._check_obs_batch(x)
        return np.argmax(self.logits(x), axis=1).astype(np.int64)

    def act_torch(self, obs: np.ndarray) -> np.ndarray:
        """Reference decisions: SB3's ``policy.predict(normalised obs, deterministic=True)``."""
        x = self.normalize_obs(np.asarray(obs, dtype=np.float32).reshape(-1, self.obs_dim))
        a, _ = self.policy.predict(x, deterministic=True)
        return np.asarray(a, dtype=np.int64)

    # ---- persistence ----------------------------------------------------------------------
    @classmethod
    def load(cls, path: Any, control: str | None = None) -> Agent:
        """Load a saved PPO agent; with ``control=``, refuse one saved for the other mode."""
        from .base import AgentFormatError

        agent = super().load(path)
        if control is not None and getattr(agent, "control", "step") != check_control(control):
            raise AgentFormatError(
                f"{path}: holds a control={getattr(agent, 'control', 'step')!r} PPO agent, not control={control!r}"
            )
        return agent

    def get_config(self) -> dict[str, Any]:
        return {
            "net_arch": list(self.net_arch),
            "activation": self.activation,
            "learning_rate": self.learning_rate,
            "n_steps": self.n_steps,
            "batch_size": self.batch_size,
            "n_epochs": self.n_epochs,
            "discount": self.discount,
            "gae_lambda": self.gae_lambda,
            "ent_coef": self.ent_coef,
            "seed": self.seed,
            "gammas": list(self.gammas),
            "control": self.control,
            "normalize": self.normalize,
            "norm_reward": self.norm_reward,
            "clip_obs": self.clip_obs,
            "budget_end_terminal": self.budget_end_terminal,
            "lookahead": self.lookahead,
        }

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"timesteps": self.timesteps}
        if self.normalize:
            state["obs_count"] = self.obs_count
            state["ret_stats"] = list(self.ret_stats)
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        self.timesteps = int(state.get("timesteps", 0))
        self.obs_count = float(state.get("obs_count", self.obs_count))
        mean, var, count = state.get("ret_stats", self.ret_stats)
        self.ret_stats = (float(mean), float(var), float(count))

    def get_tensors(self) -> dict[str, np.ndarray]:
        out = {k: v.detach().cpu().numpy().copy() for k, v in self.policy.state_dict().items()}
        if self.normalize:
            out[_RMS[0]], out[_RMS[1]] = self.obs_mean.copy(), self.obs_var.copy()
        return out

    def set_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        import torch

        tensors = dict(tensors)
        rms = [tensors.pop(k, None) for k in _RMS]
        self._set_rms(rms)
        sd = self.policy.state_dict()
        missing = set(sd) - set(tensors)
        extra = set(tensors) - set(sd)
        if missing or extra:
            raise ValueError(
                f"policy weights do not match the architecture: missing {sorted(missing)}, unexpected {sorted(extra)}"
                + self._mode_hint(tensors)
            )
        new = {}
        for k, v in sd.items():
            t = np.asarray(tensors[k])
            if t.shape != tuple(v.shape):
                hint = self._mode_hint(tensors)
                raise ValueError(f"tensor {k!r} has shape {t.shape}, expected {tuple(v.shape)}{hint}")
            new[k] = torch.from_numpy(t.astype(np.float32).copy())
        self.policy.load_state_dict(new)
        self._export()

    def _set_rms(self, rms: list[np.ndarray | None]) -> None:
        if not self.normalize:
            if any(r is not None for r in rms):
                raise ValueError("observation statistics saved for an agent configured without normalisation")
            return
        if any(r is None for r in rms):
            raise ValueError(f"a normalising agent needs tensors {list(_RMS)}")
        mean, var = (np.asarray(r, np.float64) for r in rms)
        if mean.shape != (self.obs_dim,) or var.shape != (self.obs_dim,):
            other = mean.shape[-1:] in ((obs_dim(self.obs_version),), (obs_dim(self.obs_version, "token"),))
            raise ValueError(
                f"observation statistics of shape {mean.shape}, expected ({self.obs_dim},) for control={self.control!r}"
                + (": they belong to the other control mode" if other else "")
            )
        self.obs_mean, self.obs_var = mean.copy(), var.copy()

    def _mode_hint(self, tensors: dict[str, np.ndarray]) -> str:
        w = tensors.get("mlp_extractor.policy_net.0.weight")
        dim = None if w is None else np.asarray(w).shape[-1]
        if dim in (obs_dim(self.obs_version), obs_dim(self.obs_version, "token")) and dim != self.obs_dim:
            return f" (the weights observe {dim} values: they belong to the other control mode)"
        return ""
