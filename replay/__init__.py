"""Replay side of SpecKV gym: recorded logs, the replay environments, the oracle (no torch).

- :mod:`replay.schema`: versioned Parquet schemas ``speckv-trace/2`` and ``speckv-steps/2``
  (``/1`` is still read; documented field by field in replay/SCHEMA.md),
  :class:`~replay.schema.TraceFormatError`.
- :mod:`replay.steprule`: the step rule (g_eff, k, events, next position), scalar and vectorised.
- :mod:`replay.trace`: :class:`~replay.trace.Trace`, crash-safe
  :class:`~replay.trace.TraceWriter`, :func:`~replay.trace.read_traces`,
  :func:`~replay.trace.load_cost_models`, synthetic traces for tests and examples.
- :mod:`replay.costs`: which cost model prices which episode (pair, compression, device, draft).
- :mod:`replay.backend`: :class:`~replay.backend.TraceBackend` (the Backend over traces).
- :mod:`replay.env`: ``SpecKVReplay-v0``; :mod:`replay.vector`: its numpy-batched form.
- :mod:`replay.oracle`: the clairvoyant minimum-time gamma sequence (dynamic programming).
- :mod:`replay.importers`: the SpecKV paper's step logs (censored) and a fitted cost model;
  :mod:`replay.steplog`: step-log files; :mod:`replay.recorder`: logging live episodes.
"""
