"""Logging ordinary episodes of an environment (the chosen gamma's outcome only).

:class:`RecordSteps` wraps ``SpecKV-v0`` (or any SpecKV env) and writes each finished episode
as a ``speckv-steps/1`` Parquet part file (replay/SCHEMA.md), atomically, so an interrupted
run keeps every finished episode. Such logs are *censored* (DESIGN.md): a step at gamma g
with k < g accepted tells the outcome for every gamma, with k = g only for gammas <= g.
Replay them with ``gym.make("SpecKVReplay-v0", logs=folder)``. For full-information traces
(every policy answered exactly), use ``speckv profile`` instead.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import gymnasium as gym
import pyarrow as pa
import pyarrow.parquet as pq


class RecordSteps(gym.Wrapper):
    """Write every finished episode's steps to ``folder/steps-<run>.parquet``."""

    def __init__(self, env: gym.Env, folder: str | Path, source: str = "speckv-live") -> None:
        super().__init__(env)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.source = source
        self._rows: list[dict[str, Any]] = []
        self._ep: dict[str, Any] = {}
        self._episodes = 0
        self._cost_written: set[str] = set()

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._rows = []
        self._ep = dict(info)
        self._pos = 0
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        u = self.env.unwrapped
        sigs = info.get("draft_signals") or []
        ents = [s.entropy / math.log(2) for s in sigs] or [0.0]
        confs = [s.top1 for s in sigs] or [0.0]
        g, k = int(info["gamma"]), int(info["accepted"])
        self._rows.append(
            {
                "step": len(self._rows),
                "position": self._pos,
                "gamma": int(info["requested_gamma"]),
                "drafted": g,
                "accepted": k,
                "tokens_produced": int(info["emitted"]),
                "censored": bool(k >= g),
                "post_mean_entropy_bits": sum(ents) / len(ents),
                "post_mean_confidence": sum(confs) / len(confs),
                "post_max_entropy_bits": max(ents),
                "post_min_confidence": min(confs),
            }
        )
        self._pos += int(info["emitted"])
        if terminated or truncated:
            self._flush(u)
        return obs, reward, terminated, truncated, info

    def _flush(self, u) -> None:
        from replay.schema import STEPS_ARROW_SCHEMA, STEPS_COLUMNS, STEPS_SCHEMA_VERSION
        from replay.trace import atomic_write_bytes

        ep = self._ep
        comp = getattr(u.backend, "compression", "fp32")
        run_id = f"{ep.get('prompt_id')}|{comp}|{ep.get('mode')}|{ep.get('episode_seed')}|{self._episodes}"
        pair = getattr(getattr(u, "pair", None), "name", "")
        const = {
            "schema": STEPS_SCHEMA_VERSION,
            "source": self.source,
            "run_id": run_id,
            "pair": pair,
            "compression": comp,
            "device": str(getattr(getattr(u, "pair", None), "device", "cpu")),
            "task": ep.get("task", ""),
            "split": getattr(u.backend.prompts[ep["episode_index"]], "split", "")
            if hasattr(u.backend, "prompts")
            else "",
            "prompt_id": ep.get("prompt_id", ""),
            "prompt": getattr(u.backend.prompts[ep["episode_index"]], "text", "")
            if hasattr(u.backend, "prompts")
            else "",
            "mode": ep.get("mode", "greedy"),
            "max_new_tokens": int(u.backend.max_new_tokens),
        }
        cols = {c: [] for c in STEPS_COLUMNS}
        for r in self._rows:
            for c in STEPS_COLUMNS:
                cols[c].append(r[c] if c in r else const[c])
        table = pa.table(cols, schema=STEPS_ARROW_SCHEMA)
        name = "steps-" + hashlib.sha1(run_id.encode()).hexdigest()[:16] + ".parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(self.folder / name, sink.getvalue().to_pybytes())
        if comp not in self._cost_written:
            u.cost_model.save(self.folder / f"cost-{comp}.json")
            self._cost_written.add(comp)
        self._episodes += 1
        self._rows = []
