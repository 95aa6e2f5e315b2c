"""Logging ordinary episodes of an environment (the chosen gamma's outcome only).

:class:`RecordSteps` wraps ``SpecKV-v0`` (or any SpecKV env) and writes each finished episode
as a ``speckv-steps/2`` Parquet file (replay/SCHEMA.md) with the live engine's clip convention
and the episode's finish reason, so that replaying the log answers a step as live play would.
Every file is written atomically and durably, under a name unique to the session (time, pid,
random token) and never over an existing file, so an interrupted run keeps every finished
episode and a later session never replaces an earlier one's logs. Such logs are *censored*: a
step at gamma g with k < g accepted tells the outcome for every gamma, with k = g only for
gammas <= g. Replay them with ``gym.make("SpecKVReplay-v0", logs=folder)``. For
full-information traces (every policy answered exactly), use ``speckv profile`` instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import pyarrow as pa

from speckv_env.core import CostModel

from .costs import cost_key, fingerprint
from .schema import STEPS_ARROW_SCHEMA, STEPS_COLUMNS, STEPS_SCHEMA_VERSION
from .steprule import CLIP_ENGINE
from .trace import atomic_write_bytes, write_parquet_atomic


def _identity(u: Any) -> tuple[str, str, str]:
    """(pair, device, draft fingerprint) of the recording: the live env's pair, else the cost
    model's (an env without a pair, e.g. a replay, has no other machine to name)."""
    pair = getattr(u, "pair", None)
    if pair is not None:
        device = getattr(pair.device, "type", None) or str(pair.device)
        return str(pair.name), str(device), str(getattr(pair, "draft_fingerprint", "") or "")
    cm = u.cost_model
    return cm.pair, cm.device, fingerprint(cm.meta)


class RecordSteps(gym.Wrapper):
    """Write every finished episode's steps to ``folder/steps-<session>-<episode>.parquet``."""

    def __init__(self, env: gym.Env, folder: str | Path, source: str = "speckv-live") -> None:
        super().__init__(env)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.source = source
        self.session = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(4)}"
        self._rows: list[dict[str, Any]] = []
        self._ep: dict[str, Any] = {}
        self._episodes = 0
        self._pos = 0
        self._cost_written: set[tuple] = set()

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._rows = []
        self._ep = dict(info)
        self._pos = 0
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
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
            summary = info.get("episode_summary") or {}
            # no summary: a wrapper cut the episode before generation ended
            self._flush(summary.get("finish_reason") or ("eos" if terminated else "truncated"))
        return obs, reward, terminated, truncated, info

    def _run_columns(self, u: Any, finish_reason: str) -> dict[str, Any]:
        ep = self._ep
        comp = getattr(u.backend, "compression", "fp32")
        pair, device, fp = _identity(u)
        prompts = getattr(u.backend, "prompts", None)
        trace = getattr(u.backend, "trace", None)
        prompt = prompts[ep["episode_index"]] if prompts is not None else None
        return {
            "schema": STEPS_SCHEMA_VERSION,
            "source": self.source,
            "run_id": f"{ep.get('prompt_id')}|{comp}|{ep.get('mode')}|{ep.get('episode_seed')}|"
            f"{self.session}-{self._episodes:06d}",
            "pair": pair,
            "compression": comp,
            "device": device,
            "task": ep.get("task", ""),
            "split": getattr(prompt, "split", "") if prompt is not None else getattr(trace, "split", ""),
            "prompt_id": ep.get("prompt_id", ""),
            "prompt": getattr(prompt, "text", "") if prompt is not None else "",
            "mode": ep.get("mode", "greedy"),
            "max_new_tokens": int(u.backend.max_new_tokens),
            "gamma_clip": CLIP_ENGINE,
            "finish_reason": finish_reason,
            "draft_fingerprint": fp,
        }

    def _flush(self, finish_reason: str) -> None:
        u = self.env.unwrapped
        const = self._run_columns(u, finish_reason)
        cols: dict[str, list] = {c: [] for c in STEPS_COLUMNS}
        for r in self._rows:
            for c in STEPS_COLUMNS:
                cols[c].append(r[c] if c in r else const[c])
        table = pa.table(cols, schema=STEPS_ARROW_SCHEMA)
        write_parquet_atomic(table, self.folder / f"steps-{self.session}-{self._episodes:06d}.parquet", overwrite=False)
        self._save_cost_model(u.cost_model)  # type: ignore[attr-defined]  # u: the unwrapped SpecKV env
        self._episodes += 1
        self._rows = []

    def _save_cost_model(self, cm: CostModel) -> None:
        """``cost-<compression>.json`` beside the logs; never over another model: a folder that
        already holds a different one gets ``cost-<compression>-<hash>.json`` (two models for
        the same pair, compression, device and draft are then reported when the logs are read)."""
        data = json.dumps(cm.to_dict(), indent=2, sort_keys=True).encode()
        if (cost_key(cm), data) in self._cost_written:
            return
        if not any(CostModel.load(p).to_dict() == cm.to_dict() for p in self.folder.glob("cost-*.json")):
            name = f"cost-{cm.compression}.json"
            if (self.folder / name).exists():
                name = f"cost-{cm.compression}-{hashlib.sha1(data).hexdigest()[:8]}.json"
            # FileExistsError: another session wrote that very name meanwhile (the same bytes)
            with contextlib.suppress(FileExistsError):
                atomic_write_bytes(self.folder / name, data, overwrite=False)
        self._cost_written.add((cost_key(cm), data))
