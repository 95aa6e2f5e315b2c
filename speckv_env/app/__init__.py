"""The application layer: the ``speckv`` command line and what only it runs.

Imports point down: this package may import :mod:`agents`, :mod:`replay` and the core of
:mod:`speckv_env`; nothing outside it imports it (``tests/test_layers.py`` checks).

- :mod:`.cli`: the ``speckv`` command (generate, profile, calibrate, train, compare, bench, demo).
- :mod:`.profile`: recording full-information traces; :mod:`.livecheck`: replay predictions
  checked against live decoding; :mod:`.demo`: the main job.
- :mod:`.compare`, :mod:`.report`, :mod:`.plots`: the controller comparison and its report.
- :mod:`.bench_engine`, :mod:`.bench_env`, :mod:`.bench_agents`, :mod:`.livebench`: benchmarks.
"""
