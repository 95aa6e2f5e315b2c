"""The `speckv` command-line contract, and the inputs the commands refuse.

Usage and input errors exit 2 with exactly one line `speckv <cmd>: error: ...` on stderr,
nothing on stdout and no traceback, found before any model loads or other work starts (the
work's entry points are replaced by tripwires here); runtime failures of known kinds exit 1
with one such line. Also: --version, typed --set, JSON purity, profile --resume refusing to
mix recordings, calibrate without gamma-0 samples, and an atomic CostModel.save.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import requires_default

from replay.trace import TraceWriter, synthetic_dataset, synthetic_trace, write_traces
from speckv_env.app import cli
from speckv_env.core import CostModel

# ---- inputs on disk ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "a_file").write_text("not a folder")
    (d / "empty").mkdir()
    (d / "no_config").mkdir()
    (d / "model").mkdir()
    (d / "model" / "config.json").write_text("{}")
    (d / "garbage").mkdir()
    (d / "garbage" / "part.parquet").write_text("not parquet")
    (d / "no_cost").mkdir()
    write_traces(d / "no_cost" / "traces.parquet", synthetic_dataset(12, compressions=("fp32",)))
    # a recording as `speckv profile` leaves it: one budget, gamma_max 8, one draft
    with TraceWriter(d / "recording") as w:
        for i in range(3):
            w.write(synthetic_trace(32, seed=i, trace_id=f"rec-{i}", compression="fp32"))
    return d


def _cases(d: Path) -> list[tuple[list[str], str]]:
    """(argv, a fragment of the error line): every one must exit 2 before any work."""
    f, below_file = str(d / "a_file"), str(d / "a_file" / "out")
    return [
        (["generate", "--compression", "int3"], "unknown compression 'int3'"),
        (["generate", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "--top-p", "0"], "--top-p"),
        (["generate", "--temperature", "-1"], "--temperature"),
        (["generate", "--temperature", "nan"], "--temperature"),
        (["generate", "--gamma", "99"], "--gamma"),
        (["generate", "--gamma", "many"], "--gamma"),
        (["generate", "--seed", "x"], "--seed"),
        (["generate", "--device", "tpu"], "unknown device"),
        (["generate", "--threads", "0"], "--threads"),
        (["generate", "--target", str(d / "missing")], "does not exist"),
        (["generate", "--target", str(d / "missing.gguf")], "GGUF file"),
        (["generate", "--target", f, "--draft", str(d / "model")], "not a .gguf file"),
        (["generate", "--target", str(d / "no_config"), "--draft", str(d / "model")], "no config.json"),
        (["generate", "--target", str(d / "model")], "--draft is required"),
        (["generate", "--draft", str(d / "missing")], "--draft"),
        (["generate", "--prompt", "  "], "--prompt"),
        (["generate", "--no-such-flag"], "unrecognized arguments"),
        (["profile"], "--out"),
        (["profile", "--out", below_file], "cannot be created"),
        (["profile", "--out", f], "is a file"),
        (["profile", "--out", str(d / "p"), "--compressions", "fp32,int3"], "unknown compression 'int3'"),
        (["profile", "--out", str(d / "p"), "--tasks", "chat,poetry"], "unknown tasks 'poetry'"),
        (["profile", "--out", str(d / "p"), "--splits", "holdout"], "unknown splits"),
        (["profile", "--out", str(d / "p"), "--modes", "greedy,beam"], "unknown modes 'beam'"),
        (["profile", "--out", str(d / "p"), "--behaviour", "fixed:99"], "behaviour policy"),
        (["profile", "--out", str(d / "p"), "--gamma-max", "0"], "--gamma-max"),
        (["profile", "--out", str(d / "p"), "--time-budget", "0"], "--time-budget"),
        (["profile", "--out", str(d / "recording")], "--resume"),
        (["profile", "--out", str(d / "recording"), "--resume", "--max-new-tokens", "64"], "max_new_tokens"),
        (["calibrate", "--out", str(d / "c"), "--gamma-max", "-1"], "--gamma-max"),
        (["calibrate", "--out", str(d / "c"), "--tokens-per-gamma", "1"], "--tokens-per-gamma"),
        (["calibrate", "--out", f], "is a file"),
        (["calibrate", "--out", str(d / "c"), "--target", str(d / "missing.gguf")], "GGUF file"),
        (["train", "nope", "--out", str(d / "t")], "unknown agent 'nope'"),
        (["train", "ucb1", "--logs", str(d / "missing"), "--out", str(d / "t")], "no such file or folder"),
        (["train", "ucb1", "--logs", str(d / "empty"), "--out", str(d / "t")], "no .parquet"),
        (["train", "ucb1", "--out", below_file], "cannot be created"),
        (["train", "ucb1", "--out", str(d / "t"), "--set", "mlp_epochs=3"], "unknown key"),
        (["train", "ucb1", "--out", str(d / "t"), "--set", "steps=abc"], "expected an integer"),
        (["train", "ucb1", "--out", str(d / "t"), "--set", "steps=0"], "must be >= 1"),
        (["train", "ucb1", "--out", str(d / "t"), "--set", "steps"], "KEY=VALUE"),
        (["train", "ppo", "--logs", "speckv-paper", "--out", str(d / "t")], "speckv-paper"),
        (["compare", "--out", str(d / "c"), "--set", "mlp_epochs=many"], "mlp_epochs"),
        (["compare", "--out", str(d / "c"), "--set", "nope=1"], "accepted keys"),
        (["compare", "--out", str(d / "c"), "--set", "level=2"], "level"),
        (["compare", "--out", str(d / "c"), "--set", "splits=heldout,bad"], "heldout, loto, loco"),
        (["compare", "--out", str(d / "c"), "--set", "gammas=1,1"], "distinct"),
        (["compare", "--out", str(d / "c"), "--set", "ppo_kwargs=[1]"], "JSON object"),
        (["compare", "--out", below_file], "cannot be created"),
        (["compare", "--out", str(d / "c"), "--logs", str(d / "missing")], "no such file"),
        (["bench", "nope"], "invalid choice"),
        (["bench", "engine", "--repeats", "0"], "--repeats"),
        (["bench", "env", "--seconds", "0"], "--seconds"),
        (["bench", "agents", "--out", str(d)], "is a folder"),
        (["bench", "engine", "--target", str(d / "missing")], "does not exist"),
        (["bench", "agents", "--json", str(d / "b.json"), "--out", str(d / "c.json")], "once"),
        (["demo", "--out", below_file], "cannot be created"),
        (["demo", "--threads", "0"], "--threads"),
    ]


class _Reached(Exception):
    pass


@pytest.fixture
def tripwires(monkeypatch):
    """Every command's work fails the test if reached: input errors must be found before it."""
    from speckv_env import calibrate, pair
    from speckv_env.app import bench_agents, bench_env, compare, demo, profile

    def trip(fn, name):
        @functools.wraps(fn)  # the signature stays readable (the command line reads train_main's)
        def f(*a, **k):
            raise _Reached(f"{name} was called")

        return f

    for mod, name in (
        (pair, "load_pair"),
        (calibrate, "calibrate"),
        (compare, "run_comparison"),
        (compare, "train_main"),
        (profile, "profile"),
        (bench_agents, "bench_agents"),
        (bench_env, "bench_env"),
        (demo, "run_demo"),
    ):
        monkeypatch.setattr(mod, name, trip(getattr(mod, name), f"{mod.__name__}.{name}"))
    for k in ("OMP_WAIT_POLICY", "TQDM_DISABLE"):  # main() may set them: restored after the test
        if k in os.environ:
            monkeypatch.setenv(k, os.environ[k])
        else:
            monkeypatch.delenv(k, raising=False)


def _run_main(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's usage errors
        assert isinstance(e.code, int), f"exit code {e.code!r} is not a number"
        return e.code


def _assert_one_error_line(stderr: str, cmd: str, fragment: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"speckv {cmd}: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in stderr


def test_bad_inputs_exit_2_with_one_line_before_any_work(files, tripwires, capsys):
    cases = _cases(files)
    assert {argv[0] for argv, _ in cases} == {"generate", "profile", "calibrate", "train", "compare", "bench", "demo"}
    for argv, fragment in cases:
        t0 = time.perf_counter()
        code = _run_main(argv)
        took = time.perf_counter() - t0
        out, err = capsys.readouterr()
        assert code == 2, (argv, err)
        _assert_one_error_line(err, argv[0], fragment)
        assert out == "", (argv, out)
        assert took < 5, (argv, took)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["generate", "--compression", "int3"], "unknown compression 'int3'"),
        (["profile", "--out", "{d}/recording", "--resume", "--max-new-tokens", "32", "--gamma-max", "4"], "gamma_max"),
        (["train", "ucb1", "--out", "{d}/t", "--set", "mlp_epochs=3"], "unknown key"),
        (["compare", "--out", "{d}/c", "--set", "mlp_epochs=x"], "expected an integer"),
        (["bench", "engine", "--top-p", "0.5"], "unrecognized arguments: --top-p 0.5"),
    ],
)
def test_a_real_process_prints_one_line_and_no_traceback(files, argv, fragment):
    argv = [a.replace("{d}", str(files)) for a in argv]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "speckv_env.app.cli", *argv], capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - t0 < 5
    assert r.returncode == 2 and r.stdout == ""
    _assert_one_error_line(r.stderr, argv[0], fragment)


def test_unknown_command_is_a_usage_error(capsys):
    assert _run_main(["speak"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("speckv: error: ") and "invalid choice" in err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "ucb1", "--logs", "{d}/garbage", "--out", "{d}/t.json"], "unreadable or truncated Parquet"),
        (["compare", "--logs", "{d}/garbage", "--out", "{d}/c", "--quick"], "{d}/garbage/part.parquet"),
        (["train", "ucb1", "--logs", "{d}/no_cost", "--out", "{d}/t.json"], "cost"),
    ],
)
def test_runtime_failures_exit_1_with_one_line(files, argv, fragment):
    argv = [a.replace("{d}", str(files)) for a in argv]
    r = subprocess.run([sys.executable, "-m", "speckv_env.app.cli", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == "", r.stderr
    _assert_one_error_line(r.stderr, argv[0], fragment.replace("{d}", str(files)))


def test_every_flag_has_help_text():
    ap = cli.build_parser()
    subs = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subs.choices) == {"generate", "profile", "calibrate", "train", "compare", "bench", "demo"}
    for name, p in [("speckv", ap), *subs.choices.items()]:
        for act in p._actions:
            if isinstance(act, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert act.help and act.help.strip(), f"{name} {act.option_strings or act.dest} has no help"
        if name != "speckv":
            flags = {s for act in p._actions for s in act.option_strings}
            assert {"--json", "--quiet"} <= flags, name


def test_version():
    r = subprocess.run([sys.executable, "-m", "speckv_env.app.cli", "--version"], capture_output=True, text=True)
    import speckv_env

    assert r.returncode == 0 and r.stdout.strip() == f"speckv {speckv_env.__version__}" and r.stderr == ""


def test_compression_names_match_the_model_loader():
    from speckv_env.models import COMPRESSIONS, check_compression

    assert cli.COMPRESSIONS == COMPRESSIONS
    for name in (*cli.COMPRESSIONS, *cli.COMPRESSION_ALIASES):
        assert cli._compression_arg(name) == check_compression(name)


# ---- --set: known keys, typed values ------------------------------------------------------------


def test_set_reaches_every_comparison_setting_with_its_type():
    from speckv_env.app.compare import CompareConfig

    types = cli.compare_setting_types()
    assert list(types) == [f.name for f in dataclasses.fields(CompareConfig)]
    assert len(types) == 21  # obs_version (observation v2) is the 21st
    checks = cli.compare_setting_checks()
    assert set(checks) <= set(types)  # no rule for a setting that does not exist
    got = cli.parse_settings(
        [
            "mlp_epochs=3",
            "level=0.9",
            "tensorboard=false",
            "splits=heldout,loto",
            'policies=["fixed","oracle"]',
            "gammas=[0,2,4]",
            'ppo_kwargs={"n_steps": 64}',
            "paper_recorded_gammas=",
        ],
        types,
        checks,
    )
    assert got == {
        "mlp_epochs": 3,
        "level": 0.9,
        "tensorboard": False,
        "splits": ("heldout", "loto"),
        "policies": ("fixed", "oracle"),
        "gammas": (0, 2, 4),
        "ppo_kwargs": {"n_steps": 64},
        "paper_recorded_gammas": (),
    }
    assert type(got["mlp_epochs"]) is int and type(got["level"]) is float
    CompareConfig(**got)  # the values build the config
    for bad, msg in (
        ("mlp_epochs=3.5", "expected an integer"),
        ("level=high", "expected a number"),
        ("tensorboard=maybe", "true or false"),
        ("seeds=0", ">= 1"),
        ("policies=fixed,magic", "one of"),
        ("obs_version=3", "must be 1, 2 or 0"),
    ):
        with pytest.raises(cli.UsageError, match=msg) as e:
            cli.parse_settings([bad], types, checks)
        assert bad.split("=")[0] in str(e.value)


def test_train_settings_are_the_trainer_and_the_agents_own():
    train, own = cli.train_setting_types("epsilon_greedy")
    assert {"steps", "seed", "gammas", "tensorboard"} <= set(train) and "epsilon" in own
    got = cli.parse_settings(["epsilon=0.2", "steps=100", "gammas=0,1,2"], {**train, **own}, {})
    assert got == {"epsilon": 0.2, "steps": 100, "gammas": (0, 1, 2)}
    with pytest.raises(cli.UsageError, match="accepted keys: .*epsilon"):
        cli.parse_settings(["mlp_epochs=3"], {**train, **own}, {})


# ---- profile --resume refuses to mix recordings ---------------------------------------------------


def test_profile_resume_refuses_other_settings_before_loading_models(files, tmp_path):
    from speckv_env.app.profile import profile

    rec = files / "recording"
    for kw, what in (
        ({"max_new_tokens": 64}, "max_new_tokens"),
        ({"max_new_tokens": 32, "gamma_max": 6}, "gamma_max"),
        ({"max_new_tokens": 32, "modes": ("greedy", "sample")}, None),  # no sample traces yet: fine so far
    ):
        args = dict(target=str(tmp_path / "no-such-model"), draft="x", resume=True, progress=False, **kw)
        with pytest.raises((ValueError, RuntimeError)) as e:
            profile(rec, **args)
        if what is None:
            assert "no-such-model" in str(e.value)  # got as far as loading the (missing) model
        else:
            assert str(rec) in str(e.value) and what in str(e.value) and "no-such-model" not in str(e.value)


def test_profile_resume_refuses_other_sampling_settings_and_another_draft(tmp_path):
    from speckv_env.app.profile import check_resume, check_resume_pair

    with TraceWriter(tmp_path) as w:
        t = synthetic_trace(32, seed=0, mode="sample", trace_id="s0")  # stored temperature 1.0
        w.write(dataclasses.replace(t, meta={"draft_fingerprint": "aaaa", "kernels": "stock"}))
    with pytest.raises(ValueError, match="temperature") as e:
        check_resume(tmp_path, max_new_tokens=32, gamma_max=8, modes=("sample",))
    assert str(tmp_path) in str(e.value)
    seen = check_resume(tmp_path, max_new_tokens=32, gamma_max=8, modes=("greedy",))
    same = SimpleNamespace(
        name="synthetic", device=SimpleNamespace(type="synthetic"), draft_fingerprint="aaaa", kernels="stock"
    )
    check_resume_pair(tmp_path, seen, same)
    for change, what in (
        ({"draft_fingerprint": "bbbb"}, "draft fingerprint aaaa, this run asks for bbbb"),
        ({"device": SimpleNamespace(type="cuda")}, "device synthetic, this run asks for cuda"),
        ({"name": "other|pair"}, "pair synthetic, this run asks for other|pair"),
        ({"kernels": "row-invariant:rowdot-c"}, "kernels stock, this run asks for row-invariant:rowdot-c"),
    ):
        with pytest.raises(ValueError, match="resuming would mix") as e:
            check_resume_pair(tmp_path, seen, SimpleNamespace(**{**vars(same), **change}))
        assert what in str(e.value) and str(tmp_path) in str(e.value)


def _save_tiny_pair(folder: Path, seed: int) -> tuple[str, str]:
    from tiny_models import make_tiny_pair

    from speckv_env.models import load_tokenizer

    tok = load_tokenizer(None)
    t, d = make_tiny_pair(vocab=49152, hidden=32, seed=seed)
    for m, name in ((t, "t"), (d, "d")):
        m.config.eos_token_id = tok.eos_token_id
        m.generation_config.eos_token_id = tok.eos_token_id
        m.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
    return str(folder / "t"), str(folder / "d")


@pytest.mark.slow
@requires_default
def test_profile_resume_refuses_a_retrained_draft(tmp_path):
    from speckv_env.app.profile import profile

    t, d = _save_tiny_pair(tmp_path, seed=2)
    kw = {
        "target": t,
        "draft": d,
        "compressions": ["fp32"],
        "tasks": ["math"],
        "splits": ["test"],
        "modes": ["greedy"],
        "max_new_tokens": 8,
        "device": "cpu",
        "calibrate": False,
        "progress": False,
    }
    out = tmp_path / "traces"
    assert profile(out, per_task=1, **kw)["written"] == 1
    _save_tiny_pair(tmp_path / "retrained", seed=5)  # same draft folder, other weights:
    (tmp_path / "d" / "model.safetensors").write_bytes(
        (tmp_path / "retrained" / "d" / "model.safetensors").read_bytes()
    )
    with pytest.raises(ValueError, match="draft fingerprint") as e:
        profile(out, per_task=2, resume=True, **kw)
    assert str(out) in str(e.value)
    assert len(list(out.glob("*.parquet"))) == 1  # nothing recorded with the other draft


# ---- calibrate without gamma-0 samples --------------------------------------------------------------


def _fake_pair():
    import torch

    return SimpleNamespace(
        target=None,
        draft=None,
        eos_token_id=0,
        encode_chat=lambda text: [1, 2, 3],
        name="fake",
        compression="fp32",
        device=torch.device("cpu"),
        draft_fingerprint="f",
    )


def test_calibrate_without_gamma0_samples_is_a_clear_error(monkeypatch):
    from speckv_env import calibrate as cal

    class Engine:  # every gamma-0 run ends before its first step; the others step at their gamma
        def __init__(self, *a, **k):
            pass

        def generate(self, ids, n, gamma=0, seed=0):
            step = SimpleNamespace(gamma=gamma, verify_s=0.01, draft_s=0.001, draft_forwards=max(gamma, 1))
            return SimpleNamespace(steps=[step] * 3 if gamma else [])

    monkeypatch.setattr(cal, "SpeculativeEngine", Engine)
    with pytest.raises(ValueError, match="no gamma-0 step was measured") as e:
        cal.calibrate(_fake_pair(), gamma_max=3)
    assert "fake" in str(e.value)


def test_calibrate_without_prompts_is_a_clear_error(tiny_pair):
    from speckv_env.calibrate import calibrate

    t, d = tiny_pair
    pair = SimpleNamespace(**{**vars(_fake_pair()), "target": t, "draft": d})
    with pytest.raises(ValueError, match="no calibration prompts"):
        calibrate(pair, prompts=())


# ---- CostModel.save is atomic --------------------------------------------------------------------


class _Crash(Exception):
    pass


class _HalfWriter:
    """A file that writes half of what it is given, then 'crashes'."""

    def __init__(self, fh):
        self._fh = fh

    def write(self, data):
        self._fh.write(data[: len(data) // 2])
        self._fh.flush()
        raise _Crash("simulated crash mid-write")

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def test_cost_model_save_is_atomic(tmp_path, monkeypatch):
    import builtins
    import io

    path = tmp_path / "cost-fp32.json"
    old = CostModel.unit(draft_ratio=0.1)
    old.save(path)
    assert CostModel.load(path) == old and [p.name for p in tmp_path.iterdir()] == ["cost-fp32.json"]
    real_open = builtins.open

    def crashing_open(file, mode="r", *a, **k):
        fh = real_open(file, mode, *a, **k)
        in_dir = isinstance(file, (str, os.PathLike)) and Path(file).parent == tmp_path
        return _HalfWriter(fh) if in_dir and ("w" in mode or "a" in mode) else fh

    monkeypatch.setattr(builtins, "open", crashing_open)
    monkeypatch.setattr(io, "open", crashing_open)
    with pytest.raises(_Crash):
        CostModel.unit(draft_ratio=0.3).save(path)
    monkeypatch.undo()
    assert CostModel.load(path) == old  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["cost-fp32.json"]  # no temporary left behind


# ---- --json is pure JSON --------------------------------------------------------------------------


@pytest.mark.slow
@requires_default
def test_generate_json_is_pure_json_on_an_empty_cache(tmp_path):
    env = dict(os.environ, SPECKV_CACHE=str(tmp_path / "cache"))  # GGUF conversion and plan timing happen now
    r = subprocess.run(
        [sys.executable, "-m", "speckv_env.app.cli", "generate", "--json", "--max-new-tokens", "6", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)  # the whole of stdout
    assert 1 <= doc["new_tokens"] <= 6 and isinstance(doc["text"], str)
    assert "converting" in r.stderr  # the one-time messages went to stderr
