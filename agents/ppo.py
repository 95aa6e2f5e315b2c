"""PPO (stable-baselines3) as a gamma policy, saved without pickle.

Training goes through SB3 (``PPO("MlpPolicy", venv, device="cpu", tensorboard_log=...)``) on a
vectorised env (see :func:`agents.training.make_vec_env`). After training, the actor's weights
are exported to numpy: act() is a deterministic numpy forward pass (argmax of the action
logits), identical to ``policy.predict(obs, deterministic=True)`` (tested).

Persistence: the SB3 ``.zip`` pickles parts of the model, so it is not used. ``save()`` writes
the policy's ``state_dict`` (actor and critic) with safetensors plus a JSON config; ``load()``
rebuilds an ``ActorCriticPolicy`` with the same architecture and loads the weights.
Per-step ``learn()`` is a no-op: PPO learns from rollouts in :meth:`PPOAgent.train`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from speckv_env.core import DEFAULT_GAMMAS, OBS_DIM, OBS_HIGH, OBS_LOW

from .base import Agent, register

ACTIVATIONS = ("tanh", "relu")


@register
class PPOAgent(Agent):
    kind = "ppo"

    def __init__(
        self,
        net_arch: Sequence[int] = (64, 64),
        activation: str = "tanh",
        learning_rate: float = 3e-4,
        n_steps: int = 256,
        batch_size: int = 64,
        n_epochs: int = 10,
        discount: float = 0.99,
        gae_lambda: float = 0.95,
        ent_coef: float = 0.01,
        seed: int = 0,
        gammas: Sequence[int] = DEFAULT_GAMMAS,
    ) -> None:
        super().__init__(gammas)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: choose one of {ACTIVATIONS}")
        self.net_arch = tuple(int(h) for h in net_arch)
        self.activation = activation
        self.learning_rate = float(learning_rate)
        self.n_steps = int(n_steps)
        self.batch_size = int(batch_size)
        self.n_epochs = int(n_epochs)
        self.discount = float(discount)
        self.gae_lambda = float(gae_lambda)
        self.ent_coef = float(ent_coef)
        self.seed = int(seed)
        self.model: Any = None  # the SB3 PPO object after train()
        self.policy: Any = None
        self.timesteps = 0
        self._build_policy()

    # ---- SB3 objects ----------------------------------------------------------------------
    def spaces(self):
        from gymnasium import spaces

        return spaces.Box(OBS_LOW, OBS_HIGH, dtype=np.float32), spaces.Discrete(len(self.gammas))

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
        """Copy the actor (policy_net + action_net) to numpy for the fast path."""
        sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in self.policy.state_dict().items()}
        layers = []
        i = 0
        while f"mlp_extractor.policy_net.{i}.weight" in sd:
            layers.append((sd[f"mlp_extractor.policy_net.{i}.weight"], sd[f"mlp_extractor.policy_net.{i}.bias"]))
            i += 2
        self._layers = layers
        self._Wa, self._ba = sd["action_net.weight"], sd["action_net.bias"]
        self._act_fn = np.tanh if self.activation == "tanh" else (lambda h: np.maximum(h, 0.0))

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
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small networks: extra threads only add contention
        try:
            self._learn(venv, total_timesteps, tb_log_dir, callback, progress, tb_log_name)
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
        self.policy.set_training_mode(False)
        self._export()

    # ---- decisions ------------------------------------------------------------------------
    def logits(self, obs: np.ndarray) -> np.ndarray:
        h = np.asarray(obs, dtype=np.float32)
        f = self._act_fn
        for W, b in self._layers:
            h = f(W @ h + b) if h.ndim == 1 else f(h @ W.T + b)
        return (self._Wa @ h + self._ba) if h.ndim == 1 else (h @ self._Wa.T + self._ba)

    def act(self, obs: np.ndarray) -> int:
        return int(np.argmax(self.logits(obs)))

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(np.asarray(obs, dtype=np.float32).reshape(-1, OBS_DIM)), axis=1).astype(np.int64)

    def act_torch(self, obs: np.ndarray) -> np.ndarray:
        """Reference decisions: SB3's ``policy.predict(obs, deterministic=True)``."""
        a, _ = self.policy.predict(np.asarray(obs, dtype=np.float32).reshape(-1, OBS_DIM), deterministic=True)
        return np.asarray(a, dtype=np.int64)

    # ---- persistence ----------------------------------------------------------------------
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
        }

    def get_state(self) -> dict[str, Any]:
        return {"timesteps": self.timesteps}

    def set_state(self, state: dict[str, Any]) -> None:
        self.timesteps = int(state.get("timesteps", 0))

    def get_tensors(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.policy.state_dict().items()}

    def set_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        import torch

        sd = self.policy.state_dict()
        missing = set(sd) - set(tensors)
        extra = set(tensors) - set(sd)
        if missing or extra:
            raise ValueError(
                f"policy weights do not match the architecture: missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        new = {}
        for k, v in sd.items():
            t = np.asarray(tensors[k])
            if t.shape != tuple(v.shape):
                raise ValueError(f"tensor {k!r} has shape {t.shape}, expected {tuple(v.shape)}")
            new[k] = torch.from_numpy(t.astype(np.float32).copy())
        self.policy.load_state_dict(new)
        self._export()
