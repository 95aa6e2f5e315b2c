"""Pieces shared by the live and the replay environment (no torch here).

- :class:`DraftSignals`: the draft's distribution at the current position, summarised.
- :class:`StepOutcome`: what a backend reports after one speculation step.
- :class:`CostModel`: calibrated step times per (pair, compression, device), used for the
  cost-aware reward and for modelled tokens/s in live and in replay alike.
- :class:`ObservationBuilder`: turns signals and past outcomes into the observation vector;
  observation versions (:data:`OBS_SPECS`: version 1 = :data:`OBS_SPEC`, version 2 adds
  :data:`OBS_V2_FEATURES`, computed by :func:`pre_decision_features` for every env).
- reward functions, looked up by name in :data:`REWARDS`.
- :class:`Backend`: the protocol both backends (live models, recorded traces) implement.

The step-time model. With KV caches on both sides, one step at gamma g costs

    draft_forwards(g) * t_draft + t_verify[g] + t_overhead

where ``t_verify[g]`` is one target forward over g+1 tokens. ``draft_forwards(g)`` is
max(g, 1): the draft's distribution at the current position is computed before gamma is
chosen (it is part of the observation, and the draft must consume the last emitted tokens
anyway), so drafting g tokens needs g - 1 further forwards, and a plain target step (g = 0)
still pays the one observation forward. Under sampling, a fully accepted draft needs one more
draft forward to draw the bonus token with the same draft-then-accept rule (DESIGN.md).
Target-only decoding (no draft at all) costs ``t_target`` per token.

Token mode (``control="token"``) decides per drafted token, so after drafting a token the
draft also computes the next position's distribution (the next decision shows its signals):
a step that *chose* to stop after g >= 1 drafted tokens ran g + 1 draft forwards
(``lookahead``; a sampled bonus token then reuses that distribution), while a step stopped by
force (at gamma_max or the token budget) drafted its last token without looking further and
costs what the step mode's step costs. :meth:`CostModel.draft_forwards` holds the rule.
Token mode's *draft-then-decide* variant (``lookahead=False``) never looks past a drafted token
before deciding: continuing after token j feeds it to the draft then (one deferred forward), so
a chosen stop after g tokens ran the step mode's forwards (``lookahead=False`` here too).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

GAMMA_MAX = 8
"""The largest gamma by default: profiling records acceptance runs up to it, the envs offer 0..it."""
DEFAULT_GAMMAS: tuple[int, ...] = tuple(range(GAMMA_MAX + 1))
COMPRESSION_LEVELS: tuple[str, ...] = ("none", "int8", "nf4")

EMA_RATE = 0.2
"""Rate of the observation's acceptance EMA: ``ema += EMA_RATE * (event - ema)``."""
EMA_START = 0.5
"""The acceptance EMA at the start of an episode."""

ENTROPY_HIGH = 12.0  # nats; log(49152) = 10.8, log(128256) = 11.76
COST_RATIO_HIGH = 4.0

# name, low, high, description -- the observation vector, in order
OBS_SPEC: tuple[tuple[str, float, float, str], ...] = (
    ("draft_top1", 0.0, 1.0, "draft's top-1 probability at the current position"),
    ("draft_entropy", 0.0, ENTROPY_HIGH, "entropy (nats) of the draft's distribution at the current position"),
    ("draft_margin", 0.0, 1.0, "draft's top-1 minus top-2 probability at the current position"),
    (
        "accept_ema",
        0.0,
        1.0,
        f"exponential moving average (rate {EMA_RATE:g}) of past draft-token acceptance events, "
        f"starts at {EMA_START:g}",
    ),
    (
        "accept_mean",
        0.0,
        1.0,
        "mean of all past acceptance events in this episode, Laplace-smoothed: (hits+1)/(tests+2)",
    ),
    ("last_gamma", 0.0, 1.0, "previous step's gamma / max gamma (0 at the first step)"),
    ("last_accepted", 0.0, 1.0, "previous step's accepted count / max gamma"),
    ("last_full_accept", 0.0, 1.0, "1 if the previous step drafted and all its tokens were accepted"),
    ("position", 0.0, 1.0, "tokens emitted so far / max_new_tokens"),
    ("cost_ratio", 0.0, COST_RATIO_HIGH, "cost model: draft forward time / target-only step time"),
    ("compression_none", 0.0, 1.0, "1 if the target is uncompressed (fp32/bf16/fp16)"),
    ("compression_int8", 0.0, 1.0, "1 if the target is INT8 (bitsandbytes)"),
    ("compression_nf4", 0.0, 1.0, "1 if the target is NF4 (bitsandbytes)"),
)
OBS_NAMES: tuple[str, ...] = tuple(s[0] for s in OBS_SPEC)
OBS_LOW = np.array([s[1] for s in OBS_SPEC], dtype=np.float32)
OBS_HIGH = np.array([s[2] for s in OBS_SPEC], dtype=np.float32)
OBS_DIM = len(OBS_SPEC)
OBS_INDEX = {n: i for i, n in enumerate(OBS_NAMES)}

CONTROLS: tuple[str, ...] = ("step", "token")
"""Action modes: ``step`` = choose gamma before drafting (one env step per speculation step);
``token`` = decide per drafted token (one env step per decision: 1 = draft one more, 0 = verify)."""

# ---- observation versions ----------------------------------------------------------------------
LOOKUP_FEATURE_NGRAM = 8
"""The longest n-gram the observation's context lookup matches (the shipped draft's lookup
length, ``len(lookup_weights)``); the match length is observed divided by it. Fixed whatever the
draft: the feature describes the context, not the draft's own mixing."""
TARGET_TOP1_START = 0.0
TARGET_ENTROPY_START = 0.0
"""``target_top1`` and ``target_entropy`` before the first verification (nothing verified yet): 0
and 0, a pair no real distribution gives (entropy 0 means top-1 probability 1)."""

OBS_V2_FEATURES: tuple[tuple[str, float, float, str], ...] = (
    (
        "lookup_match",
        0.0,
        1.0,
        "context lookup at the current position (prompt + emitted tokens, speckv_env.ngram): the longest "
        f"suffix that occurred earlier, up to {LOOKUP_FEATURE_NGRAM} tokens, its length / {LOOKUP_FEATURE_NGRAM} "
        "(0 = no match)",
    ),
    (
        "lookup_agrees",
        0.0,
        1.0,
        "1 if the lookup's proposal (the token that followed the suffix's latest earlier occurrence) equals "
        "the draft's top-1 token at the current position (0 when nothing matches)",
    ),
    (
        "target_top1",
        0.0,
        1.0,
        "target's top-1 probability (T = 1) at the last verified position: the distribution the last emitted "
        f"token was verified or drawn from ({TARGET_TOP1_START:g} before the first verification)",
    ),
    (
        "target_entropy",
        0.0,
        ENTROPY_HIGH,
        "entropy (nats, T = 1) of the target's distribution at the last verified position "
        f"({TARGET_ENTROPY_START:g} before the first verification)",
    ),
    ("sampling", 0.0, 1.0, "1 if the episode samples (temperature > 0), 0 if it decodes greedily"),
)
"""The five features observation version 2 adds to version 1. All are known before the decision
they feed: the lookup reads the verified context, the target's signals come from the last
verification. Token mode shows those of the step's start for every decision of the step (the
drafted tokens are not verified; the lookup and the draft's top-1 are those of the step's first
position). An episode's last observation (after it ended) keeps its previous values, as the draft
signals do."""

TOKEN_FIELDS: tuple[tuple[str, float, float, str], ...] = (
    ("drafted", 0.0, 1.0, "token mode: tokens drafted so far in this step / max gamma"),
    (
        "survival",
        0.0,
        1.0,
        "token mode: product of the drafted tokens' own draft probabilities in this step (1 before drafting)",
    ),
    ("last_draft_p", 0.0, 1.0, "token mode: the last drafted token's own draft probability (1 before drafting)"),
)
"""Token mode's three fields, after the step observation of the version (always the last three)."""

OBS_VERSIONS: tuple[int, ...] = (1, 2)
OBS_VERSION = 2
"""The newest observation version. Version 1 = :data:`OBS_SPEC` (13 values); version 2 = version 1
+ :data:`OBS_V2_FEATURES` (18 values: needs the prompt's tokens and the target's signals, i.e. the
live env or ``speckv-trace/2`` traces)."""
DEFAULT_OBS_VERSION = 1
"""The environments' default ``obs_version``: version 1 is what every data source can supply
(``speckv-trace/1`` traces and step logs cannot supply version 2) and what agents saved before
versions existed observe, so the default observation is unchanged; version 2 is asked for."""
OBS_SPECS: dict[int, tuple[tuple[str, float, float, str], ...]] = {1: OBS_SPEC, 2: (*OBS_SPEC, *OBS_V2_FEATURES)}
"""The step observation of each version (token mode: + :data:`TOKEN_FIELDS`)."""

TOKEN_OBS_SPEC: tuple[tuple[str, float, float, str], ...] = (*OBS_SPEC, *TOKEN_FIELDS)
"""Token mode's observation (version 1; any version: :func:`obs_spec` with ``control="token"``):
the step mode's plus where the decision stands within the step. The draft signals
(``draft_top1``, ``draft_entropy``, ``draft_margin``) depend on the variant once j >= 1 tokens
are drafted: look-ahead (``lookahead=True``, default) shows the distribution the next token
(j + 1) would be drafted from; draft-then-decide (``lookahead=False``) the distribution token j
was drafted from (``last_draft_p`` is token j's own probability under it). At j = 0 both show
the step's observation (the distribution token 1 would be drafted from)."""
TOKEN_OBS_LOW = np.array([s[1] for s in TOKEN_OBS_SPEC], dtype=np.float32)
TOKEN_OBS_HIGH = np.array([s[2] for s in TOKEN_OBS_SPEC], dtype=np.float32)
TOKEN_OBS_DIM = len(TOKEN_OBS_SPEC)


def check_lookahead(lookahead: Any, control: str = "token") -> bool:
    """Validate token mode's variant flag: True = look-ahead, False = draft-then-decide
    (``lookahead=False`` needs ``control="token"``)."""
    if not isinstance(lookahead, (bool, np.bool_)):
        raise ValueError(f"lookahead must be True or False, got {lookahead!r}")
    if not lookahead and control != "token":
        raise ValueError("lookahead=False (draft-then-decide) applies to control='token' only")
    return bool(lookahead)


def token_variant(lookahead: bool) -> str:
    """Token mode's variant by name: ``"lookahead"`` or ``"dtd"`` (draft-then-decide)."""
    return "lookahead" if lookahead else "dtd"


def check_obs_version(version: Any) -> int:
    """Validate an observation version (:data:`OBS_VERSIONS`)."""
    if isinstance(version, bool) or version not in OBS_VERSIONS:
        raise ValueError(f"obs_version must be one of {OBS_VERSIONS}, got {version!r}")
    return int(version)


def obs_spec(version: int = DEFAULT_OBS_VERSION, control: str = "step") -> tuple[tuple[str, float, float, str], ...]:
    """The observation spec (name, low, high, description per value) of a version and action mode."""
    spec = OBS_SPECS[check_obs_version(version)]
    return (*spec, *TOKEN_FIELDS) if check_control(control) == "token" else spec


def obs_dim(version: int = DEFAULT_OBS_VERSION, control: str = "step") -> int:
    """Length of the observation of a version and action mode (13/18 step, 16/21 token)."""
    return len(obs_spec(version, control))


def obs_bounds(version: int = DEFAULT_OBS_VERSION, control: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """(low, high) float32 bounds of the observation of a version and action mode."""
    spec = obs_spec(version, control)
    return np.array([s[1] for s in spec], dtype=np.float32), np.array([s[2] for s in spec], dtype=np.float32)


def obs_version_of_dim(dim: int, control: str = "step") -> int | None:
    """The version whose observation has ``dim`` values in ``control`` mode (None: none has)."""
    return next((v for v in OBS_VERSIONS if obs_dim(v, control) == dim), None)


def check_same_obs_version(agent_version: int, other_version: int, agent: str, other: str) -> None:
    """Refuse to pair an agent with observations of another version (a clear ValueError)."""
    if int(agent_version) != int(other_version):
        raise ValueError(
            f"{agent} was trained on observation version {agent_version}, but {other} observes version "
            f"{other_version}: train it again on version {other_version} observations, or use obs_version="
            f"{agent_version} for the env"
        )


_V2_LOW = np.array([s[1] for s in OBS_V2_FEATURES], dtype=np.float32)
_V2_HIGH = np.array([s[2] for s in OBS_V2_FEATURES], dtype=np.float32)


def pre_decision_features(
    context: Sequence[int] | np.ndarray,
    positions: Sequence[int] | np.ndarray,
    draft_argmax: Sequence[int] | np.ndarray,
    target_top1: Sequence[float] | np.ndarray,
    target_entropy: Sequence[float] | np.ndarray,
    sampling: bool,
) -> np.ndarray:
    """Observation version 2's five features (:data:`OBS_V2_FEATURES`) at some decisions: the one
    definition the live env, the replay env and the vector env all use.

    ``context``: the token ids known (prompt + emitted tokens); ``positions[i]``: where decision i
    stands in it (the lookup predicts the token after ``context[:positions[i]]``);
    ``draft_argmax[i]``: the draft's top-1 token there; ``target_top1[i]``, ``target_entropy[i]``:
    the target's signals at the last verified position before it (NaN: nothing verified yet,
    observed as :data:`TARGET_TOP1_START` / :data:`TARGET_ENTROPY_START`); ``sampling``: whether the
    episode samples. Returns ``(len(positions), 5)`` float32, clipped to the spec's bounds.
    """
    from .ngram import lookup_one, lookup_table

    pos = np.asarray(positions, dtype=np.int64).reshape(-1)
    m = pos.shape[0]
    ctx = np.asarray(context, dtype=np.int64).reshape(-1)
    if m and (pos.min() < 0 or pos.max() > ctx.shape[0]):
        raise ValueError(f"positions must lie in 0..{ctx.shape[0]} (the context's length), got {pos.tolist()}")
    if m > 8:  # one pass over the context (pure python): for whole traces
        lo = int(pos.min())
        table_p, table_n = lookup_table(ctx[: int(pos.max())], lo, LOOKUP_FEATURE_NGRAM)
        props, ns = table_p[pos - lo], table_n[pos - lo]
    else:  # a vectorised search per position: for the live env's one decision
        found = [lookup_one(ctx[:p], LOOKUP_FEATURE_NGRAM) for p in pos.tolist()]
        props = np.array([f[0] for f in found], dtype=np.int64)
        ns = np.array([f[1] for f in found], dtype=np.int64)
    top1 = np.asarray(target_top1, dtype=np.float32).reshape(-1)
    ent = np.asarray(target_entropy, dtype=np.float32).reshape(-1)
    out = np.empty((m, len(OBS_V2_FEATURES)), dtype=np.float32)
    out[:, 0] = ns.astype(np.float32) / np.float32(LOOKUP_FEATURE_NGRAM)
    out[:, 1] = (ns > 0) & (props == np.asarray(draft_argmax, dtype=np.int64).reshape(-1))
    out[:, 2] = np.where(np.isnan(top1), np.float32(TARGET_TOP1_START), top1)
    out[:, 3] = np.where(np.isnan(ent), np.float32(TARGET_ENTROPY_START), ent)
    out[:, 4] = 1.0 if sampling else 0.0
    np.clip(out, _V2_LOW, _V2_HIGH, out=out)
    return out


def check_control(control: str) -> str:
    """Validate an action mode name (:data:`CONTROLS`)."""
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
    return control


EMA_KEEP = 1.0 - EMA_RATE
EMA_FILL: tuple[float, ...] = tuple(1.0 - EMA_KEEP**m for m in range(129))
"""``1 - EMA_KEEP ** m`` (exactly 0.0 for m = 0): the EMA after m accepted events is
``ema + (1 - ema) * EMA_FILL[m]``. Shared by the scalar and the vectorised update, so both
give bit-identical observations."""


def compression_level(compression: str) -> str:
    """Map fp32/bf16/fp16/int8/nf4 (or none/int8/nf4) to none/int8/nf4."""
    c = str(compression).lower()
    if c in ("fp32", "bf16", "fp16", "none", "float32", "float16", "bfloat16"):
        return "none"
    if c in ("int8", "nf4"):
        return c
    raise ValueError(f"unknown compression {compression!r}: expected one of fp32, bf16, fp16, int8, nf4")


@dataclass(frozen=True)
class DraftSignals:
    """Summary of the draft's next-token distribution at one position."""

    top1: float
    entropy: float
    margin: float


@dataclass
class StepOutcome:
    """Result of one speculation step, as reported by a backend.

    ``gamma`` is the gamma actually used (the requested one clipped so that the step never
    emits past max_new_tokens); ``events`` lists the draft-acceptance events this step revealed
    (1 accepted, 0 rejected), see :func:`acceptance_events`.
    """

    gamma: int
    accepted: int
    tokens: list[int]
    done: bool
    finish_reason: str | None = None  # "eos" | "length" | None
    events: list[int] = field(default_factory=list)  # acceptance events, see acceptance_events()
    draft_s: float | None = None  # measured, device synchronised (live only)
    verify_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def emitted(self) -> int:
        return len(self.tokens)


def acceptance_events(gamma: int, accepted: int, first_token_accepted: bool | None = None) -> list[int]:
    """Acceptance events revealed by a step: k ones, then a zero if the draft was rejected.

    For gamma = 0 no draft token is verified, but the draft's proposal at that position is
    known (it is in the observation) and can be compared with the emitted token:
    ``first_token_accepted`` carries that single event (None: no event).
    """
    if gamma == 0:
        return [] if first_token_accepted is None else [int(bool(first_token_accepted))]
    if accepted < gamma:
        return [1] * accepted + [0]
    return [1] * gamma


def fsync_dir(folder: Path) -> None:
    """fsync a folder, so that a rename into it survives a power cut (best effort where the OS
    cannot open folders). Every atomic writer of the project (cost models here, traces and step
    logs in :mod:`replay.trace`) ends with it."""
    import os

    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class CostModel:
    """Modelled step times (seconds) for one (pair, compression, device).

    ``t_verify[g]`` is a target forward over g + 1 tokens (g = 0 .. len-1); gammas beyond the
    measured range are extrapolated linearly from the last two points.
    """

    t_draft: float
    t_verify: list[float]
    t_target: float
    t_overhead: float = 0.0
    pair: str = ""
    compression: str = "fp32"
    device: str = "cpu"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.t_verify:
            raise ValueError("CostModel.t_verify must have at least one entry (gamma = 0)")
        vals = [self.t_draft, self.t_target, self.t_overhead, *self.t_verify]
        if any((not math.isfinite(v)) or v < 0 for v in vals):
            raise ValueError(f"CostModel times must be finite and non-negative, got {vals}")
        if self.t_target <= 0:
            raise ValueError("CostModel.t_target must be positive")

    def verify_time(self, gamma: int) -> float:
        tv = self.t_verify
        if gamma < len(tv):
            return tv[gamma]
        if len(tv) == 1:
            return tv[0]
        slope = max(tv[-1] - tv[-2], 0.0)
        return tv[-1] + slope * (gamma - len(tv) + 1)

    @staticmethod
    def draft_forwards(gamma: int, accepted: int, sampling: bool, lookahead: bool = False) -> int:
        """Draft forwards of a step that drafted ``gamma`` tokens and accepted ``accepted``,
        the observation's forward included. ``lookahead``: the draft also computed the
        distribution after its last drafted token (token mode, a chosen stop; module docstring)."""
        if lookahead and gamma > 0:
            return gamma + 1
        n = max(gamma, 1)
        if sampling and gamma > 0 and accepted >= gamma:
            n += 1
        return n

    def step_time(self, gamma: int, accepted: int, sampling: bool = False, lookahead: bool = False) -> float:
        forwards = self.draft_forwards(gamma, accepted, sampling, lookahead)
        return forwards * self.t_draft + self.verify_time(gamma) + self.t_overhead

    def verify_charge(self, gamma: int, accepted: int, sampling: bool = False, lookahead: bool = False) -> float:
        """Token mode: the part of :meth:`step_time` charged when the step verifies. Each
        drafted token that was looked past (``gamma`` of them with ``lookahead``, else
        ``gamma - 1``) was charged one ``t_draft`` at its own decision, so the two parts add up
        to :meth:`step_time` exactly."""
        charged = gamma if lookahead else max(gamma - 1, 0)
        forwards = self.draft_forwards(gamma, accepted, sampling, lookahead) - charged
        return forwards * self.t_draft + self.verify_time(gamma) + self.t_overhead

    def step_time_table(self, gammas: Sequence[int], sampling: bool = False) -> np.ndarray:
        """``table[i, k]`` = step time at gamma ``gammas[i]`` with k accepted (k <= gamma)."""
        gmax = max(gammas)
        out = np.full((len(gammas), gmax + 1), np.nan)
        for i, g in enumerate(gammas):
            for k in range(g + 1):
                out[i, k] = self.step_time(g, k, sampling)
        return out

    @property
    def cost_ratio(self) -> float:
        return self.t_draft / self.t_target

    @property
    def target_only_tps(self) -> float:
        return 1.0 / self.t_target

    def expected_tokens_per_second(self, alpha: float, gamma: int, sampling: bool = False) -> float:
        """Leviathan et al.: E[tokens] = (1 - a^(g+1)) / (1 - a) per step, over the expected step time."""
        a = min(max(alpha, 0.0), 1.0 - 1e-9)
        exp_tokens = (1 - a ** (gamma + 1)) / (1 - a)
        p_full = a**gamma if gamma > 0 else 0.0
        t = (1 - p_full) * self.step_time(gamma, 0, sampling) + p_full * self.step_time(gamma, gamma, sampling)
        return exp_tokens / t

    # ---- persistence -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schema"] = "speckv-cost/1"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "cost model") -> CostModel:
        if not isinstance(d, dict):
            raise ValueError(f"{where}: malformed cost model (a JSON object expected, got {type(d).__name__})")
        if d.get("schema", "speckv-cost/1") != "speckv-cost/1":
            raise ValueError(f"{where}: unsupported cost model schema {d.get('schema')!r} (expected speckv-cost/1)")
        try:
            return cls(
                t_draft=float(d["t_draft"]),
                t_verify=[float(x) for x in d["t_verify"]],
                t_target=float(d["t_target"]),
                t_overhead=float(d.get("t_overhead", 0.0)),
                pair=str(d.get("pair", "")),
                compression=str(d.get("compression", "fp32")),
                device=str(d.get("device", "cpu")),
                meta=dict(d.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: malformed cost model ({type(e).__name__}: {e})") from e

    def save(self, path: str | Path) -> None:
        """Write ``path`` atomically: a temporary file beside it, flushed and fsynced, then
        renamed over it, so a crash leaves the old file (or none), never a partial one."""
        import os

        p = Path(path)
        data = json.dumps(self.to_dict(), indent=2)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, p)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(p.parent)  # make the rename itself durable

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        """Read a cost model saved by :meth:`save`. A missing file raises FileNotFoundError, and
        anything else wrong (not a file, not UTF-8 JSON, not a cost model) ValueError, each
        naming the file."""
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"cost model file {p} does not exist") from None
        except IsADirectoryError:
            raise ValueError(f"{p}: is a folder, not a cost model file") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: not a cost model file (not UTF-8 text: {e})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from e
        return cls.from_dict(d, where=str(p))

    @classmethod
    def unit(cls, gamma_max: int = GAMMA_MAX, draft_ratio: float = 0.1, verify_slope: float = 0.05) -> CostModel:
        """A synthetic cost model (target step = 1 time unit), for tests and examples."""
        return cls(
            t_draft=draft_ratio,
            t_verify=[1.0 + verify_slope * g for g in range(gamma_max + 1)],
            t_target=1.0,
            pair="synthetic",
            meta={"synthetic": True},
        )


class ObservationBuilder:
    """Builds the observation vector (see :data:`OBS_SPEC`) from pre-choice information only.

    The acceptance EMA is updated per run of events: ``m`` accepted events move it to
    ``ema + (1 - ema) * (1 - EMA_KEEP**m)`` and a rejection to ``ema * EMA_KEEP`` (the same recursion
    as ``ema += EMA_RATE * (e - ema)`` event by event, grouped so that the vectorised replay can
    reproduce it bit for bit with the table :data:`EMA_FILL`).
    """

    EMA_RATE = EMA_RATE

    def __init__(self, gamma_max: int, max_new_tokens: int, compression: str, cost_ratio: float) -> None:
        self.gamma_max = max(int(gamma_max), 1)
        self.max_new_tokens = max(int(max_new_tokens), 1)
        level = compression_level(compression)
        self._static = np.zeros(4, dtype=np.float32)
        self._static[0] = min(max(cost_ratio, 0.0), COST_RATIO_HIGH)
        self._static[1 + COMPRESSION_LEVELS.index(level)] = 1.0
        self._static_t = tuple(float(x) for x in self._static)
        self.reset()

    def reset(self) -> None:
        self.ema = EMA_START
        self.hits = 0
        self.tests = 0
        self.last_gamma = 0
        self.last_accepted = 0
        self.last_full = 0.0

    def update_run(self, gamma: int, accepted: int, ones: int, rejected: bool) -> None:
        """Record a step whose events are ``ones`` accepted events then, if ``rejected``, one
        rejection (the shape :func:`acceptance_events` always has)."""
        if ones:
            fill = EMA_FILL[ones] if ones < len(EMA_FILL) else 1.0 - EMA_KEEP**ones
            self.ema = self.ema + (1.0 - self.ema) * fill
        if rejected:
            self.ema = self.ema * EMA_KEEP
        self.hits += ones
        self.tests += ones + (1 if rejected else 0)
        self.last_gamma = gamma
        self.last_accepted = accepted
        self.last_full = 1.0 if (gamma > 0 and accepted >= gamma) else 0.0

    def update(self, gamma: int, accepted: int, events: Sequence[int]) -> None:
        ones = 0
        for e in events:
            if e:
                ones += 1
            else:
                self.update_run(gamma, accepted, ones, True)
                ones = 0
        if ones or not events:  # (events ending in a rejection were recorded in the loop)
            self.update_run(gamma, accepted, ones, False)

    def observe_values(
        self, top1: float, entropy: float, margin: float, position: int, features: np.ndarray | None = None
    ) -> np.ndarray:
        """The observation from the draft's signals at ``position`` (python floats, fast path);
        version 2: ``features`` is the row of :func:`pre_decision_features` appended to it."""
        gm = self.gamma_max
        lg = self.last_gamma / gm
        la = self.last_accepted / gm
        pos = position / self.max_new_tokens
        obs = np.array(
            (
                top1,
                entropy,
                margin,
                self.ema,
                (self.hits + 1) / (self.tests + 2),
                lg if lg < 1.0 else 1.0,
                la if la < 1.0 else 1.0,
                self.last_full,
                pos if pos < 1.0 else 1.0,
                *self._static_t,
            ),
            dtype=np.float32,
        )
        # signals come from outside (a model or a file): clip them like the rest of the vector
        if not (0.0 <= top1 <= 1.0 and 0.0 <= entropy <= ENTROPY_HIGH and 0.0 <= margin <= 1.0):
            np.clip(obs, OBS_LOW, OBS_HIGH, out=obs)
        if features is not None:
            return np.concatenate((obs, features))
        return obs

    def observe(self, signals: DraftSignals, position: int, features: np.ndarray | None = None) -> np.ndarray:
        return self.observe_values(signals.top1, signals.entropy, signals.margin, position, features)


# ---- rewards -------------------------------------------------------------------------

RewardFn = Callable[[StepOutcome, float, CostModel], float]


def reward_cost(outcome: StepOutcome, step_time: float, cost: CostModel) -> float:
    """Target-only token times saved: emitted tokens - modelled step time / t_target.

    An episode's token count does not depend on the gammas chosen (DESIGN.md), so the return
    N - T / t_target is higher exactly when the total modelled time T is lower, i.e. when
    end-to-end tokens/s is higher. Zero return = as fast as target-only decoding.
    """
    return outcome.emitted - step_time / cost.t_target


def reward_tokens(outcome: StepOutcome, step_time: float, cost: CostModel) -> float:
    """The SpecKV paper's reward: tokens emitted in the step (the largest gamma always wins)."""
    return float(outcome.emitted)


def reward_time(outcome: StepOutcome, step_time: float, cost: CostModel) -> float:
    """Negative modelled step time in target-only step units (same ranking as ``cost``)."""
    return -step_time / cost.t_target


REWARDS: dict[str, RewardFn] = {"cost": reward_cost, "tokens": reward_tokens, "time": reward_time}


def get_reward(name: str) -> RewardFn:
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}: choose one of {', '.join(REWARDS)}") from None


def step_tables(cost: CostModel, sampling: bool, gamma_max: int, reward_fn: RewardFn) -> tuple[np.ndarray, np.ndarray]:
    """Modelled step time and reward of every step outcome, as two ``(gamma_max + 1,
    gamma_max + 1)`` float64 tables indexed ``[g_eff, k]`` (k <= g_eff; zeros above the diagonal).

    A replayed step's time and reward depend only on (g_eff, k), the cost model and whether the
    episode samples, so the replay environments look them up here instead of recomputing them."""
    g1 = gamma_max + 1
    times = np.zeros((g1, g1))
    rewards = np.zeros((g1, g1))
    for g in range(g1):
        for k in range(g + 1):
            t = cost.step_time(g, k, sampling)
            times[g, k] = t
            rewards[g, k] = float(reward_fn(StepOutcome(g, k, [0] * (k + 1), False), t, cost))
    return times, rewards


def episode_summary(stats: dict[str, Any], cost: CostModel, finish_reason: str | None) -> dict[str, Any]:
    """``info["episode_summary"]`` at an episode's last step, from the running ``stats`` (steps,
    tokens, modelled_s, measured_s) the environments keep."""
    tokens, modelled, measured = stats["tokens"], stats["modelled_s"], stats.get("measured_s", 0.0)
    return {
        "tokens": tokens,
        "steps": stats["steps"],
        "modelled_s": modelled,
        "modelled_tps": tokens / modelled if modelled > 0 else float("nan"),
        "measured_s": measured if measured > 0 else None,
        "measured_tps": tokens / measured if measured > 0 else None,
        "target_only_tps": cost.target_only_tps,
        "finish_reason": finish_reason,
    }


@dataclass
class EpisodeInfo:
    """Identity of the episode a backend has been reset to."""

    prompt_id: str
    task: str
    compression: str
    mode: str  # "greedy" | "sample"
    max_new_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """What an environment needs from a source of speculation steps (models or a log)."""

    gamma_max: int
    max_new_tokens: int
    compression: str
    sampling: bool
    cost_model: CostModel

    def num_episodes(self) -> int: ...

    def reset(self, index: int, seed: int | None) -> EpisodeInfo: ...

    def signals(self) -> DraftSignals: ...

    def position(self) -> int: ...

    def step(self, gamma: int) -> StepOutcome: ...

    def close(self) -> None: ...
