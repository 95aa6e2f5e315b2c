"""Which cost model prices which episode: cost models found beside logs are matched to traces
(and step-log runs) by pair, compression, device, and the draft's fingerprint when both sides
record it; two different models for the same key are a conflict, an episode without a matching
model an error.

An explicit ``cost_model=`` (one for all) or ``cost_models=`` (by compression, a level
none/int8/nf4, or ``"*"``) wins over the files, to re-score traces under another cost model;
when its pair, compression, device or draft fingerprint disagrees with the episode's, that is
an error unless ``allow_cost_model_mismatch=True``. Synthetic cost models or episodes
(``meta["synthetic"]``, e.g. :meth:`CostModel.unit`, :func:`replay.trace.synthetic_trace`)
describe no real machine and are not checked; synthetic episodes are matched to the models
beside them by compression alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speckv_env.core import CostModel, compression_level

from .schema import TraceFormatError

PathLike = str | os.PathLike

CostKey = tuple[str, str, str, str]
"""(pair, compression, device, draft fingerprint or '')."""


class CostModelConflictError(ValueError):
    """Two different cost models claim the same (pair, compression, device, fingerprint)."""


def fingerprint(meta: Mapping[str, Any] | None) -> str:
    """The draft fingerprint recorded in a ``meta`` dict ('' when none)."""
    return str((meta or {}).get("draft_fingerprint") or "")


def cost_key(cm: CostModel) -> CostKey:
    return (cm.pair, cm.compression, cm.device, fingerprint(cm.meta))


def _times(cm: CostModel) -> tuple:
    return (cm.t_draft, tuple(cm.t_verify), cm.t_target, cm.t_overhead)


def _describe(key: CostKey) -> str:
    pair, comp, dev, fp = key
    return f"pair {pair!r}, compression {comp!r}, device {dev!r}" + (f", draft {fp}" if fp else "")


@dataclass(frozen=True)
class Episode:
    """What a cost model is matched against: an episode's recording identity."""

    pair: str
    compression: str
    device: str
    fingerprint: str = ""
    synthetic: bool = False
    where: str = ""

    @classmethod
    def of_trace(cls, t: Any) -> Episode:
        return cls(
            t.pair, t.compression, t.device, fingerprint(t.meta), bool(t.meta.get("synthetic")), f"trace {t.trace_id!r}"
        )

    @classmethod
    def of_run(cls, r: Mapping[str, Any]) -> Episode:
        return cls(r["pair"], r["compression"], r["device"], r["draft_fingerprint"], False, f"run {r['run_id']!r}")

    @property
    def key(self) -> CostKey:
        return (self.pair, self.compression, self.device, self.fingerprint)


class CostModelSet(Mapping[str, CostModel]):
    """Cost models with the files they came from, matched to episodes by key.

    As a mapping it is keyed by compression (for code that looks models up that way); a
    compression with two different models is then ambiguous (:class:`CostModelConflictError`).
    """

    def __init__(self) -> None:
        self._entries: list[tuple[CostModel, str]] = []

    def add(self, cm: CostModel, source: str) -> None:
        """Add a model; the same model again is ignored, another one for its key is a conflict."""
        for other, src in self._entries:
            if cost_key(other) == cost_key(cm):
                if _times(other) == _times(cm):
                    return
                raise CostModelConflictError(
                    f"{source} and {src} hold two different cost models for {_describe(cost_key(cm))}; "
                    "keep one, or pass cost_models= explicitly"
                )
        self._entries.append((cm, source))

    def update(self, other: CostModelSet) -> None:
        for cm, src in other._entries:
            self.add(cm, src)

    def sources(self) -> list[str]:
        return [src for _, src in self._entries]

    def match(self, ep: Episode) -> CostModel:
        """The model for ``ep``: same pair, compression and device, and the same draft
        fingerprint where both record one (an exact fingerprint match is preferred)."""
        if ep.synthetic:  # a synthetic episode was recorded on no machine: by compression alone
            cands = [(cm, src) for cm, src in self._entries if cm.compression == ep.compression]
        else:
            cands = [
                (cm, src)
                for cm, src in self._entries
                if (cm.pair, cm.compression, cm.device) == (ep.pair, ep.compression, ep.device)
                and (not ep.fingerprint or not fingerprint(cm.meta) or fingerprint(cm.meta) == ep.fingerprint)
            ]
        exact = [c for c in cands if ep.fingerprint and fingerprint(c[0].meta) == ep.fingerprint]
        cands = exact or cands
        if len(cands) == 1:
            return cands[0][0]
        if cands:
            raise CostModelConflictError(
                f"{ep.where}: {len(cands)} different cost models match {_describe(ep.key)} "
                f"({', '.join(src for _, src in cands)}); keep one, or pass cost_models= explicitly"
            )
        have = "; ".join(f"{_describe(cost_key(cm))} ({src})" for cm, src in self._entries) or "none"
        raise ValueError(
            f"no cost model for {ep.where} ({_describe(ep.key)}); have: {have}. Save the cost model measured "
            "for this pair and device beside the logs, or pass cost_model=/cost_models= (with "
            "allow_cost_model_mismatch=True to price it under a model measured elsewhere)"
        )

    # ---- Mapping by compression ----------------------------------------------------------
    def __getitem__(self, compression: str) -> CostModel:
        found = [(cm, src) for cm, src in self._entries if cm.compression == compression]
        if not found:
            raise KeyError(compression)
        if len({_times(cm) for cm, _ in found}) > 1:
            raise CostModelConflictError(
                f"compression {compression!r} has {len(found)} different cost models "
                f"({', '.join(src for _, src in found)}): match them by pair and device instead"
            )
        return found[0][0]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted({cm.compression for cm, _ in self._entries}))

    def __len__(self) -> int:
        return len({cm.compression for cm, _ in self._entries})


def load_cost_models(folder: PathLike) -> CostModelSet:
    """Cost models saved beside the logs as ``cost-<compression>[-<suffix>].json``."""
    out = CostModelSet()
    for p in sorted(Path(folder).glob("cost-*.json")):
        cm = CostModel.load(p)
        key = p.stem[len("cost-") :].split("-", 1)[0]
        if cm.compression != key:
            raise TraceFormatError(f"{p}: file name says compression {key!r} but the model says {cm.compression!r}")
        out.add(cm, str(p))
    return out


def _explicit(cost_models: Mapping[str, CostModel], compression: str) -> CostModel | None:
    for key in (compression, compression_level(compression), "*"):
        if key in cost_models:
            return cost_models[key]
    return None


def _check(cm: CostModel, ep: Episode) -> None:
    if ep.synthetic or (cm.meta or {}).get("synthetic"):
        return
    fields = [
        (name, mine, theirs)
        for name, mine, theirs in (
            ("pair", cm.pair, ep.pair),
            ("compression", cm.compression, ep.compression),
            ("device", cm.device, ep.device),
            ("draft fingerprint", fingerprint(cm.meta), ep.fingerprint),
        )
        if mine and theirs and mine != theirs
    ]
    if fields:
        diff = ", ".join(f"{n} {a!r} (episode: {b!r})" for n, a, b in fields)
        raise ValueError(
            f"{ep.where}: the cost model given was measured for {diff}; pass allow_cost_model_mismatch=True "
            "to re-score the episode under it anyway"
        )


def resolve(
    ep: Episode,
    cost_model: CostModel | None,
    cost_models: Mapping[str, CostModel] | None,
    found: CostModelSet,
    allow_mismatch: bool = False,
) -> CostModel:
    """The cost model of one episode (see the module docstring for the order and the checks)."""
    cm = cost_model
    if cm is None and cost_models is not None:
        if isinstance(cost_models, CostModelSet):  # models with their files: matched by key
            return cost_models.match(ep)
        cm = _explicit(cost_models, ep.compression)
    if cm is None:
        return found.match(ep)
    if not allow_mismatch:
        _check(cm, ep)
    return cm


def resolver(
    cost_model: CostModel | None,
    cost_models: Mapping[str, CostModel] | None,
    found: CostModelSet | None = None,
    allow_mismatch: bool = False,
) -> Callable[[Episode], CostModel]:
    """A function ``Episode -> CostModel`` over fixed arguments (see :func:`resolve`)."""
    if cost_model is not None and cost_models is not None:
        raise ValueError("pass either cost_model= (one for all) or cost_models= (by compression), not both")
    found = found if found is not None else CostModelSet()
    return lambda ep: resolve(ep, cost_model, cost_models, found, allow_mismatch)
