"""Scaling out on Ray (speckv_env/app/distributed.py): `speckv profile --ray` writes the same
traces as one process, survives a killed worker and resumes across runs without duplicates or
gaps; `speckv compare --ray` reproduces the local results; without --ray, Ray is never imported.

One local Ray cluster (2 CPUs) serves the whole module; the models are tiny random pairs saved
to a folder (nothing downloaded), decoded with one torch thread per process in every run, so
that even the draft's signals agree to the bit (reductions over the vocabulary follow the
thread count)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import requires_default

from replay.trace import read_traces, synthetic_dataset
from speckv_env.core import CostModel

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
#: the small prompt set: 2 tasks x 2 test prompts x 2 modes = 8 episodes
PROFILE_ARGS = [
    "--compressions",
    "fp32",
    "--tasks",
    "math,code",
    "--splits",
    "test",
    "--modes",
    "greedy,sample",
    "--max-new-tokens",
    "16",
    "--device",
    "cpu",
    "--no-calibrate",
    "--threads",
    "1",
]
FIELDS = ("tokens", "accept", "sig_top1", "sig_entropy", "sig_margin", "step_pos", "step_gamma", "step_accepted")


@pytest.fixture(scope="module")
def cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny random pair saved as model folders, with the tokenizer of the embedded target."""
    from tiny_models import make_tiny_pair

    from speckv_env.models import load_tokenizer

    folder = tmp_path_factory.mktemp("ray_pair")
    tok = load_tokenizer(None)
    t, d = make_tiny_pair(vocab=49152, hidden=32, seed=2)
    for m, name in ((t, "t"), (d, "d")):
        m.config.eos_token_id = tok.eos_token_id
        m.generation_config.eos_token_id = tok.eos_token_id
        m.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
    return folder, ["--target", str(folder / "t"), "--draft", str(folder / "d")]


@pytest.fixture(scope="module")
def single_process(tiny_folder) -> Path:
    """The reference: `speckv profile` in one process without --ray, in a fresh interpreter that
    must not import Ray."""
    folder, pair = tiny_folder
    out = folder / "single"
    argv = ["profile", *pair, *PROFILE_ARGS, "--per-task", "2", "--out", str(out), "-q"]
    code = (
        "import sys\n"
        "from speckv_env.app.cli import main\n"
        f"assert main({argv!r}) == 0\n"
        "assert 'ray' not in sys.modules, 'profile without --ray imported Ray'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _assert_same_traces(got_src: str | Path, want_src: Path) -> None:
    """Token-identical traces (ids, tokens, accept flags, signals, the recorded path), each
    episode once (read_traces refuses a duplicate trace id)."""
    got = {t.trace_id: t for t in read_traces(got_src)}
    want = {t.trace_id: t for t in read_traces(want_src)}
    assert sorted(got) == sorted(want) and len(want) == 8
    for k, w in want.items():
        for f in FIELDS:
            assert np.array_equal(getattr(got[k], f), getattr(w, f)), (k, f)


@requires_default
def test_without_ray_profile_never_imports_ray(single_process):
    assert len(read_traces(single_process)) == 8  # the subprocess asserted that Ray stayed out


@requires_default
def test_profile_on_ray_writes_the_single_process_traces(cluster, tiny_folder, single_process, capsys):
    from speckv_env.app.cli import main

    folder, pair = tiny_folder
    out = folder / "ray_folder"
    argv = ["profile", *pair, *PROFILE_ARGS, "--per-task", "2", "--out", str(out), "--json", "-q"]
    assert main([*argv, "--ray", "local", "--ray-workers", "2"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["written"] == 8 and s["skipped"] == 0 and s["workers"] == 2
    _assert_same_traces(out, single_process)
    assert len(list(out.glob("*.parquet"))) == 8  # one part per episode, no tmp left behind
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
@requires_default
def test_profile_on_ray_survives_a_killed_worker_and_resumes_across_runs(cluster, tiny_folder, single_process):
    """Into a file:// storage URI: a first run records half the episodes; a second run with
    --resume records the rest while one worker process is killed (SIGKILL) with an episode in
    flight. The actor restarts, the episode is re-run, and the folder ends complete."""
    from speckv_env.app.distributed import profile_on_ray
    from speckv_env.app.profile import MODES

    folder, _ = tiny_folder
    uri = (folder / "ray_uri").as_uri()
    kw = {
        "target": str(folder / "t"),
        "draft": str(folder / "d"),
        "compressions": ["fp32"],
        "tasks": ["math", "code"],
        "splits": ["test"],
        "modes": list(MODES),
        "max_new_tokens": 16,
        "device": "cpu",
        "calibrate": False,
        "progress": False,
    }
    first = profile_on_ray(uri, "local", workers=2, threads=1, per_task=1, **kw)
    assert first["written"] == 4
    with pytest.raises(FileExistsError, match="--resume"):
        profile_on_ray(uri, "local", workers=2, threads=1, per_task=2, **kw)

    killed: list[int] = []

    def kill_once(event: dict) -> None:
        if not killed and event["pid"] is not None:  # the first episode sent to a loaded worker
            killed.append(event["pid"])
            threading.Timer(0.3, os.kill, (event["pid"], signal.SIGKILL)).start()

    second = profile_on_ray(uri, "local", workers=2, threads=1, per_task=2, resume=True, on_dispatch=kill_once, **kw)
    assert killed and second["worker_restarts"] >= 1
    assert second["skipped"] == 4 and second["written"] == 4
    _assert_same_traces(folder / "ray_uri", single_process)


def _cost_models() -> dict[str, CostModel]:
    out = {}
    for c, r in (("fp16", 0.08), ("nf4", 0.3)):
        cm = CostModel.unit(8, draft_ratio=r, verify_slope=0.04)
        cm.compression = c
        out[c] = cm
    return out


def _strip_runtime(doc):
    if isinstance(doc, dict):
        return {k: _strip_runtime(v) for k, v in doc.items() if k != "runtime_s"}
    if isinstance(doc, list):
        return [_strip_runtime(v) for v in doc]
    return doc


def test_compare_on_ray_reproduces_the_local_results(cluster, tmp_path, capsys):
    """`speckv compare --quick` on SYNTHETIC traces, locally and with --ray: results.json holds
    the same numbers (all but the run times), and the TensorBoard runs come back to the driver."""
    from replay.trace import TraceWriter
    from speckv_env.app.cli import main

    logs = tmp_path / "logs"
    with TraceWriter(logs, batch_size=100) as w:
        for t in synthetic_dataset(
            40, n_range=(30, 60), seed=0, compressions=("fp16", "nf4"), tasks=("code", "chat", "math")
        ):
            w.write(t)
        for cm in _cost_models().values():
            w.save_cost_model(cm)
    settings = [
        "--set",
        "bandit_steps=400",
        "mlp_rollout_steps=400",
        "ppo_steps=256",
        "policies=fixed,hf_heuristic,cost_aware,speckv_mlp,ucb1,linucb,ppo,oracle",
    ]
    docs = []
    for name, extra in (("local", []), ("ray", ["--ray", "local"])):
        argv = ["compare", "--logs", str(logs), "--out", str(tmp_path / name), "--quick", *settings, "--json", "-q"]
        assert main([*argv, *extra]) == 0, capsys.readouterr().err
        capsys.readouterr()
        docs.append(json.loads((tmp_path / name / "results.json").read_text()))
    local, on_ray = (_strip_runtime(d) for d in docs)
    assert local == on_ray
    pol = local["splits"]["heldout"]["policies"]
    for name in ("mlp-time", "ucb1", "ppo"):  # learners ran, two seeds each
        assert pol[name]["subsets"]["all"]["seeds"] == 2 and len(pol[name]["subsets"]["all"]["seed_tokens_per_s"]) == 2
    runs = sorted(p.name for p in (tmp_path / "ray" / "tb").iterdir())
    assert runs == sorted(p.name for p in (tmp_path / "local" / "tb").iterdir()) and runs


# ---- no cluster needed: storage and the command line's checks ----------------------------------


def test_storage_uri_writes_each_episode_once_and_atomically(tmp_path):
    from replay.trace import synthetic_trace
    from speckv_env.app.distributed import Storage, _check_visible, part_name

    st = Storage((tmp_path / "s").as_uri())
    st.ensure()
    tr = synthetic_trace(20, seed=1, trace_id="a|fp16|p1|greedy|1")
    assert st.write_part(tr) == part_name(tr.trace_id)
    assert st.write_part(tr) is None  # a retried episode never writes twice
    (tmp_path / "s" / f".{part_name('x')}.0.tmp").write_bytes(b"torn")  # a killed writer's tmp: ignored
    st.write_bytes("cost-fp16.json", b"{}")
    assert st.parts() == [part_name(tr.trace_id)]
    assert st.completed_keys() == {tr.trace_id}
    with pytest.raises(RuntimeError, match="every node mounts"):  # a worker wrote where the driver cannot see
        _check_visible(st, [tr.trace_id, "b|fp16|p2|greedy|2"])
    got = read_traces(tmp_path / "s")
    assert len(got) == 1 and np.array_equal(got[0].tokens, tr.tokens)


def test_cli_ray_flags_are_checked_before_any_work(tmp_path, capsys):
    from speckv_env.app.cli import main

    cases = [
        (["--out", str(tmp_path / "o"), "--ray-workers", "2"], "only apply with --ray"),
        (["--out", (tmp_path / "o").as_uri()], "needs --ray"),
        (["--out", "nosuch://bucket/x", "--ray"], "not a storage URI"),
    ]
    for argv, msg in cases:
        assert main(["profile", *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    assert main(["compare", "--logs", "speckv-paper", "--out", str(tmp_path / "c"), "--ray"]) == 2
    assert "--ray" in capsys.readouterr().err


# ---- the driver's dispatch loop, with a stand-in for Ray -----------------------------------------


class _Ref:
    def __init__(self, value=None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error


class _FakeRay:
    """What :func:`distributed._run_pool` uses of Ray: wait, get, the two error types."""

    class exceptions:  # the ray.exceptions namespace
        class RayActorError(Exception):
            pass

        class RayTaskError(Exception):
            cause = None

    def wait(self, refs, num_returns=1):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        if ref.error is not None:
            raise ref.error
        return ref.value


class _FakeActor:
    """``dead``: every call fails as a dead actor does; ``restart_after``: its process is
    replaced (a new pid) after that many episodes, as a restarted actor's is."""

    def __init__(self, pid: int, dead: bool = False, restart_after: int | None = None) -> None:
        self.pid, self.dead, self.restart_after = pid, dead, restart_after
        self.ran: list[str] = []
        self.record = self  # actor.record.remote(...)

    def remote(self, mode, prompt):
        if self.dead:
            return _Ref(error=_FakeRay.exceptions.RayActorError("the actor died"))
        if self.restart_after is not None and len(self.ran) == self.restart_after:
            self.pid += 100
        self.ran.append(prompt.id)
        return _Ref({"pid": self.pid, "tokens": 3, "trace_id": f"{prompt.id}|{mode}"})


class _Bar:
    def __init__(self) -> None:
        self.n = 0

    def update(self, k: int) -> None:
        self.n += k

    def set_postfix_str(self, s: str) -> None:
        pass


def test_dispatch_hands_a_dead_workers_episode_on_and_stops_at_the_deadline():
    from types import SimpleNamespace

    from speckv_env.app.distributed import _run_pool

    todo = [("greedy", SimpleNamespace(id=f"p{i}")) for i in range(5)]
    live, dead = _FakeActor(11), _FakeActor(12, dead=True)
    bar = _Bar()
    ids, stopped, restarts = _run_pool(_FakeRay(), [live, dead], 11, todo, bar, None, None)
    assert (len(ids), stopped, restarts) == (5, False, 0) and bar.n == 5
    assert sorted(live.ran) == [f"p{i}" for i in range(5)]  # the dead actor's episode went to the live one
    with pytest.raises(RuntimeError, match="a Ray worker failed"):  # nobody left: one clear error
        _run_pool(_FakeRay(), [_FakeActor(13, dead=True)], 13, todo, _Bar(), None, None)
    ids, stopped, _ = _run_pool(_FakeRay(), [_FakeActor(14)], 14, todo, _Bar(), 0.0, None)
    assert (ids, stopped) == ([], True)  # past the deadline nothing new starts
    ids, _, restarts = _run_pool(_FakeRay(), [_FakeActor(15, restart_after=2)], 15, todo, _Bar(), None, None)
    assert (len(ids), restarts) == (5, 1)  # a result from a new process of the actor: counted once
