"""Scaling out on Ray: ``speckv profile --ray`` and ``speckv compare --ray``.

Ray is optional (``pip install speckv-gym[ray]``): this module imports it inside functions only,
and the command line imports this module only when ``--ray`` is given, so that without it
nothing changes and Ray is never imported.

Profiling (:func:`profile_on_ray`). Episodes are tasks over a pool of actors, each holding one
loaded pair (``num_gpus`` per actor where the cluster has GPUs, torch threads per actor on CPU),
one episode in flight per actor. Each actor writes every finished episode as its own Parquet part
file, atomically, into shared storage (:class:`Storage`: a folder every node sees, or a pyarrow
filesystem URI such as ``s3://bucket/traces``), named after its trace id: an episode re-run after
a worker died finds its part if it was already written, so no episode is ever written twice.
A killed actor process is restarted (it loads its pair again) and its episode in flight is run
again (Ray's actor restarts and task retries); an actor that cannot come back hands its episode to
the others. ``--resume`` skips every trace id already in the storage, whichever run or worker
wrote it, and refuses other settings as the local ``--resume`` does. The driver shows one progress
bar over all episodes.

Comparing (:func:`map_tasks`). Jobs (folds x seeds x agents) run as Ray tasks of one CPU each,
with the data put once into the object store; files a task writes into its scratch folder
(TensorBoard runs) are copied into the driver's folder, so the nodes need no shared disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

log = logging.getLogger("speckv")

#: how often a dead actor is restarted, and an episode or task in flight on it retried
MAX_RESTARTS = 4
#: the worker processes' environment (set before torch starts its thread pools): idle OpenMP
#: threads sleep instead of spinning, as `speckv profile` chooses for parallel processes
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
RAY_MISSING = "--ray needs Ray, an optional dependency: pip install 'speckv-gym[ray]'"


def ray_available() -> bool:
    """Whether Ray can be imported (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def connect(address: str) -> tuple[Any, bool]:
    """Connect to Ray: ``local`` starts a cluster on this machine (all its CPUs and GPUs),
    ``auto`` joins the cluster running here (``ray start --head``, or ``RAY_ADDRESS``), anything
    else is a cluster address (``HOST:6379``, or ``ray://HOST:10001`` for Ray Client). A process
    already connected keeps its connection. Returns (the ray module, whether this call started
    the connection, so the caller shuts it down)."""
    try:
        import ray
    except ImportError:
        raise RuntimeError(RAY_MISSING) from None
    if ray.is_initialized():
        log.info("speckv: using this process's Ray connection (%s)", ray.get_runtime_context().gcs_address)
        return ray, False
    kw: dict[str, Any] = {"runtime_env": {"env_vars": dict(WORKER_ENV)}, "log_to_driver": False}
    # Ray's own messages follow --quiet (the CLI sets the speckv logger to WARNING then)
    kw["logging_level"] = logging.WARNING if log.isEnabledFor(logging.INFO) else logging.ERROR
    if address == "local":
        ray.init(address="local", include_dashboard=False, **kw)
    else:
        ray.init(address=address, **kw)
    return ray, True


# ---- storage ----------------------------------------------------------------------------------


def is_uri(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a filesystem URI (``s3://...``) rather than a local path."""
    return "://" in str(location)


def part_name(trace_id: str) -> str:
    """The part file of one episode (a retried episode finds its own part)."""
    return f"part-{hashlib.sha1(trace_id.encode()).hexdigest()[:24]}.parquet"


class Storage:
    """A trace folder shared by the driver and every worker: a local path (on several nodes, one
    every node mounts) or a pyarrow filesystem URI (``s3://``, ``gs://``, ``hdfs://``,
    ``file://``; ``pyarrow.fs.FileSystem.from_uri``). Part files are written atomically: a
    local folder by :func:`replay.trace.write_parquet_atomic` (tmp file, fsync, link into
    place), a URI by a hidden tmp object moved into place; readers ignore both kinds of tmp.
    Pickles as its location (the filesystem is opened again where it is used)."""

    def __init__(self, location: str | os.PathLike) -> None:
        self.location = str(location)
        self.uri = is_uri(self.location)
        self._fs: Any = None
        self.base = self.location if not self.uri else self._filesystem()[1]

    def __getstate__(self) -> dict[str, Any]:
        return {"location": self.location}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["location"])  # type: ignore[misc]

    def _filesystem(self) -> tuple[Any, str]:
        import pyarrow as pa
        from pyarrow import fs as pafs

        if self._fs is None:
            try:
                fs, base = pafs.FileSystem.from_uri(self.location)
            except pa.ArrowInvalid as e:
                raise ValueError(f"{self.location}: not a storage URI pyarrow can open ({e})") from None
            self._fs = fs
            self.base = base.rstrip("/")
        return self._fs, self.base

    def path(self, name: str) -> str:
        return f"{self.location.rstrip('/')}/{name}"

    def ensure(self) -> None:
        """Create the folder (a no-op on object stores)."""
        if self.uri:
            fs, base = self._filesystem()
            fs.create_dir(base, recursive=True)
        else:
            Path(self.location).mkdir(parents=True, exist_ok=True)

    def parts(self) -> list[str]:
        """Names of the finished part files, sorted (tmp files excluded)."""
        if not self.uri:
            folder = Path(self.location)
            if not folder.is_dir():
                return []
            return sorted(p.name for p in folder.glob("*.parquet") if p.is_file() and not p.name.startswith("."))
        from pyarrow import fs as pafs

        fs, base = self._filesystem()
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        return sorted(
            i.base_name
            for i in infos
            if i.type == pafs.FileType.File and i.base_name.endswith(".parquet") and not i.base_name.startswith(".")
        )

    def exists(self, name: str) -> bool:
        if not self.uri:
            return (Path(self.location) / name).exists()
        from pyarrow import fs as pafs

        fs, base = self._filesystem()
        return fs.get_file_info(f"{base}/{name}").type != pafs.FileType.NotFound

    def read(self, name: str, columns: list[str] | None = None) -> Any:
        """One part file as an Arrow table; a :class:`replay.schema.TraceFormatError` naming it
        if it cannot be read."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from replay.trace import TraceFormatError, read_table_checked

        if not self.uri:
            return read_table_checked(Path(self.location) / name, columns=columns)
        fs, base = self._filesystem()
        try:
            return pq.read_table(f"{base}/{name}", columns=columns, filesystem=fs)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise TraceFormatError(f"{self.path(name)}: unreadable Parquet file ({type(e).__name__}: {e})") from None

    def completed_keys(self) -> set[str]:
        """The trace ids of every finished part; a duplicate id is an error naming the file."""
        from replay.trace import TraceFormatError

        keys: set[str] = set()
        for name in self.parts():
            for k in self.read(name, columns=["trace_id"]).column("trace_id").to_pylist():
                if k in keys:
                    raise TraceFormatError(f"{self.path(name)}: duplicate trace_id {k!r} in {self.location}")
                keys.add(k)
        return keys

    def write_part(self, trace: Any) -> str | None:
        """Write one episode as its part file (:func:`part_name`); None if it is there already."""
        from replay.trace import traces_to_table, write_parquet_atomic

        trace.validate()
        name = part_name(trace.trace_id)
        table = traces_to_table([trace])
        try:
            if not self.uri:
                write_parquet_atomic(table, Path(self.location) / name, overwrite=False)
            else:
                import pyarrow.parquet as pq

                self._write_uri(name, lambda fh: pq.write_table(table, fh), overwrite=False)
        except FileExistsError:
            return None
        return name

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write (or replace) a small file atomically (cost models)."""
        from replay.trace import atomic_write_bytes

        if not self.uri:
            atomic_write_bytes(Path(self.location) / name, data)
        else:
            self._write_uri(name, lambda fh: fh.write(data), overwrite=True)

    def _write_uri(self, name: str, write: Callable[[Any], object], overwrite: bool) -> None:
        fs, base = self._filesystem()
        tmp = f"{base}/.{name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            with fs.open_output_stream(tmp) as fh:
                write(fh)
            if not overwrite and self.exists(name):
                raise FileExistsError(self.path(name))
            fs.move(tmp, f"{base}/{name}")
        except BaseException:
            with contextlib.suppress(OSError):
                fs.delete_file(tmp)
            raise


def check_profile_storage(
    out: str,
    *,
    modes: Sequence[str],
    behaviour: str,
    gamma_max: int,
    max_new_tokens: int,
    resume: bool,
) -> dict[str, set]:
    """:func:`.profile.check_profile_request` for a storage location (folder or URI): the checks
    that need no model. Returns the settings of the traces already there."""
    from .profile import (
        MODES,
        SETTING_COLUMNS,
        check_profile_request,
        check_resume,
        parse_behaviour,
        settings_of_tables,
    )

    st = Storage(out)
    if not st.uri:
        return check_profile_request(
            out, modes=modes, behaviour=behaviour, gamma_max=gamma_max, max_new_tokens=max_new_tokens, resume=resume
        )
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}: choose from {', '.join(MODES)}")
    parse_behaviour(behaviour, gamma_max)
    parts = st.parts()
    if not parts:
        return {}
    if not resume:
        raise FileExistsError(
            f"{out} already holds traces: pass --resume to continue that recording, or choose another location"
        )
    seen = settings_of_tables(st.read(p, columns=SETTING_COLUMNS) for p in parts)
    try:
        return check_resume(out, max_new_tokens=max_new_tokens, gamma_max=gamma_max, modes=modes, seen=seen)
    except ValueError as e:  # name the URI as given, not as a path
        raise ValueError(str(e).replace(str(Path(out)), out)) from None


# ---- profiling: a pool of actors, each holding a loaded pair ------------------------------------


class _Recorder:
    """A Ray actor (made remote by :func:`_start_actor`): one loaded pair recording episodes into
    the storage with one engine per mode, as the local recording loop does."""

    def __init__(self, storage: Storage, pair_kw: dict[str, Any], threads: int | None, rec: dict[str, Any]) -> None:
        import torch

        from speckv_env.pair import load_pair

        from .profile import make_engines

        if threads:
            torch.set_num_threads(threads)
        self.storage = storage
        self.pair = load_pair(
            pair_kw["target"], pair_kw["draft"], compression=pair_kw["compression"], device=pair_kw["device"]
        )
        self.engines = make_engines(self.pair, rec["modes"], rec["gamma_max"])
        self.rec = {k: rec[k] for k in ("max_new_tokens", "gamma_max", "behaviour")}

    def info(self) -> dict[str, Any]:
        p = self.pair
        return {
            "name": p.name,
            "compression": p.compression,
            "device": str(p.device.type),
            "draft_fingerprint": p.draft_fingerprint,
            "kernels": getattr(p, "kernels", "stock"),
            "pid": os.getpid(),
            "node": socket.gethostname(),
        }

    def calibrate(self, gamma_max: int) -> bytes:
        from speckv_env.calibrate import cached_calibration

        cm = cached_calibration(self.pair, gamma_max=gamma_max)
        return json.dumps(cm.to_dict(), indent=2).encode()

    def record(self, mode: str, prompt: Any) -> dict[str, Any]:
        from .profile import episode_key, episode_seed, record_episode

        key = episode_key(self.pair.name, self.pair.compression, prompt.id, mode)
        out = {"trace_id": key, "pid": os.getpid(), "tokens": None, "written": False}
        if self.storage.exists(part_name(key)):  # written before a worker died: never twice
            return out
        tr = record_episode(
            self.engines[mode], self.pair, prompt, mode=mode, seed=episode_seed(prompt.id, mode), **self.rec
        )
        out.update(tokens=tr.n, written=self.storage.write_part(tr) is not None)
        return out


def _start_actor(ray: Any, storage: Storage, pair_kw: dict[str, Any], res: dict[str, Any], rec: dict[str, Any]) -> Any:
    opts = {
        "num_cpus": res["threads"],
        "num_gpus": res["gpus"],
        "max_restarts": MAX_RESTARTS,
        "max_task_retries": MAX_RESTARTS,
    }
    return ray.remote(**opts)(_Recorder).remote(storage, pair_kw, res["threads"], rec)


class WorkerLost(RuntimeError):
    """A Ray actor that is gone for good (its restarts spent, or it could not start)."""


def _actor_failure(err: BaseException) -> WorkerLost:
    """A dead actor as one line: the last line of its error (the exception that killed it)."""
    cause = getattr(err, "error_msg", None) or str(err)
    lines = [x.strip() for x in str(cause).splitlines() if x.strip()]
    return WorkerLost(f"a Ray worker failed: {lines[-1] if lines else type(err).__name__}")


def _get(ray: Any, ref: Any) -> Any:
    """``ray.get``, with a task's own exception raised as itself (the CLI prints it on one line)
    and a dead actor as :func:`_actor_failure`."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, BaseException):
            raise e.cause from None
        raise
    except ray.exceptions.RayActorError as e:
        raise _actor_failure(e) from None


def _resources(ray: Any, device: str, workers: int | None, gpus: float | None, threads: int | None) -> dict[str, Any]:
    """Per actor: GPUs (``gpus``, default 1 where the cluster has GPUs and ``device`` allows) and
    CPU threads (default 1); how many actors (default: as many as the cluster holds)."""
    total = ray.cluster_resources()
    n_cpu, n_gpu = float(total.get("CPU", 0.0)), float(total.get("GPU", 0.0))
    gpus = (1.0 if n_gpu > 0 and device != "cpu" else 0.0) if gpus is None else float(gpus)
    threads = threads or 1
    # a worker that no node can hold would wait for ever: refuse it
    if gpus > n_gpu or (gpus > 0 and device == "cpu"):
        raise ValueError(f"--ray-gpus {gpus:g} with --device {device}: the Ray cluster has {n_gpu:g} GPUs")
    if threads > n_cpu:
        raise ValueError(f"--threads {threads}: each Ray worker reserves as many CPUs; the cluster has {n_cpu:g}")
    if workers is None:
        workers = int(n_gpu // gpus) if gpus > 0 else int(n_cpu // threads)
    return {"gpus": gpus, "threads": threads, "workers": max(1, workers)}


def _profile_settings(out: str, kw: dict[str, Any]) -> dict[str, Any]:
    """:func:`.profile.profile`'s arguments with its defaults (one set of defaults for both paths)."""
    from .profile import profile

    try:
        bound = inspect.signature(profile).bind(out, **kw)
    except TypeError as e:
        raise TypeError(f"profile_on_ray: {e}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def profile_on_ray(
    out: str | os.PathLike,
    address: str = "local",
    *,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    threads: int | None = None,
    on_dispatch: Callable[[dict[str, Any]], None] | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """:func:`.profile.profile` on a Ray cluster: the same keyword arguments, the same traces
    (token for token), written into ``out`` (a folder or a storage URI).

    ``address``: see :func:`connect`. ``workers``: actors per compression (default: all the
    cluster holds, at most one per episode); ``gpus_per_worker`` (default 1 where there are
    GPUs, else 0); ``threads``: torch threads per actor (default 1; Ray reserves as many CPUs).
    ``on_dispatch(event)`` is called after each episode is sent to an actor (tests use it).
    Returns profile()'s summary plus ``workers``, ``worker_restarts`` and ``ray``."""
    from .profile import select_profile_prompts

    out = str(out)
    s = _profile_settings(out, kw)
    t_start = time.time()
    seen = check_profile_storage(
        out,
        modes=s["modes"],
        behaviour=s["behaviour"],
        gamma_max=s["gamma_max"],
        max_new_tokens=s["max_new_tokens"],
        resume=s["resume"],
    )
    sel = (
        list(s["prompts"])
        if s["prompts"] is not None
        else select_profile_prompts(s["tasks"], s["splits"], s["n_train"], s["per_task"])
    )
    storage = Storage(out)
    storage.ensure()
    ray, started = connect(address)
    try:
        res = _resources(ray, s["device"], workers, gpus_per_worker, threads)
        summary = _profile_compressions(ray, storage, s, sel, seen, res, t_start, on_dispatch)
    finally:
        if started:
            ray.shutdown()
    return {**summary, "seconds": time.time() - t_start, "out": out, "ray": address}


def _profile_compressions(
    ray: Any,
    storage: Storage,
    s: dict[str, Any],
    sel: Sequence[Any],
    seen: dict[str, set],
    res: dict[str, Any],
    t_start: float,
    on_dispatch: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    """Record every compression in turn, each with its own pool of actors."""
    from tqdm import tqdm

    from speckv_env.models import check_compression

    from .profile import check_resume_pair, episode_key

    done = storage.completed_keys()
    deadline = None if s["time_budget_s"] is None else t_start + s["time_budget_s"]
    rec = {k: s[k] for k in ("modes", "max_new_tokens", "gamma_max", "behaviour")}
    total = {"written": 0, "skipped": 0, "stopped_early": False, "workers": 0, "worker_restarts": 0}
    n_all = len(sel) * len(s["modes"]) * len(s["compressions"])
    bar = tqdm(total=n_all, desc="profile (ray)", unit="ep", disable=not s["progress"])
    for comp in s["compressions"]:
        pair_kw = {"target": s["target"], "draft": s["draft"], "compression": comp, "device": s["device"]}
        cost = f"cost-{check_compression(comp)}.json"
        calibrating = s["calibrate"] and not storage.exists(cost)
        # calibration measures on one worker alone; otherwise every worker loads its pair at once
        n_start = 1 if calibrating else min(res["workers"], len(sel) * len(s["modes"]))
        actors = [_start_actor(ray, storage, pair_kw, res, rec) for _ in range(max(1, n_start))]
        try:
            info = _get(ray, actors[0].info.remote())
            if seen:
                dev = SimpleNamespace(type=info["device"])
                try:
                    check_resume_pair(storage.location, seen, SimpleNamespace(**{**info, "device": dev}))
                except ValueError as e:  # name the location as given (a URI is no path)
                    raise ValueError(str(e).replace(str(Path(storage.location)), storage.location)) from None
            todo = [
                (mode, p)
                for p in sel
                for mode in s["modes"]
                if episode_key(info["name"], info["compression"], p.id, mode) not in done
            ]
            total["skipped"] += len(sel) * len(s["modes"]) - len(todo)
            bar.update(len(sel) * len(s["modes"]) - len(todo))
            if calibrating:
                storage.write_bytes(cost, _get(ray, actors[0].calibrate.remote(s["gamma_max"])))
            want = max(1, min(res["workers"], len(todo)))
            actors += [_start_actor(ray, storage, pair_kw, res, rec) for _ in range(want - len(actors))]
            for a in actors[want:]:  # resuming: fewer episodes left than workers started
                ray.kill(a, no_restart=True)
            actors = actors[:want]
            total["workers"] = max(total["workers"], len(actors))
            ids, stopped, restarts = _run_pool(ray, actors, info["pid"], todo, bar, deadline, on_dispatch)
        finally:
            for a in actors:
                ray.kill(a, no_restart=True)
        _check_visible(storage, ids)
        total["written"] += len(ids)
        total["worker_restarts"] += restarts
        if stopped:
            total["stopped_early"] = True
            break
    bar.close()
    return total


def _check_visible(storage: Storage, ids: Sequence[str]) -> None:
    """Every episode the workers finished is in the storage as this machine sees it: a local
    folder that is not shared by the nodes would scatter the traces over their disks."""
    there = set(storage.parts())
    missing = [k for k in ids if part_name(k) not in there]
    if missing:
        raise RuntimeError(
            f"{len(missing)} episodes the Ray workers wrote are not in {storage.location} as this machine sees it "
            f"(first: {missing[0]!r}): on a cluster of several nodes, --out must be a folder every node mounts "
            "or a storage URI (s3://..., gs://...)"
        )


def _run_pool(
    ray: Any,
    actors: list[Any],
    first_pid: int,
    todo: Sequence[tuple[str, Any]],
    bar: Any,
    deadline: float | None,
    on_dispatch: Callable[[dict[str, Any]], None] | None,
) -> tuple[list[str], bool, int]:
    """Episodes ``todo`` over ``actors``, one in flight per actor, until done or the deadline;
    returns (trace ids of the episodes finished, stopped at the deadline, worker restarts seen)."""
    queue = deque(todo)
    free = deque(range(len(actors)))
    alive = set(free)
    pids: dict[int, int | None] = dict.fromkeys(free)
    pids[0] = first_pid
    pending: dict[Any, tuple[int, tuple[str, Any]]] = {}
    finished: list[str] = []
    restarts = 0
    stopped = False
    while queue or pending:
        if queue and deadline is not None and time.time() > deadline:
            stopped = True
            queue.clear()  # the episodes in flight finish; nothing new starts
        while queue and free:
            w, item = free.popleft(), queue.popleft()
            pending[actors[w].record.remote(*item)] = (w, item)
            if on_dispatch is not None:
                on_dispatch({"worker": w, "pid": pids[w], "mode": item[0], "prompt": item[1].id})
        if not pending:
            break
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            w, item = pending.pop(ref)
            try:
                r = _get(ray, ref)
            except WorkerLost as e:  # a dead actor, its restarts spent: another actor takes its episode
                alive.discard(w)
                queue.appendleft(item)
                log.warning("speckv profile: a Ray worker is gone (%s); its episode goes to another", e)
                if not alive:
                    raise
                continue
            if pids[w] is not None and r["pid"] != pids[w]:
                restarts += 1  # the actor was restarted and the episode run again
            pids[w] = r["pid"]
            free.append(w)
            finished.append(r["trace_id"])
            bar.update(1)
            bar.set_postfix_str(f"{item[1].id} {item[0]} {r['tokens']} tok")
    return finished, stopped, restarts


# ---- comparing: jobs as tasks -------------------------------------------------------------------


def _run_task(fn: Callable[..., Any], shared: Any, job: Any, scratch: bool) -> tuple[Any, dict[str, bytes]]:
    """``fn(shared, job, folder)`` in a worker; returns its result and the files it wrote into
    ``folder`` (a fresh scratch folder, or None when ``scratch`` is false)."""
    if not scratch:
        return fn(shared, job, None), {}
    folder = Path(tempfile.mkdtemp(prefix="speckv-task-"))
    try:
        result = fn(shared, job, folder)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return result, files


def map_tasks(
    address: str,
    fn: Callable[[Any, Any, Path | None], Any],
    shared: Any,
    jobs: Iterable[Any],
    *,
    files_to: Path | None = None,
    desc: str = "tasks (ray)",
    progress: bool = True,
) -> list[Any]:
    """``[fn(shared, job, folder) for job in jobs]`` as Ray tasks (one CPU each, retried if a
    worker dies), results in the order of ``jobs``. ``shared`` is put into the object store
    once. ``fn`` must be importable by name (a module-level function). With ``files_to``, each
    task gets a scratch folder and what it writes there is copied under ``files_to``."""
    from tqdm.auto import tqdm

    jobs = list(jobs)
    if not jobs:
        return []
    ray, started = connect(address)
    try:
        shared_ref = ray.put(shared)
        task = ray.remote(num_cpus=1, max_retries=MAX_RESTARTS)(_run_task)
        refs = [task.remote(fn, shared_ref, job, files_to is not None) for job in jobs]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        with tqdm(total=len(refs), desc=desc, disable=not progress) as bar:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    results[index[ref]], files = _get(ray, ref)
                    for rel, data in files.items():
                        dest = files_to / rel
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        dest.write_bytes(data)
                    bar.update(1)
        return results
    finally:
        if started:
            ray.shutdown()
