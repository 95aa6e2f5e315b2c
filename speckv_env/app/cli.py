"""The ``speckv`` command line.

speckv generate   speculative decoding of one prompt; prints the text and its statistics
speckv profile    record full-information traces of a pair (tasks x compressions x prompts)
speckv calibrate  measure a pair's cost model (draft, verify and target step times)
speckv train      train one gamma controller on recorded traces
speckv compare    train and compare every controller; report.md, results.json, plots
speckv bench      engine | env | agents: speed figures
speckv demo       the main job on the embedded default pair (compare + live check)

One contract for every subcommand:

- usage and input errors (flags, numbers out of range, paths that do not exist or cannot be
  written, unknown names, ``--set`` keys and values) exit 2 with one line
  ``speckv <cmd>: error: ...`` on stderr, found before any model loads;
- runtime failures of known kinds (a model that does not load, a malformed trace, cost-model
  or agent file, a missing file) exit 1 with one such line (``SPECKV_DEBUG=1``: the traceback);
- stdout holds the command's result only: text, or with ``--json`` one JSON document;
  progress bars and library messages go to stderr, and ``--quiet`` silences them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import re
import sys
import time
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

from speckv_env import __version__

log = logging.getLogger("speckv")

#: the target compressions and their aliases, as :func:`speckv_env.models.check_compression`
#: reads them (repeated here so that checking them needs no torch; a test keeps them equal)
COMPRESSIONS = ("fp32", "bf16", "fp16", "int8", "nf4")
COMPRESSION_ALIASES = {
    "none": "fp32",
    "float32": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "4bit": "nf4",
    "8bit": "int8",
}
#: the engine's largest gamma (``SpeculativeEngine(max_gamma=64)``)
MAX_GAMMA = 64
#: known runtime failures: one error line, exit 1
RUNTIME_ERRORS = (ValueError, FileNotFoundError, FileExistsError, OSError, RuntimeError)


class UsageError(Exception):
    """A bad command line or input found before any work: one error line, exit 2."""


@dataclasses.dataclass
class Output:
    """What a subcommand prints on stdout: ``data`` with ``--json``, else ``text``."""

    data: Any
    text: str


def _one_line(msg: object) -> str:
    return " ".join(part.strip() for part in str(msg).splitlines() if part.strip())


class _Parser(argparse.ArgumentParser):
    """argparse with the contract's error form: one line ``<prog>: error: ...``, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


# ---- argument types (argparse turns their errors into the one-line form) --------------------


def _int_arg(lo: int, hi: int | None = None) -> Callable[[str], int]:
    want = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {want}, got {v}")
        return v

    return parse


def _float_arg(lo: float, hi: float | None = None, *, lo_open: bool = False) -> Callable[[str], float]:
    if hi is None:
        want = f"a number {'>' if lo_open else '>='} {lo:g}"
    else:
        want = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if not math.isfinite(v) or v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text}")
        return v

    return parse


def _compression_arg(text: str) -> str:
    c = COMPRESSION_ALIASES.get(text.lower(), text.lower())
    if c not in COMPRESSIONS:
        raise argparse.ArgumentTypeError(f"unknown compression {text!r}: choose one of {', '.join(COMPRESSIONS)}")
    return c


def _csv_arg(what: str, choices: Sequence[str] | None = None, convert: Callable[[str], str] | None = None):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        if convert is not None:
            return [convert(x) for x in items]
        bad = [x for x in items if choices is not None and x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad[0]!r}: choose from {', '.join(choices or ())}")
        return items

    return parse


def _device_arg(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu, cuda, cuda:N, mps or auto")
    return text


def _gamma_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _int_arg(0, MAX_GAMMA)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer in 0..{MAX_GAMMA}, got {text!r}") from None


# ---- input checks run before any work -------------------------------------------------------


def _check_model_spec(spec: str, flag: str) -> None:
    """The path rules of :func:`speckv_env.models.resolve_source`, without loading anything."""
    p = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not p.is_file():
            raise UsageError(f"{flag}: GGUF file {p} does not exist")
    elif p.exists():
        if not p.is_dir():
            raise UsageError(f"{flag}: {p} is a file but not a .gguf file; give a model folder or a GGUF file")
        if not (p / "config.json").is_file():
            raise UsageError(f"{flag}: folder {p} has no config.json, so it is not a Hugging Face model folder")
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec:
        raise UsageError(f"{flag}: path {p} does not exist")
    # anything else is a hub id: fetched (or refused) when the model loads


def _check_pair(a: argparse.Namespace) -> None:
    default_target = a.target in (None, "default")
    if not default_target:
        _check_model_spec(a.target, "--target")
        if a.draft in (None, "default"):
            raise UsageError(
                "--draft is required with a non-default --target (the shipped draft only fits the embedded target)"
            )
    if a.draft not in (None, "default"):
        _check_model_spec(a.draft, "--draft")


def _check_out(path: str, flag: str, *, folder: bool) -> Path:
    """``path`` can be written (as a folder or a file): it exists as such and is writable, or
    its nearest existing ancestor is a writable folder."""
    p = Path(path).expanduser()
    if p.exists():
        if folder and not p.is_dir():
            raise UsageError(f"{flag} {p}: is a file, expected a folder")
        if not folder and p.is_dir():
            raise UsageError(f"{flag} {p}: is a folder, expected a file name")
        if not os.access(p, os.W_OK):
            raise UsageError(f"{flag} {p}: not writable")
        return p
    q = p.parent
    while not q.exists() and q != q.parent:
        q = q.parent
    if not q.is_dir():
        raise UsageError(f"{flag} {p}: cannot be created, {q} is not a folder")
    if not os.access(q, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {p}: cannot be created, {q} is not writable")
    return p


def _check_logs(logs: str) -> tuple[str | None, str | None]:
    """--logs -> (trace path, source): 'default' (shipped traces), 'speckv-paper' or a path."""
    if logs == "speckv-paper":
        return None, "speckv-paper"
    if logs == "default":
        from replay.env import default_logs

        try:
            return str(default_logs()), None
        except FileNotFoundError as e:
            raise UsageError(f"--logs default: {e}; record traces with `speckv profile` and pass --logs FOLDER") from e
    p = Path(logs).expanduser()
    if not p.exists():
        raise UsageError(f"--logs {p}: no such file or folder (give traces, 'default' or 'speckv-paper')")
    if p.is_dir() and not any(p.glob("*.parquet")):
        raise UsageError(f"--logs {p}: the folder holds no .parquet trace files")
    return str(p), None


# ---- --set KEY=VALUE: known keys, typed values ----------------------------------------------


class _BadValue(ValueError):
    pass


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(t) for t in args)
    if tp is type(None):
        return "none"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin in (tuple, list, Sequence) and args:
        return f"a comma-separated list (or JSON list) of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin in (dict, Mapping):
        return "a JSON object"
    return "a JSON value" if tp is Any else getattr(tp, "__name__", str(tp))


def _coerce_scalar(text: str, tp: Any) -> Any:
    if tp is bool:
        m = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if text.lower() in m:
            return m[text.lower()]
        raise _BadValue
    if tp is int:
        if re.fullmatch(r"[+-]?\d+", text.strip()):
            return int(text)
        raise _BadValue
    if tp is float:
        try:
            v = float(text)
        except ValueError:
            raise _BadValue from None
        if not math.isfinite(v):
            raise _BadValue
        return v
    if tp is str:
        return text
    if tp is Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    if tp is type(None):
        if text.lower() in ("none", "null"):
            return None
        raise _BadValue
    raise _BadValue  # a type the command line cannot build (e.g. a CostModel object)


def _coerce(text: str, tp: Any) -> Any:
    """``text`` as a value of type ``tp`` (int, float, bool, str, unions, tuples/lists, dicts)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for t in sorted(args, key=lambda t: t is not type(None)):  # "none" first, then the rest in order
            try:
                return _coerce(text, t)
            except _BadValue:
                continue
        raise _BadValue
    if origin in (tuple, list, Sequence):
        s = text.strip()
        if s.startswith("["):
            try:
                raw = json.loads(s)
            except json.JSONDecodeError:
                raise _BadValue from None
            if not isinstance(raw, list):
                raise _BadValue
            items = [x if isinstance(x, str) else json.dumps(x) for x in raw]
        else:
            items = [x.strip() for x in s.split(",") if x.strip()]
        if (len(args) == 2 and args[1] is Ellipsis) or len(args) == 1:
            return tuple(_coerce(x, args[0]) for x in items)
        if args and len(items) != len(args):
            raise _BadValue
        return tuple(_coerce(x, t) for x, t in zip(items, args or [Any] * len(items)))
    if origin in (dict, Mapping) or tp is dict:
        try:
            v = json.loads(text)
        except json.JSONDecodeError:
            raise _BadValue from None
        if not isinstance(v, dict):
            raise _BadValue
        return v
    return _coerce_scalar(text, tp)


def parse_settings(
    items: Sequence[str] | None, known: Mapping[str, Any], checks: Mapping[str, tuple[Callable[[Any], bool], str]]
) -> dict[str, Any]:
    """``KEY=VALUE`` items -> typed values; ``known``: key -> type; ``checks``: key -> (ok, rule)."""
    out: dict[str, Any] = {}
    for it in items or []:
        key, sep, text = it.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {it!r}")
        if key not in known:
            raise UsageError(f"--set {key}: unknown key; accepted keys: {', '.join(known)}")
        try:
            value = _coerce(text, known[key])
        except _BadValue:
            raise UsageError(f"--set {key}={text}: expected {_describe(known[key])}") from None
        ok, rule = checks.get(key, (lambda v: True, ""))
        if not ok(value):
            raise UsageError(f"--set {key}={text}: {rule}")
        out[key] = value
    return out


def _at_least(n: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= n), f"must be >= {n}"


def compare_setting_types() -> dict[str, Any]:
    """The comparison's settings: the fields of :class:`~speckv_env.app.compare.CompareConfig`."""
    from .compare import CompareConfig

    hints = typing.get_type_hints(CompareConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(CompareConfig) if f.init}


def compare_setting_checks() -> dict[str, tuple[Callable[[Any], bool], str]]:
    """Value rules of the comparison settings beyond their types (keys are CompareConfig fields)."""
    from speckv_env.core import DEFAULT_GAMMAS

    from .compare import POLICY_GROUPS, SPLITS

    def subset(allowed: Sequence[Any]) -> tuple[Callable[[Any], bool], str]:
        return (lambda v: set(v) <= set(allowed)), f"each value must be one of {', '.join(map(str, allowed))}"

    gammas_ok = (
        (lambda v: len(v) > 0 and len(set(v)) == len(v) and all(0 <= g <= MAX_GAMMA for g in v)),
        (f"must be distinct gammas in 0..{MAX_GAMMA}, e.g. {','.join(map(str, DEFAULT_GAMMAS))}"),
    )
    checks = {
        k: _at_least(1)
        for k in ("seeds", "bandit_steps", "mlp_rollout_steps", "mlp_epochs", "mlp_batch_size", "ppo_steps")
    }
    checks.update(
        ppo_n_envs=_at_least(1),
        ppo_token_steps=_at_least(0),
        n_boot=_at_least(1),
        boot_seed=_at_least(0),
        obs_version=((lambda v: v in (0, 1, 2)), "must be 1, 2 or 0 (2 when every trace is speckv-trace/2, else 1)"),
        gammas=gammas_ok,
        paper_recorded_gammas=((lambda v: all(0 <= g <= MAX_GAMMA for g in v)), f"gammas must lie in 0..{MAX_GAMMA}"),
        splits=subset(SPLITS),
        bandit_splits=subset(SPLITS),
        ppo_splits=subset(SPLITS),
        policies=subset(POLICY_GROUPS),
        level=((lambda v: 0 < v < 1), "must lie strictly between 0 and 1"),
    )
    return checks


#: train_main arguments that the command line sets itself (not through --set)
_TRAIN_FIXED = ("agent", "logs", "out", "source", "agent_kwargs", "progress")


def train_setting_types(agent: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training settings, the agent's constructor settings) -> types, for ``speckv train``."""
    from agents.base import AGENTS

    from .compare import train_main

    def named(fn: Callable) -> dict[str, Any]:
        hints = typing.get_type_hints(fn)
        return {
            name: hints.get(name, Any)
            for name, prm in inspect.signature(fn).parameters.items()
            if prm.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        }

    train = {k: v for k, v in named(train_main).items() if k not in _TRAIN_FIXED}
    own = {k: v for k, v in named(AGENTS[agent].__init__).items() if k not in ("self", "gammas", *train)}
    return train, own


# ---- output -----------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    """Strict-JSON form: NaN and infinities become null, numpy values plain ones, paths strings."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "tolist"):  # numpy arrays and scalars
        return _jsonable(x.tolist())
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    return str(x)


def _emit(out: Output, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(_jsonable(out.data), indent=2, allow_nan=False) + "\n")
    elif out.text:
        sys.stdout.write(out.text.rstrip("\n") + "\n")
    sys.stdout.flush()


def _write_json_file(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _library_output(quiet: bool) -> Iterator[None]:
    """While a command works, whatever a library prints goes to stderr (to nowhere if quiet):
    stdout is kept for the command's result."""
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(os.devnull, "w")) if quiet else sys.stderr
        stack.enter_context(contextlib.redirect_stdout(sink))
        yield


def _setup_logging(quiet: bool) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    for name in ("speckv", "speckv_env", "replay", "agents"):
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads TQDM_* defaults from the environment


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


# ---- generate ---------------------------------------------------------------------------------


def check_generate(a: argparse.Namespace) -> None:
    _check_pair(a)
    if not a.prompt.strip():
        raise UsageError("--prompt is empty")


def _generate_auto(eng: Any, pair: Any, ids: list[int], a: argparse.Namespace) -> tuple[list, list[int], float]:
    """gamma chosen per step: online estimate of the acceptance rate, gamma maximising expected tokens/s."""
    from speckv_env.calibrate import cached_calibration
    from speckv_env.core import DEFAULT_GAMMAS

    cm = cached_calibration(pair, progress=not a.quiet)
    hits, tests = 1.0, 2.0
    eng.start(ids, a.max_new_tokens, seed=a.seed)
    steps = []
    t1 = time.perf_counter()
    while not eng.done:
        alpha = hits / tests
        r = eng.step(max(DEFAULT_GAMMAS, key=lambda g: cm.expected_tokens_per_second(alpha, g, eng.sampling)))
        hits += sum(r.events)
        tests += len(r.events)
        steps.append(r)
    return steps, list(eng.out), time.perf_counter() - t1


def _generation_stats(steps: Sequence[Any], tokens: Sequence[int], wall: float) -> dict[str, Any]:
    drafted = sum(s.gamma for s in steps)
    acc = sum(s.accepted for s in steps)
    hist: dict[int, int] = {}
    for s in steps:
        hist[s.accepted] = hist.get(s.accepted, 0) + 1
    return {
        "new_tokens": len(tokens),
        "steps": len(steps),
        "tokens_per_step": len(tokens) / max(len(steps), 1),
        "acceptance_rate": acc / drafted if drafted else None,
        "accepted_histogram": dict(sorted(hist.items())),
        "wall_s": wall,
        "tokens_per_s": len(tokens) / wall if wall else None,
        "draft_s": sum(s.draft_s for s in steps),
        "verify_s": sum(s.verify_s for s in steps),
    }


def cmd_generate(a: argparse.Namespace) -> Output:
    from speckv_env.engine import SpeculativeEngine
    from speckv_env.pair import load_pair

    _threads(a.threads)
    t0 = time.perf_counter()
    pair = load_pair(a.target, a.draft, compression=a.compression, device=a.device)
    load_s = time.perf_counter() - t0
    eng = SpeculativeEngine(
        pair.target, pair.draft, temperature=a.temperature, top_p=a.top_p, eos_token_id=pair.eos_token_id
    )
    ids = pair.encode_chat(a.prompt)
    if a.gamma == "auto":
        steps, tokens, wall = _generate_auto(eng, pair, ids, a)
        gamma_desc = "auto (cost-aware, online acceptance estimate)"
    else:
        res = eng.generate(ids, a.max_new_tokens, gamma=a.gamma, seed=a.seed)
        steps, tokens, wall = res.steps, res.tokens, res.wall_s
        gamma_desc = str(a.gamma)
    text = pair.tokenizer.decode(tokens, skip_special_tokens=True)
    stats = {
        "target": pair.target_name,
        "draft": pair.draft_name,
        "compression": pair.compression,
        "device": str(pair.device),
        "gamma": gamma_desc,
        "temperature": a.temperature,
        **_generation_stats(steps, tokens, wall),
        "load_s": load_s,
    }
    lines = [text, "-" * 60]
    lines += [f"{k:>18}: {v:.4g}" if isinstance(v, float) else f"{k:>18}: {v}" for k, v in stats.items()]
    return Output({"text": text, **stats}, "\n".join(lines))


# ---- profile / calibrate ----------------------------------------------------------------------


def _check_ray(a: argparse.Namespace, *only_with_ray: str) -> None:
    """--ray needs Ray installed (checked without importing it); ``only_with_ray`` flags need --ray."""
    if a.ray is None:
        given = [f for f in only_with_ray if getattr(a, f.lstrip("-").replace("-", "_")) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only apply with --ray")
        return
    from .distributed import RAY_MISSING, ray_available

    if not ray_available():
        raise UsageError(RAY_MISSING)


def check_profile(a: argparse.Namespace) -> None:
    from .profile import check_profile_request

    _check_pair(a)
    _check_ray(a, "--ray-workers", "--ray-gpus")
    uri = "://" in a.out
    if uri and a.ray is None:
        raise UsageError(f"--out {a.out}: a storage URI needs --ray (a local recording writes into a folder)")
    check: Callable[..., Any] = check_profile_request
    if uri:
        from .distributed import check_profile_storage

        check = check_profile_storage
    else:
        _check_out(a.out, "--out", folder=True)
    try:
        check(
            a.out,
            modes=a.modes,
            behaviour=a.behaviour,
            gamma_max=a.gamma_max,
            max_new_tokens=a.max_new_tokens,
            resume=a.resume,
        )
    except (ValueError, FileExistsError) as e:
        raise UsageError(str(e)) from e


def cmd_profile(a: argparse.Namespace) -> Output:
    from .profile import profile

    _threads(a.threads)
    kw: dict[str, Any] = {
        "target": a.target,
        "draft": a.draft,
        "compressions": a.compressions,
        "tasks": a.tasks,
        "splits": a.splits,
        "n_train": a.n_train,
        "modes": a.modes,
        "max_new_tokens": a.max_new_tokens,
        "gamma_max": a.gamma_max,
        "device": a.device,
        "resume": a.resume,
        "progress": not a.quiet,
        "time_budget_s": a.time_budget,
        "behaviour": a.behaviour,
        "calibrate": not a.no_calibrate,
        "per_task": a.per_task,
    }
    if a.ray is None:
        s = profile(a.out, **kw)
    else:
        from .distributed import profile_on_ray

        kw.update(workers=a.ray_workers, gpus_per_worker=a.ray_gpus, threads=a.threads)
        s = profile_on_ray(a.out, a.ray, **kw)
    text = f"wrote {s['written']} episodes to {s['out']} ({s['skipped']} already there) in {s['seconds']:.0f} s" + (
        " (stopped at the time budget)" if s["stopped_early"] else ""
    )
    if a.ray is not None:
        text += f" on {s['workers']} Ray workers ({s['worker_restarts']} restarted)"
    return Output(s, text)


def check_calibrate(a: argparse.Namespace) -> None:
    _check_pair(a)
    _check_out(a.out, "--out", folder=True)
    if a.check_drift and not (Path(a.out) / f"cost-{a.compression}.json").is_file():
        raise UsageError(f"--check: no saved cost model {Path(a.out) / f'cost-{a.compression}.json'}")


def cmd_calibrate_check(a: argparse.Namespace) -> Output:
    from speckv_env.calibrate import check_calibration, format_check
    from speckv_env.core import CostModel
    from speckv_env.pair import load_pair

    saved = CostModel.load(Path(a.out) / f"cost-{a.compression}.json")
    pair = load_pair(a.target, a.draft, compression=a.compression, device=a.device)
    r = check_calibration(pair, saved, tokens_per_gamma=a.tokens_per_gamma, tolerance=a.tolerance, progress=not a.quiet)
    return Output(r, format_check(r))


def cmd_calibrate(a: argparse.Namespace) -> Output:
    from speckv_env.calibrate import calibrate
    from speckv_env.pair import load_pair

    _threads(a.threads)
    if a.check_drift:
        return cmd_calibrate_check(a)
    # calibration runs on a quiet machine: time the CPU row-count plans again too
    pair = load_pair(a.target, a.draft, compression=a.compression, device=a.device, retime_cpu_plans=True)
    cm = calibrate(
        pair, gamma_max=a.gamma_max, tokens_per_gamma=a.tokens_per_gamma, repeats=a.repeats, progress=not a.quiet
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cost-{cm.compression}.json"
    cm.save(path)
    text = (
        f"wrote {path}: t_target {cm.t_target * 1e3:.3g} ms, t_draft {cm.t_draft * 1e3:.3g} ms, "
        f"t_verify[0..{len(cm.t_verify) - 1}] {', '.join(f'{t * 1e3:.3g}' for t in cm.t_verify)} ms"
    )
    return Output({"path": str(path), "cost_model": cm.to_dict()}, text)


# ---- train / compare --------------------------------------------------------------------------


def check_train(a: argparse.Namespace) -> None:
    import agents  # noqa: F401  (fills the registry)
    from agents.base import AGENTS

    if a.live or a.quick:
        return _check_live(a, train=True)

    if a.agent not in AGENTS:
        raise UsageError(f"unknown agent {a.agent!r}: choose one of {', '.join(sorted(AGENTS))}")
    a.logs_path, a.source = _check_logs(a.logs)
    if a.source == "speckv-paper" and a.agent == "ppo":
        raise UsageError("ppo trains on full-information traces (vectorised replay), not on --logs speckv-paper")
    _check_out(a.out, "--out", folder=Path(a.out).suffix not in (".json", ".safetensors"))
    train, own = train_setting_types(a.agent)
    settings = parse_settings(
        a.set,
        {**train, **own},
        {"steps": _at_least(1), "seed": _at_least(0), "gammas": compare_setting_checks()["gammas"]},
    )
    a.train_settings = {k: v for k, v in settings.items() if k in train}
    a.agent_settings = {k: v for k, v in settings.items() if k in own}


def cmd_train(a: argparse.Namespace) -> Output:
    from .compare import train_main

    if a.live:
        return _cmd_live(a, train=True)

    _threads(a.threads or 1)
    r = train_main(
        a.agent,
        a.logs_path,
        a.out,
        source=a.source,
        agent_kwargs=a.agent_settings or None,
        progress=not a.quiet,
        **a.train_settings,
    )
    t, bf = r["test"], r["best_fixed"]
    text = (
        f"saved {r['path']}\ntest: {t['tokens_per_second']:.4g} modelled tokens/s over {t['episodes']} episodes "
        f"(best fixed gamma on train = {bf['gamma']}: {bf['tokens_per_second']:.4g} tokens/s on test)"
    )
    return Output(r, text)


def check_compare(a: argparse.Namespace) -> None:
    _check_ray(a)
    if a.live:
        if a.ray is not None:
            raise UsageError("--live decodes on this machine's models; it does not run with --ray")
        if a.obs_version is not None:
            raise UsageError("--obs-version applies to replayed comparisons, not to --live")
        return _check_live(a, train=False)
    if a.ray is not None and a.logs == "speckv-paper":
        raise UsageError("--ray runs comparisons on traces; the SpecKV paper's step logs compare here, without --ray")
    a.logs_path, a.source = _check_logs(a.logs)
    _check_out(a.out, "--out", folder=True)
    a.settings = parse_settings(a.set, compare_setting_types(), compare_setting_checks())
    if a.obs_version is not None:
        if a.obs_version == 2 and a.source is not None:
            raise UsageError(
                "--obs-version 2 needs speckv-trace/2 traces; the SpecKV paper's step logs supply version 1"
            )
        a.settings["obs_version"] = a.obs_version


def cmd_compare(a: argparse.Namespace) -> Output:
    from .compare import run_comparison

    if a.live:
        return _cmd_live(a, train=False)

    _threads(a.threads or 1)
    settings = {"progress": not a.quiet, **a.settings}
    res = run_comparison(logs=a.logs_path, out_dir=a.out, source=a.source, quick=a.quick, ray=a.ray, **settings)
    out = Path(a.out)
    splits = cast(dict[str, Any], res["splits"])
    data: dict[str, Any] = {
        "report": str(out / "report.md"),
        "results": str(out / "results.json"),
        "runtime_s": res.get("runtime_s"),
        "verdicts": {k: s["verdict"]["sentence"] for k, s in splits.items() if "verdict" in s},
    }
    lines = [f"report: {data['report']}"] + [f"[{k}] {v}" for k, v in data["verdicts"].items()]
    return Output(data, "\n".join(lines))


def _check_live(a: argparse.Namespace, train: bool) -> None:
    """``--live`` (speckv_env/app/online.py): the settings are OnlineConfig fields; --logs gives
    the replay traces the MLP and PPO pretrain on (and the cost model beside them)."""
    from .online import LIVE_LEARNERS, OnlineConfig

    if not a.live:
        raise UsageError("--quick applies to --live training only")
    a.logs_path, a.source = _check_logs(a.logs)
    if a.source is not None:
        raise UsageError("--live pretrains on full-information traces, not on --logs speckv-paper")
    if train and a.agent not in LIVE_LEARNERS:
        raise UsageError(f"--live trains a learner: one of {', '.join(LIVE_LEARNERS)} (got {a.agent!r})")
    _check_out(a.out, "--out", folder=not train or Path(a.out).suffix not in (".json", ".safetensors"))
    hints = typing.get_type_hints(OnlineConfig)
    known = {f.name: hints[f.name] for f in dataclasses.fields(OnlineConfig)}
    if train:
        known = {k: v for k, v in known.items() if k not in ("learners", "replay_twins", "static")}
    checks = {k: _at_least(1) for k in ("validation_prompts", "test_prompts", "max_new_tokens", "n_boot", "threads")}
    checks.update({k: _at_least(0) for k in ("ppo_live_steps", "warmup_tokens", "seed", "temperature")})
    checks.update(train_prompts=_at_least(1), train_passes=_at_least(1), gammas=compare_setting_checks()["gammas"])
    a.settings = parse_settings(a.set, known, checks)
    try:
        OnlineConfig(**a.settings)  # learners, learn_from, ...: the config's own checks
    except ValueError as e:
        raise UsageError(str(e)) from None


def _cmd_live(a: argparse.Namespace, train: bool) -> Output:
    from .online import run_live_comparison, train_live_main

    settings = {"progress": not a.quiet, **({"threads": a.threads} if a.threads else {}), **a.settings}
    if train:
        r = train_live_main(a.agent, a.out, quick=a.quick, logs=a.logs_path, **settings)
        text = f"saved {r['path']}\ntest (measured / modelled tokens/s): " + "; ".join(
            f"{n} {v['measured_tps']:.4g} / {v['modelled_tps']:.4g}" for n, v in r["test"].items()
        )
        return Output(r, text)
    res = run_live_comparison(a.out, quick=a.quick, logs=a.logs_path, **settings)
    split = res["splits"]["heldout"]
    data: dict[str, Any] = {"report": str(Path(a.out) / "report.md"), "results": str(Path(a.out) / "results.json")}
    data.update(runtime_s=res["runtime_s"], verdicts={"heldout": split["verdict"]["sentence"]})
    return Output(data, f"report: {data['report']}\n[heldout, live] {split['verdict']['sentence']}")


# ---- bench / demo -----------------------------------------------------------------------------


def check_bench(a: argparse.Namespace) -> None:
    if isinstance(a.json, str):  # the old form `--json PATH`: now `--out PATH`
        if a.out is not None:
            raise UsageError("give the results file once: --out PATH (`--json PATH` is its old spelling)")
        log.warning("speckv bench: `--json PATH` is deprecated, use `--out PATH` (and `--json` for JSON on stdout)")
        a.out, a.json = a.json, False
    if a.what == "engine":
        _check_pair(a)
    if a.out is not None:
        _check_out(a.out, "--out", folder=False)


def cmd_bench(a: argparse.Namespace) -> Output:
    if a.what == "engine":
        from speckv_env.pair import load_pair

        from .bench_engine import bench_prompts, format_engine_table, run_engine_bench

        _threads(a.threads)
        pair = load_pair(a.target, a.draft, compression=a.compression, device=a.device)
        fast = (
            None if a.no_fast else load_pair(a.target, a.draft, compression=a.compression, device=a.device, exact=False)
        )
        r = run_engine_bench(
            pair,
            bench_prompts(a.prompts_per_task),
            max_new_tokens=a.max_new_tokens,
            repeats=a.repeats,
            fast_pair=fast,
            val_prompts=bench_prompts(a.val_prompts_per_task, split="validation"),
            val_repeats=a.val_repeats,
            progress=not a.quiet,
            cache=a.cache,
        )
        text = format_engine_table(r)
    elif a.what == "env":
        from .bench_env import bench_env

        r = bench_env(None, seconds=a.seconds)
        if not a.skip_live:
            from .livebench import bench_live_overhead

            _threads(a.threads)
            r["live"] = bench_live_overhead(max_new_tokens=a.max_new_tokens)
        text = json.dumps(_jsonable(r), indent=2)
    else:
        from .bench_agents import bench_agents, format_table

        r = bench_agents(None)
        text = format_table(r)
    if a.out is not None:
        _write_json_file(r, Path(a.out))
        text += f"\nwrote {a.out}"
    return Output(r, text)


def check_demo(a: argparse.Namespace) -> None:
    _check_out(a.out, "--out", folder=True)
    _check_logs("default")


def cmd_demo(a: argparse.Namespace) -> Output:
    from .demo import format_demo, run_demo

    s = run_demo(out=a.out, quick=not a.full, live=not a.no_live, threads=a.threads, progress=not a.quiet)
    return Output({k: v for k, v in s.items() if k != "live_text"}, format_demo(s))


# ---- the parser -------------------------------------------------------------------------------


def _output_args(
    p: argparse.ArgumentParser, json_help: str = "print the result as one JSON document on stdout"
) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help=json_help + " (nothing else goes to stdout)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages on stderr (errors still)")


def _pair_args(p: argparse.ArgumentParser, compression: bool = True) -> None:
    g = p.add_argument_group("models")
    g.add_argument(
        "--target", default=None, help="target model: hub id, folder or .gguf (default: embedded SmolLM2-135M-Instruct)"
    )
    g.add_argument(
        "--draft", default=None, help="draft model: hub id, folder or .gguf (default: the draft shipped for the target)"
    )
    if compression:
        g.add_argument(
            "--compression",
            type=_compression_arg,
            default="fp32",
            help=f"target compression: {', '.join(COMPRESSIONS)} (default fp32)",
        )
    g.add_argument("--device", type=_device_arg, default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    g.add_argument("--threads", type=_int_arg(1), default=None, help="torch CPU threads (default: torch's)")


def _ray_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help=f"{what}. ADDRESS: local (default: start Ray on this machine), auto (the cluster running here) "
        "or a cluster address (HOST:6379, ray://HOST:10001); needs pip install 'speckv-gym[ray]'",
    )


def _add_generate(sub: Any) -> None:
    g = sub.add_parser("generate", help="speculative decoding of one prompt", description="Decode one prompt.")
    _pair_args(g)
    g.add_argument(
        "--prompt", default="Write a Python function that checks whether a number is prime.", help="the user message"
    )
    g.add_argument("--gamma", type=_gamma_arg, default=4, help=f"fixed gamma 0..{MAX_GAMMA} (0 = target only) or auto")
    g.add_argument("--max-new-tokens", type=_int_arg(1), default=128, help="generation budget (default 128)")
    g.add_argument("--temperature", type=_float_arg(0.0), default=0.0, help="sampling temperature, 0 = greedy")
    g.add_argument("--top-p", type=_float_arg(0.0, 1.0, lo_open=True), default=1.0, help="nucleus top-p in (0, 1]")
    g.add_argument("--seed", type=_int_arg(0), default=0, help="sampling seed")
    _output_args(g, "print the text and its statistics as one JSON document")
    g.set_defaults(fn=cmd_generate, check=check_generate, parser=g)


def _add_profile(sub: Any) -> None:
    from speckv_env.prompts import SPLITS, TASKS

    from .profile import MODES

    p = sub.add_parser("profile", help="record full-information traces")
    _pair_args(p, compression=False)
    p.add_argument("--out", required=True, help="trace folder (one Parquet part file per episode)")
    p.add_argument(
        "--compressions",
        type=_csv_arg("compressions", convert=_compression_arg),
        default=["fp32", "int8", "nf4"],
        help="target compressions, comma-separated (default fp32,int8,nf4)",
    )
    p.add_argument(
        "--tasks",
        type=_csv_arg("tasks", TASKS),
        default=list(TASKS),
        help=f"tasks from {','.join(TASKS)} (default all)",
    )
    p.add_argument(
        "--splits", type=_csv_arg("splits", SPLITS), default=["test", "validation", "train"], help="prompt splits"
    )
    p.add_argument("--n-train", type=_int_arg(0), default=40, help="training prompts per task (default 40)")
    p.add_argument("--per-task", type=_int_arg(1), default=None, help="cap on prompts per task in every split")
    p.add_argument(
        "--modes", type=_csv_arg("modes", tuple(MODES)), default=list(MODES), help="greedy and/or sample (T = 0.7)"
    )
    p.add_argument("--max-new-tokens", type=_int_arg(1), default=128, help="generation budget (default 128)")
    p.add_argument("--gamma-max", type=_int_arg(1, 127), default=8, help="record acceptance runs up to this gamma")
    p.add_argument("--resume", action="store_true", help="continue an interrupted recording (same settings)")
    p.add_argument(
        "--time-budget", type=_float_arg(0.0, lo_open=True), default=None, help="stop cleanly after this many seconds"
    )
    p.add_argument(
        "--behaviour",
        default="uniform",
        help="gamma policy of the recorded path: uniform (0..gamma-max), uniform:A-B or fixed:G",
    )
    p.add_argument(
        "--no-calibrate",
        action="store_true",
        help="do not measure the cost model here (write it later with `speckv calibrate --out` on a quiet machine)",
    )
    _ray_args(p, "record episodes on a Ray cluster, one pair loaded per worker; --out may then be a storage URI")
    p.add_argument(
        "--ray-workers", type=_int_arg(1), default=None, help="--ray: workers (default: as many as the cluster holds)"
    )
    p.add_argument(
        "--ray-gpus",
        type=_float_arg(0.0),
        default=None,
        help="--ray: GPUs per worker (default 1 where the cluster has GPUs); CPU threads per worker: --threads",
    )
    _output_args(p, "print the summary as JSON")
    p.set_defaults(fn=cmd_profile, check=check_profile, parser=p)


def _add_calibrate(sub: Any) -> None:
    c = sub.add_parser("calibrate", help="measure a pair's cost model (draft/verify/target step times)")
    _pair_args(c)
    c.add_argument("--out", required=True, help="folder: writes cost-<compression>.json (beside traces)")
    c.add_argument("--gamma-max", type=_int_arg(0, MAX_GAMMA), default=8, help="measure gammas 0..this (default 8)")
    c.add_argument("--tokens-per-gamma", type=_int_arg(2), default=24, help="tokens decoded per gamma and prompt")
    c.add_argument("--repeats", type=_int_arg(1), default=5, help="rounds over all gammas, random order (default 5)")
    c.add_argument(
        "--check",
        dest="check_drift",
        action="store_true",
        help="re-measure a few points and report drift against the saved --out/cost-<compression>.json",
    )
    c.add_argument(
        "--tolerance",
        type=_float_arg(0.0, lo_open=True),
        default=0.10,
        help="--check: relative drift allowed per point (default 0.10)",
    )
    _output_args(c, "print the written path and the cost model as JSON")
    c.set_defaults(fn=cmd_calibrate, check=check_calibrate, parser=c)


def _add_train(sub: Any) -> None:
    t = sub.add_parser("train", help="train one controller on traces")
    t.add_argument("agent", help="agent name: fixed, hf_heuristic, cost_aware, speckv_mlp, ucb1, ppo, ...")
    t.add_argument("--logs", default="default", help="trace folder or file, 'default' (shipped) or 'speckv-paper'")
    t.add_argument("--out", required=True, help="agent file (.json or .safetensors) or a folder")
    t.add_argument(
        "--set",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="training settings (steps, seed, gammas, tensorboard) and the agent's own; an unknown key lists them",
    )
    t.add_argument("--threads", type=_int_arg(1), default=None, help="torch CPU threads (default 1)")
    t.add_argument("--live", action="store_true", help="learn as it decodes on SpecKV-v0 (the real models)")
    t.add_argument("--quick", action="store_true", help="with --live: the small budget (OnlineConfig.quick)")
    _output_args(t, "print the saved path and the test summary as JSON")
    t.set_defaults(fn=cmd_train, check=check_train, parser=t)


def _add_compare(sub: Any) -> None:
    c = sub.add_parser("compare", help="train and compare controllers")
    c.add_argument("--logs", default="default", help="trace folder or file, 'default' (shipped) or 'speckv-paper'")
    c.add_argument("--out", required=True, help="folder for report.md, results.json, plots and tb/")
    c.add_argument("--quick", action="store_true", help="few seeds and steps (CompareConfig.quick)")
    c.add_argument(
        "--set",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="comparison settings (CompareConfig fields, e.g. seeds=2 splits=heldout); an unknown key lists them",
    )
    c.add_argument("--threads", type=_int_arg(1), default=None, help="torch CPU threads (default 1; --live: 2)")
    c.add_argument(
        "--obs-version",
        type=int,
        choices=(1, 2),
        default=None,
        help="observation version every policy decides on (default: 2 when every trace is speckv-trace/2, "
        "else 1); recorded in results.json and report.md",
    )
    c.add_argument(
        "--live",
        action="store_true",
        help="learn and compare online on SpecKV-v0 (the real models): measured and modelled tokens/s; "
        "--set takes OnlineConfig fields",
    )
    _ray_args(c, "train and evaluate the learners (folds x seeds x agents) as Ray tasks; the same results")
    _output_args(c, "print the report's path and the verdicts as JSON")
    c.set_defaults(fn=cmd_compare, check=check_compare, parser=c)


def _add_bench(sub: Any) -> None:
    b = sub.add_parser("bench", help="speed benchmarks")
    b.add_argument("what", choices=["engine", "env", "agents"], help="what to measure")
    _pair_args(b)
    b.add_argument("--out", default=None, help="also write the results to this JSON file")
    b.add_argument("--max-new-tokens", type=_int_arg(1), default=64, help="tokens per prompt (default 64)")
    b.add_argument("--prompts-per-task", type=_int_arg(1), default=1, help="engine bench: test prompts per task")
    b.add_argument(
        "--val-prompts-per-task",
        type=_int_arg(1),
        default=1,
        help="engine bench: validation prompts per task (they choose the engine's gamma)",
    )
    b.add_argument("--repeats", type=_int_arg(1), default=3, help="engine bench: interleaved repeats (default 3)")
    b.add_argument(
        "--val-repeats", type=_int_arg(1), default=None, help="engine bench: validation repeats (default: --repeats)"
    )
    b.add_argument("--no-fast", action="store_true", help="engine bench: skip the fast (exact=False) engine")
    b.add_argument(
        "--cache",
        choices=["dynamic", "static"],
        default="dynamic",
        help="engine bench: the engine's KV cache (static: pre-allocated, rollback moves a position)",
    )
    b.add_argument(
        "--seconds", type=_float_arg(0.0, lo_open=True), default=2.0, help="env bench: seconds per measurement"
    )
    b.add_argument("--skip-live", action="store_true", help="env bench: skip the live-env overhead part")
    g = b.add_argument_group("output")
    g.add_argument(
        "--json",
        nargs="?",
        const=True,
        default=False,
        metavar="PATH",
        help="print the results as one JSON document on stdout (nothing else goes to stdout); "
        "`--json PATH` is the old spelling of --out PATH",
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages on stderr (errors still)")
    b.set_defaults(fn=cmd_bench, check=check_bench, parser=b)


def _add_demo(sub: Any) -> None:
    d = sub.add_parser("demo", help="the main job on the embedded default")
    d.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    d.add_argument("--full", action="store_true", help="full comparison instead of the quick one")
    d.add_argument("--no-live", action="store_true", help="skip the live check")
    d.add_argument("--threads", type=_int_arg(1), default=None, help="torch CPU threads")
    _output_args(d, "print the paths and the live check's verdict as JSON")
    d.set_defaults(fn=cmd_demo, check=check_demo, parser=d)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="speckv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"speckv {__version__}", help="print the version and exit")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND", title="commands")
    for add in (_add_generate, _add_profile, _add_calibrate, _add_train, _add_compare, _add_bench, _add_demo):
        add(sub)
    return ap


def _fail(cmd: str, err: BaseException, code: int) -> int:
    print(f"speckv {cmd}: error: {_one_line(err) or type(err).__name__}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    a, extra = build_parser().parse_known_args(argv)
    if extra:  # reported by the subcommand's parser: `speckv <cmd>: error: ...`
        a.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(a.quiet)
    if a.cmd == "profile":
        # recordings run as parallel processes: idle OpenMP threads sleep instead of spinning,
        # or one process's spinning threads starve the others (measured: batched generation
        # 6.5 -> 64 tok/s). A single decoding process is faster with the runtime's default
        # (spin-then-sleep): multi-token verification, 4 prompts x 64 tokens, same run,
        # default vs PASSIVE: target-only 16.66 vs 14.99 tok/s, engine gamma 4 18.45 vs 14.66.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        a.check(a)
        with _library_output(a.quiet):
            out = a.fn(a)
    except UsageError as e:
        return _fail(a.cmd, e, 2)
    except KeyboardInterrupt:
        print(f"speckv {a.cmd}: interrupted", file=sys.stderr)
        return 130
    except RUNTIME_ERRORS as e:
        # a model that does not load, a malformed trace or agent file, a missing file: one
        # clear line, no traceback (SPECKV_DEBUG=1 shows it)
        if os.environ.get("SPECKV_DEBUG"):
            raise
        return _fail(a.cmd, e, 1)
    _emit(out, a.json)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
