"""The SpecKV paper's idea, done right: a small MLP predicts acceptance, a cost model picks gamma.

Model. From the pre-choice observation (13 features, standardised) an MLP 13 -> 32 -> 32 -> 1
(ReLU) outputs the logit of alpha, the per-token acceptance probability of a draft started
here, under the geometric-run model of Leviathan et al. (each drafted token accepted with
probability alpha until the first rejection).

Label: the step's acceptance events, not the single first-token event a_t. A step at gamma g
with k accepted reveals k ones and, if k < g, one zero (a censored geometric run); the
log-likelihood of the run is k log(alpha) + [k < g] log(1 - alpha), i.e. a binary
cross-entropy over the events with target k / n and weight n = k + [k < g]. Why:
  * its maximiser is exactly the alpha the expected-tokens formula needs (the geometric
    parameter that explains the whole run, not just the first token's acceptance, which
    is typically higher than the later tokens');
  * it is unbiased under censoring, so it trains on logs of ordinary runs of any behaviour
    policy (the chosen gamma's outcome only), not just on full-information traces;
  * it uses every verified token of a step (more signal per step than a_t).
Steps at gamma 0 carry no event and are skipped.

Decision. ``rule="time"`` (default): gamma = argmax_g E[tokens/s | alpha, g] under the cost
model (see :class:`agents.base.CostModelMixin` for where it comes from). ``rule="tokens"``:
the paper's argmax of expected tokens per step, which picks the largest gamma for every
alpha > 0 (tests show it). The argmax is a precomputed exact threshold table in logit space
(:class:`agents.base.GammaTable`), so no sigmoid is evaluated at decision time.

Speed. torch is used only to train. act() runs a numpy forward pass with the algebra
rearranged to five numpy calls on preallocated buffers:
    relu(W x + b) = max(W x, -b) + b, and the "+ b" is folded into the next layer's bias,
    input standardisation folded into the first layer.
That is mathematically identical to the torch model, computed in float64 (the torch model's
float32 rounding aside; a test checks predictions agree to 1e-5 and decisions are identical).
Not thread-safe (shared buffers).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np

from speckv_env.core import DEFAULT_GAMMAS, CostModel

from .base import DEFAULT_VERIFY_SLOPE, I_COST_RATIO, Agent, CostModelMixin, register


def step_events(gamma: int, accepted: int) -> tuple[int, int]:
    """(hits, misses) of the acceptance events a step reveals (gamma 0: none)."""
    g, k = int(gamma), int(accepted)
    if g <= 0:
        return 0, 0
    return k, 1 if k < g else 0


@register
class SpecKVMLP(CostModelMixin, Agent):
    kind = "speckv_mlp"
    obs_state = True  # learned on one observation version

    def __init__(
        self,
        hidden: Sequence[int] = (32, 32),
        rule: str = "time",
        cost_model: CostModel | dict | None = None,
        sampling: bool = False,
        verify_slope: float = DEFAULT_VERIFY_SLOPE,
        seed: int = 0,
        gammas: Sequence[int] = DEFAULT_GAMMAS,
    ) -> None:
        super().__init__(gammas)
        if rule not in ("time", "tokens"):
            raise ValueError(f"unknown rule {rule!r}: choose 'time' or 'tokens'")
        self.rule = rule
        self.hidden = tuple(int(h) for h in hidden)
        if len(self.hidden) != 2 or min(self.hidden) < 1:
            raise ValueError(f"hidden must be two positive layer widths, got {hidden!r}")
        self.seed = int(seed)
        self._init_cost(cost_model, sampling, verify_slope)
        self.trained = False
        self.train_loss: float | None = None
        self._init_params()

    def _init_params(self) -> None:
        """Fresh weights (seeded) for the agent's observation size."""
        rng = np.random.default_rng(self.seed)
        h1, h2 = self.hidden
        D = self.obs_dim

        def init(o: int, i: int) -> np.ndarray:  # torch.nn.Linear's default U(-1/sqrt(i), 1/sqrt(i))
            return rng.uniform(-1, 1, size=(o, i)).astype(np.float32) / np.float32(np.sqrt(i))

        self.params: dict[str, np.ndarray] = {
            "W1": init(h1, D),
            "b1": init(h1, 1)[:, 0],
            "W2": init(h2, h1),
            "b2": init(h2, 1)[:, 0],
            "W3": init(1, h2),
            "b3": init(1, 1)[:, 0],
            "mean": np.zeros(D, np.float32),
            "std": np.ones(D, np.float32),
        }
        self._build_fast()

    def _on_obs_version(self) -> None:
        if self.params["W1"].shape[1] != self.obs_dim:
            if self.trained:
                raise ValueError(f"{self.name}: trained on another observation version: it cannot change version")
            self._init_params()

    # ---- fast numpy path --------------------------------------------------------------
    def _build_fast(self) -> None:
        p = {k: v.astype(np.float64) for k, v in self.params.items()}
        W1 = p["W1"] / p["std"][None, :]
        b1 = p["b1"] - W1 @ p["mean"]
        c2 = p["W2"] @ b1 + p["b2"]
        # layer 1: h1 = max(W1 x, -b1)             (true h1 = this + b1)
        # layer 2: h2 = max(W2 h1, -(W2 b1 + b2))  (true h2 = this + W2 b1 + b2)
        # output:  z  = W3 h2 + (W3 (W2 b1 + b2) + b3)
        # float64: folding the standardisation into layer 1 cancels large terms, which float32
        # would round visibly (1e-3 in the logit); in float64 the path is exact to ~1e-12
        self._W1 = np.ascontiguousarray(W1)
        self._nb1 = -b1
        self._W2 = np.ascontiguousarray(p["W2"])
        self._nc2 = -c2
        self._w3 = np.ascontiguousarray(p["W3"][0])
        self._c3 = float(p["W3"][0] @ c2 + p["b3"][0])
        self._h1 = np.empty(self.hidden[0], np.float64)
        self._h2 = np.empty(self.hidden[1], np.float64)

    def predict_logit(self, obs: np.ndarray) -> float:
        """logit(alpha) for one observation (numpy fast path)."""
        if type(obs) is not np.ndarray:
            obs = np.asarray(obs, dtype=np.float64)
        h1, h2 = self._h1, self._h2
        np.dot(self._W1, obs, out=h1)
        np.maximum(h1, self._nb1, out=h1)
        np.dot(self._W2, h1, out=h2)
        np.maximum(h2, self._nc2, out=h2)
        return float(self._w3.dot(h2)) + self._c3

    def predict_logit_batch(self, obs: np.ndarray) -> np.ndarray:
        X = np.asarray(obs, dtype=np.float64)
        h1 = np.maximum(X @ self._W1.T, self._nb1)
        h2 = np.maximum(h1 @ self._W2.T, self._nc2)
        return h2 @ self._w3 + self._c3

    def predict_alpha(self, obs: np.ndarray) -> float:
        return float(1.0 / (1.0 + np.exp(-self.predict_logit(obs))))

    def predict_alpha_batch(self, obs: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.predict_logit_batch(obs)))

    def act(self, obs: np.ndarray) -> int:
        t = self.table_for(float(obs[I_COST_RATIO]))
        return t.choices[bisect_right(t.logit_thresholds, self.predict_logit(obs))]

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float32)
        self._check_obs_batch(obs)
        cr = obs[:, I_COST_RATIO]
        if (
            self.rule == "time"
            and self.cost_model is None
            and self._env is None
            and len(cr)
            and not np.all(cr == cr[0])
        ):
            return super().act_batch(obs)
        t = self.table_for(float(cr[0]) if len(cr) else 0.0)
        return t.index_logit_batch(self.predict_logit_batch(obs))

    # ---- torch: reference model and training -----------------------------------------------
    def torch_model(self):
        """The torch reference: standardise, Linear-ReLU-Linear-ReLU-Linear (float32)."""
        import torch
        from torch import nn

        h1, h2 = self.hidden
        net = nn.Sequential(nn.Linear(self.obs_dim, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 1))
        with torch.no_grad():
            for i, (wname, bname) in zip((0, 2, 4), (("W1", "b1"), ("W2", "b2"), ("W3", "b3"))):
                layer = cast(nn.Linear, net[i])
                layer.weight.copy_(torch.from_numpy(self.params[wname]))
                layer.bias.copy_(torch.from_numpy(self.params[bname]))
        mean = torch.from_numpy(self.params["mean"].copy())
        std = torch.from_numpy(self.params["std"].copy())

        class Standardised(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = net
                self.register_buffer("mean", mean)
                self.register_buffer("std", std)

            def forward(self, x):
                return self.net((x - self.mean) / self.std).squeeze(-1)

        return Standardised()

    def predict_logit_torch(self, obs: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.as_tensor(np.asarray(obs, dtype=np.float32).reshape(-1, self.obs_dim))
            return self.torch_model()(x).numpy().astype(np.float64)

    def act_torch(self, obs: np.ndarray) -> np.ndarray:
        """Decisions through the torch model and the exact (brute-force) argmax: the reference."""
        obs = np.asarray(obs, dtype=np.float32).reshape(-1, self.obs_dim)
        z = self.predict_logit_torch(obs)
        alpha = 1.0 / (1.0 + np.exp(-z))
        return np.array([self.table_for(float(o[I_COST_RATIO])).best_exact(float(a)) for o, a in zip(obs, alpha)])

    def fit(
        self,
        obs: np.ndarray,
        hits: np.ndarray,
        misses: np.ndarray,
        epochs: int = 60,
        lr: float = 3e-3,
        batch_size: int = 512,
        weight_decay: float = 1e-5,
        log: Callable[[int, float], None] | None = None,
        progress: bool = False,
    ) -> list[float]:
        """Fit by weighted BCE over acceptance events (see module docs). Returns per-epoch losses."""
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny MLP: threads only add contention (25x slower on 2 busy cores)
        try:
            return self._fit(obs, hits, misses, epochs, lr, batch_size, weight_decay, log, progress)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, obs, hits, misses, epochs, lr, batch_size, weight_decay, log, progress) -> list[float]:
        import torch
        import torch.nn.functional as F

        X = np.asarray(obs, dtype=np.float32)
        hits = np.asarray(hits, dtype=np.float32)
        misses = np.asarray(misses, dtype=np.float32)
        n = hits + misses
        keep = n > 0
        X, hits, n = X[keep], hits[keep], n[keep]
        if len(X) == 0:
            raise ValueError("no acceptance events to fit (all steps at gamma 0?)")
        mean = X.mean(0)
        std = X.std(0)
        std[std < 1e-6] = 1.0
        self.params["mean"], self.params["std"] = mean.astype(np.float32), std.astype(np.float32)
        torch.manual_seed(self.seed)
        model = self.torch_model()
        # fresh torch initialisation (seeded) for the layers
        for m in model.net:
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        opt = torch.optim.Adam(model.net.parameters(), lr=lr, weight_decay=weight_decay)
        Xt = torch.from_numpy(X)
        yt = torch.from_numpy(hits / n)
        wt = torch.from_numpy(n)
        gen = torch.Generator().manual_seed(self.seed)
        losses: list[float] = []
        it = range(epochs)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="speckv_mlp fit", leave=False)
        for ep in it:
            perm = torch.randperm(len(Xt), generator=gen)
            tot, wsum = 0.0, 0.0
            for s in range(0, len(Xt), batch_size):
                idx = perm[s : s + batch_size]
                z = model(Xt[idx])
                w = wt[idx]
                loss = (F.binary_cross_entropy_with_logits(z, yt[idx], reduction="none") * w).sum() / w.sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                ws = float(w.sum())
                tot += float(loss.detach()) * ws
                wsum += ws
            losses.append(tot / wsum)
            if log is not None:
                log(ep, losses[-1])
        with torch.no_grad():
            for i, (wname, bname) in zip((0, 2, 4), (("W1", "b1"), ("W2", "b2"), ("W3", "b3"))):
                self.params[wname] = model.net[i].weight.detach().numpy().astype(np.float32).copy()
                self.params[bname] = model.net[i].bias.detach().numpy().astype(np.float32).copy()
        self._build_fast()
        self.trained = True
        self.train_loss = losses[-1] if losses else None
        return losses

    # ---- persistence ----------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        return {
            "hidden": list(self.hidden),
            "rule": self.rule,
            **self._cost_config(),
            "seed": self.seed,
            "gammas": list(self.gammas),
        }

    def get_state(self) -> dict[str, Any]:
        return {"trained": self.trained, "train_loss": self.train_loss}

    def set_state(self, state: dict[str, Any]) -> None:
        self.trained = bool(state.get("trained", False))
        tl = state.get("train_loss")
        self.train_loss = None if tl is None else float(tl)

    def get_tensors(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.params.items()}

    def set_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        missing = set(self.params) - set(tensors)
        if missing:
            raise ValueError(f"missing tensors {sorted(missing)}")
        for k, v in self.params.items():
            t = np.asarray(tensors[k])
            if t.shape != v.shape:
                raise ValueError(f"tensor {k!r} has shape {t.shape}, expected {v.shape}")
            if not np.all(np.isfinite(t)):
                raise ValueError(f"tensor {k!r} has non-finite values")
            self.params[k] = t.astype(np.float32)
        self._build_fast()
