"""A lossless speculative decoding engine with a per-step gamma chosen by the caller.

Both models keep a KV cache; on rejection the caches are cropped, never recomputed.

Bookkeeping (batch size 1). Let y be the emitted tokens so far and t = len(y).
- The target cache holds prompt + y minus the last token; that token (``_t_pending``) is fed
  first at the next verification, so a verification input is [y[-1], d_1 .. d_g] and its g+1
  output rows are the target's distributions p_t .. p_{t+g}.
- The draft cache holds whatever the draft has consumed; ``_d_pending`` are emitted tokens it
  has not seen. :meth:`observe` feeds them in one forward and yields q_t, the draft's
  distribution at the current position: this is computed *before* gamma is chosen (it is
  the observation) and it is the first draft token's distribution, so drafting g tokens
  takes g - 1 further forwards.

Verification (Leviathan et al. 2023; Chen et al. 2023):
- greedy: d_i = argmax q, accepted while d_i == argmax p; then the target's argmax at the
  first mismatch (or the bonus position) is emitted. Output = the target's greedy output.
- sampling: with target p and draft q after temperature/top-p, d_i ~ q, accepted with
  probability min(1, p(d_i)/q(d_i)); on rejection the token is drawn from the residual
  norm((p - q)+). The uniforms are keyed by output position (one row of a table drawn from
  the episode seed), and the token at the bonus position (all g accepted, and every token
  when g = 0) is drawn with the same draft-then-accept rule. Every emitted token y_s is
  then a fixed function of (p_s, q_s, u_s), so the emitted sequence does not depend on the
  gammas chosen, and each token is an exact sample from the target's p_s.

Token by token (token mode): :meth:`draft_token` drafts one more token of the current step by
the same rule (and, with ``lookahead``, feeds it to the draft so that :meth:`observe` shows the
next position's distribution; without it, the next :meth:`draft_token` feeds it first);
:meth:`verify` verifies what is drafted. ``step(g)`` is these
phases in a row, so a step drafted token by token emits exactly what ``step(g)`` emits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .core import DraftSignals


@dataclass
class StepResult:
    """One speculation step.

    ``gamma`` is the number of tokens drafted (the request, clipped so that the step cannot
    emit past max_new_tokens); ``accepted`` the number of drafted tokens accepted;
    ``tokens`` the emitted ids (accepted drafts, then the target's own token, unless an
    accepted draft was EOS); ``draft_signals`` the signals of every drafted token, in order
    (the first is the pre-choice observation's; for gamma = 0, the observation's only),
    computed on first access from the draft's logits so that decoding pays nothing for them
    when nobody looks; ``events`` the acceptance events (:func:`speckv_env.core.acceptance_events`).
    """

    gamma: int
    accepted: int
    tokens: list[int]
    draft_s: float
    verify_s: float
    done: bool
    finish_reason: str | None
    events: list[int]
    draft_forwards: int
    lookahead: bool = False
    draft_rows: list = field(default_factory=list, repr=False)
    _sigs: list | None = field(default=None, repr=False)

    @property
    def draft_signals(self) -> list[DraftSignals]:
        if self._sigs is None:
            self._sigs = [_signals_from_logits(r) for r in self.draft_rows]
            self.draft_rows = []
        return self._sigs


@dataclass
class _Drafted:
    """What a step has drafted so far: tokens, the draft distributions they were sampled from
    (sampling), the draft logits of every drafted position (``sigs[i]``: the row token i was
    drafted from; one more row once the draft has looked past its last token), the draft
    forwards run, and where the step started (output position, draft cache length), with the
    timed spans (:class:`_Clock`) of its observation and drafting."""

    t: int
    d_len0: int
    obs_spans: list[tuple[Any, Any]]
    tokens: list[int] = field(default_factory=list)
    q_rows: list[torch.Tensor] = field(default_factory=list)
    sigs: list[torch.Tensor] = field(default_factory=list)
    forwards: int = 1  # the observation forward
    draft_spans: list[tuple[Any, Any]] = field(default_factory=list)

    @property
    def consumed(self) -> int:
        """Drafted tokens the draft has been fed (its cache holds the prefix plus these)."""
        return self.forwards - 1

    @property
    def lookahead(self) -> bool:
        """The draft computed the distribution after its last drafted token (token mode)."""
        return len(self.sigs) > len(self.tokens) > 0


@dataclass
class _Verdict:
    """The outcome of a verification: accepted drafts, emitted tokens, acceptance events, the
    bonus position's record, and the draft's timed spans inside the verification phase."""

    accepted: int
    emitted: list[int]
    events: list[int]
    bonus_rec: tuple[int, torch.Tensor, bool] | None = None
    extra_spans: list[tuple[Any, Any]] = field(default_factory=list)


@dataclass
class GenerationResult:
    tokens: list[int]
    steps: list[StepResult]
    finish_reason: str | None
    wall_s: float

    @property
    def accept_histogram(self) -> dict[int, int]:
        h: dict[int, int] = {}
        for s in self.steps:
            h[s.accepted] = h.get(s.accepted, 0) + 1
        return dict(sorted(h.items()))

    @property
    def acceptance_rate(self) -> float:
        drafted = sum(s.gamma for s in self.steps)
        return sum(s.accepted for s in self.steps) / drafted if drafted else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.wall_s if self.wall_s > 0 else float("nan")


class _Clock:
    """Phase timing. On CPU, ``perf_counter`` readings. On CUDA, events recorded on the current
    stream: marking a phase costs no synchronisation; :meth:`wait` synchronises once (at the end
    of a step) and :meth:`seconds` then reads the spans (without the wait, reading an unfinished
    event raises)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def wait(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, spans: Sequence[tuple[Any, Any]]) -> float:
        """Total seconds of (start, end) mark pairs (on CUDA, after :meth:`wait`)."""
        total = 0.0
        for a, b in spans:
            total += (a.elapsed_time(b) / 1000.0) if self.cuda else (b - a)
        return total

    def elapsed(self, start: Any) -> float:
        """Seconds from ``start`` to now (synchronises on CUDA)."""
        end = self.mark()
        self.wait()
        return self.seconds([(start, end)])


def _signals_from_logits(logits: torch.Tensor) -> DraftSignals:
    """Top-1 probability, entropy (nats) and top-1/top-2 margin of softmax(logits) (T = 1).

    One pass each for top-2, exp, and two sums: with z = logits - max, S = sum(exp z),
    p_i = exp(z_i) / S and H = log S - sum(exp(z) * z) / S.
    """
    lf = logits.float()
    top = torch.topk(lf, 2).values
    z = lf - top[0]
    e = torch.exp(z)
    S = e.sum()
    ent = torch.log(S) - torch.dot(e, z) / S
    t1, t2, h = torch.stack([1.0 / S, torch.exp(top[1] - top[0]) / S, ent]).tolist()  # one transfer
    return DraftSignals(t1, max(h, 0.0), t1 - t2)


def _token_prob(logits: torch.Tensor, token: int) -> float:
    """softmax(logits)[token] (T = 1), computed as :func:`_signals_from_logits` computes the
    top-1 probability, so the top-1 token's probability equals its ``top1`` exactly."""
    lf = logits.float()
    m = lf.max()
    return float(torch.exp(lf[token] - m) / torch.exp(lf - m).sum())


def _accepts(model, name: str) -> bool:
    """Whether ``model.forward`` (or a class it inherits it from) takes the keyword ``name``."""
    import inspect

    for cls in type(model).__mro__:
        fwd = cls.__dict__.get("forward")
        if fwd is not None and name in inspect.signature(fwd).parameters:
            return True
    return False


def cache_kwarg(model) -> str:
    """Name of the KV-cache argument of ``model.forward``: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    import inspect

    for cls in type(model).__mro__:  # subclasses may wrap forward(*args, **kwargs)
        fwd = cls.__dict__.get("forward")
        if fwd is None:
            continue
        params = inspect.signature(fwd).parameters
        if "cache" in params:
            return "cache"
        if "past_key_values" in params:
            return "past_key_values"
    return "past_key_values"


def _rollback_cache(cache):
    """Let sliding-window layers of a cache be cropped after a rejection (transformers keeps
    only the window otherwise, and refuses to roll back once the window is full)."""
    for layer in getattr(cache, "layers", ()):
        if hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()
    return cache


def _crop(cache, new_len: int) -> None:
    cur = cache.get_seq_length()
    if cur > new_len:
        cache.crop(new_len - cur)  # negative = remove that many from the end (transformers 4.x and 5.x)


def _sample_from(probs: torch.Tensor, u: float, fallback: torch.Tensor | None = None) -> int:
    """Inverse-CDF sample of a categorical distribution with one uniform in [0, 1).

    The cumulative sum is taken in float64 (a float32 sum over a 49k-token vocabulary loses the
    small tail's mass). An all-zero ``probs`` (a residual norm((p - q)+) when p and q agree to
    the last bit, which exact arithmetic never rejects) samples ``fallback`` (the target's p).
    One device-to-host transfer (the index, whether the total is positive, whether the index's
    probability is); the rare cases (zero total, a zero-probability index) read more."""
    c = torch.cumsum(probs.double(), dim=-1)
    total = c[-1:]
    # searchsorted(c, u * total, right) clipped to the last index: u * total is the float64
    # product of the uniform and the total, as it always was
    i = torch.searchsorted(c, total * u, right=True).clamp_(max=probs.shape[-1] - 1)
    i_host, positive, zero_at_i = torch.cat([i, (~(total <= 0.0)).long(), (probs[i] <= 0.0).long()]).tolist()
    if not positive:
        if fallback is None:
            raise ValueError("cannot sample from an all-zero distribution")
        return _sample_from(fallback, u)
    # guard against rounding at the top end and zero-probability tokens
    while zero_at_i and i_host > 0:
        i_host -= 1
        zero_at_i = float(probs[i_host]) <= 0.0
    return i_host


class SpeculativeEngine:
    """Speculative decoding of one sequence at a time; the caller picks gamma each step.

    Parameters
    ----------
    target, draft:
        Hugging Face causal LMs sharing a tokenizer (checked by :func:`speckv_env.pair.load_pair`).
    temperature:
        0 means greedy (lossless w.r.t. the target's greedy output); > 0 means exact
        speculative sampling from softmax(logits / temperature), top-p filtered.
    top_p:
        Nucleus filter applied to both target and draft distributions (exact: the target's
        filtered distribution is what gets sampled).
    eos_token_id:
        int or list of ints that end generation (the EOS token is emitted, nothing after it).
    cache:
        ``"dynamic"`` (transformers' DynamicCache, cropped on rejection) or ``"static"``: buffers
        pre-allocated for prompt + max_new_tokens + max_gamma + 1 positions, rollback moves the
        position, explicit position ids (:mod:`speckv_env.static_cache`); the same tokens.
    """

    def __init__(
        self,
        target,
        draft,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        device: torch.device | str | None = None,
        max_gamma: int = 64,
        cache: str = "dynamic",
    ) -> None:
        if cache not in ("dynamic", "static"):
            raise ValueError(f"cache must be 'dynamic' or 'static', got {cache!r}")
        if temperature < 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.target = target
        self.draft = draft
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.sampling = self.temperature > 0
        if eos_token_id is None:  # an EOS id of 0 is a real id: test for None, not truthiness
            eos_token_id = getattr(target.generation_config, "eos_token_id", None)
            if eos_token_id is None:
                eos_token_id = getattr(target.config, "eos_token_id", None)
        if eos_token_id is None:
            self.eos: frozenset[int] = frozenset()
        elif isinstance(eos_token_id, int):
            self.eos = frozenset([eos_token_id])
        else:
            self.eos = frozenset(int(e) for e in eos_token_id)
        self.device = torch.device(device) if device is not None else next(target.parameters()).device
        self.draft_device = next(draft.parameters()).device
        self.max_gamma = max_gamma
        self._cuda = self.device.type == "cuda" or self.draft_device.type == "cuda"
        self._clock = _Clock(self._cuda)
        #: sampling: decide every drafted position at once, one device-to-host transfer (CUDA);
        #: off on CPU, where it would compute rows past the first rejection (:meth:`_target_rows`)
        self.batch_accept = self._cuda
        self._t_kv = cache_kwarg(target)
        self._d_kv = cache_kwarg(draft)
        self._t_keep1 = {"logits_to_keep": 1} if _accepts(target, "logits_to_keep") else {}
        self.cache = cache
        if cache == "static":
            from .static_cache import uses_full_attention_only

            for name, m in (("target", target), ("draft", draft)):
                if not uses_full_attention_only(m.config):
                    raise ValueError(
                        f"cache='static' supports full-attention models only; the {name} has "
                        "sliding-window or chunked layers: use cache='dynamic'"
                    )
        self._static: dict[str, Any] = {}  # the static caches, kept across sequences while they fit
        #: keep the draft's full-vocabulary logits of every position (traces need their signals);
        #: off, only the acceptance flags are kept (``speckv profile`` turns it on)
        self.record_signals = False
        from .invariant import is_row_invariant

        #: both models compute row-invariant forwards, so the output does not depend on gamma
        #: (:mod:`speckv_env.invariant`); False means it may, at near-ties
        self.exact = is_row_invariant(target) and is_row_invariant(draft)
        self._reset_state()

    def _reset_state(self) -> None:
        """Episode state; :meth:`start` fills it for a new sequence."""
        self._started = False
        self.prompt: list[int] = []
        self.max_new_tokens = 0
        self.seed = 0
        self.out: list[int] = []
        self._t_cache: Any = None
        self._d_cache: Any = None
        self._t_pending = 0
        self._d_pending: list[int] = []
        self.prefill_s = 0.0
        self._u = np.zeros((1, 3))
        self._q: torch.Tensor | None = None  # draft logits at the current position
        self._dr: _Drafted | None = None  # the step being drafted (token mode), None between steps
        self._sig: DraftSignals | None = None
        self._obs_spans: list[tuple[Any, Any]] = []  # the current observation's timed spans
        self._late_pos: int | None = None
        self.pos_accept: list[bool | None] = []
        self._pos_rows: list[Any] = []
        #: recording only: the target's signals at each emitted position (its distribution there)
        self.pos_target: list[DraftSignals | None] = []
        #: the target's logits at the last verified position (the last emitted token's row), kept
        #: by every verification; :meth:`target_signals` summarises it on demand
        self._tgt_row: torch.Tensor | None = None
        self._tgt_sig: DraftSignals | None = None
        self.finish_reason: str | None = None

    # ---- distributions ----------------------------------------------------------------
    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(logits / T), top-p filtered and renormalised (float32, 1-D)."""
        return self._probs_rows(logits.unsqueeze(0))[0]

    def _probs_rows(self, logits: torch.Tensor) -> torch.Tensor:
        """:meth:`_probs` of every row of ``logits`` ([n, V] -> [n, V] float32). A row's result
        does not depend on n: softmax, sort and cumsum work row by row, and the renormalising
        sums are taken one row at a time (a 2-D sum along rows adds in another order than a
        1-D sum on a multi-threaded CPU)."""
        p = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sp, idx = torch.sort(p, dim=-1, descending=True)
            cum = torch.cumsum(sp, dim=-1)
            keep = (cum - sp) < self.top_p  # smallest prefix whose mass reaches top_p
            sp = torch.where(keep, sp, torch.zeros_like(sp))
            p = torch.zeros_like(p).scatter_(-1, idx, sp)
            p = p / torch.stack([row.sum() for row in p]).unsqueeze(-1)
        return p

    # ---- episode ----------------------------------------------------------------------
    @torch.inference_mode()
    def start(self, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int, seed: int = 0) -> None:
        """Prefill both caches with the prompt and prepare for the first step."""
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1).tolist()
        if len(ids) < 1:
            raise ValueError("the prompt must contain at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self._reset_state()
        self.prompt = ids
        self.max_new_tokens = int(max_new_tokens)
        self.seed = int(seed)
        capacity = len(ids) + self.max_new_tokens + self.max_gamma + 1
        self._t_cache = self._new_cache(self.target, "target", capacity)
        self._d_cache = self._new_cache(self.draft, "draft", capacity)
        t0 = self._clock.mark()
        if len(ids) > 1:  # the prompt's logits are not needed: keep one row (not 49k x prompt length)
            self.target(
                input_ids=torch.tensor([ids[:-1]], device=self.device),
                use_cache=True,
                **{self._t_kv: self._t_cache},
                **self._positions(self._t_cache, len(ids) - 1, self.device),
                **self._t_keep1,
            )
        self._t_pending = ids[-1]
        self._d_pending = list(ids)
        self._started = True
        self._ensure_q()  # the draft's prefill: q at position 0, not charged to the first step
        self._obs_spans = []
        self.prefill_s = self._clock.elapsed(t0)
        # position-keyed uniforms: row s = (draft proposal, accept test, residual) for output position s
        self._u = np.random.default_rng(self.seed).random((self.max_new_tokens + 1, 3))

    def _new_cache(self, model, key: str, capacity: int) -> Any:
        """An empty KV cache for ``model``: a new DynamicCache, or the model's static cache
        (reused while its buffers hold ``capacity`` positions)."""
        if self.cache == "dynamic":
            from transformers import DynamicCache

            return _rollback_cache(DynamicCache(config=model.config))
        from .static_cache import PrefixStaticCache

        c = self._static.get(key)
        if c is None or not c.restart(capacity):
            c = self._static[key] = PrefixStaticCache(model.config, capacity)
        return c

    def _positions(self, cache, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Explicit position ids of ``n`` new tokens for a static cache (the host knows its
        length); with a dynamic cache the model counts them itself, as it always did."""
        if self.cache == "dynamic":
            return {}
        p = cache.get_seq_length()
        return {"position_ids": torch.arange(p, p + n, device=device).unsqueeze(0)}

    @property
    def position(self) -> int:
        return len(self.out)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _ensure_q(self) -> None:
        """Run the draft's catch-up forward: its logits at the current position (once per step)."""
        if self._q is None:
            t0 = self._clock.mark()
            pend = self._d_pending
            if self._late_pos is not None and len(pend) >= 2:
                # greedy, after a fully accepted draft: pending = [d_g, bonus]; the row for d_g
                # is the draft's distribution at the bonus position (recorded for traces)
                logits = self._draft_forward(pend, keep=2)
                self._record(self._late_pos, logits[0], int(torch.argmax(logits[0])) == self.out[self._late_pos])
                self._q = logits[1]
            else:
                self._q = self._draft_forward(pend)[-1]
            self._late_pos = None
            self._d_pending = []
            self._sig = None
            self._obs_spans = [(t0, self._clock.mark())]

    @torch.inference_mode()
    def observe(self) -> DraftSignals:
        """The draft's signals at the current position (runs the draft's catch-up forward once).
        In the middle of a step drafted token by token, the signals of the distribution the next
        token would be drafted from (the last looked-ahead row)."""
        if not self._started:
            raise RuntimeError("call start() before observe()")
        if self.done:
            raise RuntimeError("generation has finished: nothing to observe")
        dr = self._dr
        if dr is not None and dr.tokens:
            if len(dr.sigs) <= len(dr.tokens):
                raise RuntimeError(
                    "the last token was drafted without lookahead: see drafted_signals(), or draft_token() feeds it"
                )
            return _signals_from_logits(dr.sigs[len(dr.tokens)])
        self._ensure_q()
        if self._sig is None:
            assert self._q is not None
            t0 = self._clock.mark()
            self._sig = _signals_from_logits(self._q)
            self._obs_spans.append((t0, self._clock.mark()))
        return self._sig

    @torch.inference_mode()
    def target_signals(self) -> DraftSignals | None:
        """The target's signals (T = 1) at the last verified position: the distribution the last
        emitted token was verified or drawn from, summarised by :func:`_signals_from_logits` from
        the verification's own logits row (as recording stores them, ``pos_target``). Computed
        on first access after each verification (one reduction over the vocabulary); None
        before the first verification."""
        if self._tgt_sig is None and self._tgt_row is not None:
            self._tgt_sig = _signals_from_logits(self._tgt_row)
        return self._tgt_sig

    @torch.inference_mode()
    def draft_top1_token(self) -> int:
        """The draft's top-1 token at the current step's first position (argmax of the
        distribution :meth:`observe` summarises there; runs the draft's catch-up forward once).
        In the middle of a step drafted token by token: still the step's first position."""
        if not self._started or self.done:
            raise RuntimeError("draft_top1_token() needs a started, unfinished sequence")
        self._ensure_q()
        assert self._q is not None
        return int(torch.argmax(self._q))

    def context(self) -> list[int]:
        """The verified context: the prompt's token ids and the tokens emitted so far."""
        return self.prompt + self.out

    @property
    def pos_signals(self) -> list[DraftSignals | None]:
        """Per-position draft signals of this sequence (computed on first access; None everywhere
        unless ``record_signals`` was on while decoding)."""
        return [r if (r is None or isinstance(r, DraftSignals)) else _signals_from_logits(r) for r in self._pos_rows]

    @property
    def pos_argmax(self) -> list[int | None]:
        """Per-position argmax token of the draft (None unless ``record_signals`` was on)."""
        return [None if (r is None or isinstance(r, DraftSignals)) else int(torch.argmax(r)) for r in self._pos_rows]

    def _record_target(self, t: int, logits: torch.Tensor, n: int) -> None:
        """Recording: the target's signals at the ``n`` positions a verification emitted."""
        if not self.record_signals:
            return
        while len(self.pos_target) < t + n:
            self.pos_target.append(None)
        for i in range(n):
            self.pos_target[t + i] = _signals_from_logits(logits[i])

    def _record(self, pos: int, row: torch.Tensor, accepted: bool) -> None:
        """Per-position record for full-information traces (see replay/SCHEMA.md): whether the
        draft's proposal at ``pos`` is accepted, and its logits there (signals computed lazily)."""
        while len(self.pos_accept) <= pos:
            self.pos_accept.append(None)
            self._pos_rows.append(None)
        self.pos_accept[pos] = bool(accepted)
        self._pos_rows[pos] = row if self.record_signals else None

    @torch.inference_mode()
    def finalize_record(self) -> None:
        """Fill the last position's draft record if the run ended on a greedy bonus token.

        Costs one extra draft forward, outside any measured step; only traces need it.
        """
        if self._late_pos is not None and len(self._d_pending) >= 2:
            logits = self._draft_forward(self._d_pending[:1], keep=1)
            self._d_pending = self._d_pending[1:]
            self._record(self._late_pos, logits[-1], int(torch.argmax(logits[-1])) == self.out[self._late_pos])
            self._late_pos = None

    def _draft_forward(self, tokens: list[int], keep: int = 1) -> torch.Tensor:
        """Feed ``tokens`` to the draft; return its last ``keep`` logit rows ([keep, V])."""
        out = self.draft(
            input_ids=torch.tensor([tokens], device=self.draft_device),
            use_cache=True,
            **{self._d_kv: self._d_cache},
            **self._positions(self._d_cache, len(tokens), self.draft_device),
            logits_to_keep=keep,
        )
        return out.logits[0, -keep:]

    @torch.inference_mode()
    def step(self, gamma: int) -> StepResult:
        """Draft ``gamma`` tokens (0 = plain target step), verify them, emit, roll caches back."""
        g = self._clip_gamma(gamma)
        dr = self._begin_draft()
        for i in range(g):
            self._draft_one(dr, lookahead=i < g - 1)
        return self._verify(dr)

    # ---- token mode: one decision at a time ------------------------------------------------
    def draft_limit(self) -> int:
        """The most tokens the current step may draft (``max_gamma`` and the token budget)."""
        return min(self.max_gamma, self.max_new_tokens - 1 - len(self.out))

    def drafted(self) -> int:
        """Tokens drafted so far in the current step (token mode; 0 between steps)."""
        return 0 if self._dr is None else len(self._dr.tokens)

    @torch.inference_mode()
    def draft_token(self, lookahead: bool = True) -> float:
        """Token mode: draft one more token of the current step and return its own draft
        probability (softmax of the draft's logits, temperature 1). ``lookahead``: also feed
        it to the draft, so that :meth:`observe` shows the next position's distribution (the
        next decision's signals); without it (draft-then-decide), :meth:`drafted_signals` shows the
        distribution it was drafted from, and a further call first feeds it to the draft (the
        deferred forward, counted in ``draft_forwards``). The token is
        drafted by the step mode's rule (greedy argmax; sampling with the position's uniform),
        so a step drafted token by token equals ``step(gamma)`` with the same tokens."""
        if not self._started or self.done:
            raise RuntimeError("draft_token() needs a started, unfinished sequence")
        dr = self._begin_draft()
        if len(dr.tokens) >= self.draft_limit():
            raise ValueError(
                f"cannot draft more than {self.draft_limit()} tokens at position {dr.t} "
                f"(max_gamma {self.max_gamma}, budget {self.max_new_tokens}): call verify()"
            )
        if len(dr.sigs) <= len(dr.tokens):  # drafted without lookahead: feed it now (deferred)
            t0 = self._clock.mark()
            dr.sigs.append(self._draft_forward([dr.tokens[-1]])[-1])
            dr.forwards += 1
            dr.draft_spans.append((t0, self._clock.mark()))
        row = dr.sigs[len(dr.tokens)]
        self._draft_one(dr, lookahead)
        return _token_prob(row, dr.tokens[-1])

    def drafted_signals(self) -> DraftSignals:
        """Token mode: the signals of the distribution the last drafted token of the current step
        was drafted from (draft-then-decide's observation)."""
        dr = self._dr
        if dr is None or not dr.tokens:
            raise RuntimeError("drafted_signals() needs a drafted token in the current step")
        return _signals_from_logits(dr.sigs[len(dr.tokens) - 1])

    @torch.inference_mode()
    def verify(self) -> StepResult:
        """Token mode: verify what the current step has drafted (nothing: a plain target step)."""
        if not self._started or self.done:
            raise RuntimeError("verify() needs a started, unfinished sequence")
        return self._verify(self._begin_draft())

    def _begin_draft(self) -> _Drafted:
        """The step being drafted, started at the current position if none is."""
        if self._dr is None:
            self._ensure_q()
            assert self._q is not None
            self._dr = _Drafted(
                t=len(self.out), d_len0=self._d_cache.get_seq_length(), obs_spans=list(self._obs_spans), sigs=[self._q]
            )
        return self._dr

    def _verify(self, dr: _Drafted) -> StepResult:
        """Verify ``dr``'s tokens with one target forward, emit, and roll both caches back."""
        g, t = len(dr.tokens), dr.t
        t1 = self._clock.mark()
        x = torch.tensor([[self._t_pending, *dr.tokens]], device=self.device)
        pos = self._positions(self._t_cache, g + 1, self.device)
        logits = self.target(input_ids=x, use_cache=True, **{self._t_kv: self._t_cache}, **pos).logits[0]
        v = self._accept_sampling(logits, dr, t) if self.sampling else self._accept_greedy(logits, dr)
        acc_raw = v.accepted
        finish = self._cut_at_eos(v)
        self._record_step(t, g, v, dr, acc_raw)
        self._record_target(t, logits, len(v.emitted))
        self._tgt_row, self._tgt_sig = logits[len(v.emitted) - 1], None
        self._rollback(g, v, dr)
        t2 = self._clock.mark()
        clock = self._clock
        clock.wait()  # the step's one synchronisation (CUDA)
        extra_s = clock.seconds(v.extra_spans)
        self._dr = None
        self._q = None
        self._sig = None
        self.out.extend(v.emitted)
        if finish is None and len(self.out) >= self.max_new_tokens:
            finish = "length"
        self.finish_reason = finish
        return StepResult(
            gamma=g,
            accepted=v.accepted,
            tokens=v.emitted,
            draft_rows=dr.sigs[: max(g, 1)],
            draft_s=clock.seconds(dr.obs_spans) + clock.seconds(dr.draft_spans) + extra_s,
            verify_s=clock.seconds([(t1, t2)]) - extra_s,
            done=finish is not None,
            finish_reason=finish,
            events=v.events,
            draft_forwards=dr.forwards,
            lookahead=dr.lookahead,
        )

    # ---- the phases of a step -------------------------------------------------------------
    def _clip_gamma(self, gamma: int) -> int:
        """Validate a requested gamma; clip it so that the step cannot emit past max_new_tokens."""
        if not self._started:
            raise RuntimeError("call start() before step()")
        g_req = int(gamma)
        if g_req < 0 or g_req > self.max_gamma:
            raise ValueError(f"gamma must be in 0..{self.max_gamma}, got {gamma}")
        if self.done:
            raise RuntimeError("generation has finished: call start() for a new sequence")
        return min(g_req, self.max_new_tokens - 1 - len(self.out))

    def _pick(self, q_logits: torch.Tensor, pos: int) -> tuple[int, torch.Tensor | None]:
        """The draft's token at output position ``pos`` from its logits there: greedy argmax, or
        a sample with the position's uniform (with the distribution it was sampled from).
        One rule for live steps and for the traces' rollouts (:mod:`speckv_env.rollout`)."""
        if self.sampling:
            q = self._probs(q_logits)
            return _sample_from(q, float(self._u[pos, 0])), q
        return int(torch.argmax(q_logits)), None

    def _draft_one(self, dr: _Drafted, lookahead: bool) -> None:
        """Draft the next token from ``dr``'s last row; with ``lookahead``, feed it to the draft."""
        t0 = self._clock.mark()
        i = len(dr.tokens)
        d, q = self._pick(dr.sigs[i], dr.t + i)
        dr.tokens.append(d)
        if q is not None:
            dr.q_rows.append(q)
        if lookahead:
            dr.sigs.append(self._draft_forward([d])[-1])
            dr.forwards += 1
        dr.draft_spans.append((t0, self._clock.mark()))

    def _accept_greedy(self, logits: torch.Tensor, dr: _Drafted) -> _Verdict:
        """Accept drafts while they equal the target's argmax; then emit the target's own token.
        One device-to-host transfer: the target's argmax at every row, with the draft's argmax
        at the bonus position when it is known (the observation at gamma 0, a looked-ahead row
        in token mode)."""
        g = len(dr.tokens)
        ids = [torch.argmax(logits, dim=-1)]
        proposal = len(dr.sigs) > g  # the draft's distribution at position t + g is known
        if proposal:
            ids.append(torch.argmax(dr.sigs[g]).reshape(1).to(logits.device))
        host = torch.cat(ids).tolist()
        tgt = host[: g + 1]
        k = 0
        while k < g and dr.tokens[k] == tgt[k]:
            k += 1
        if g == 0:
            events = [int(host[1] == tgt[0])]  # the observation's proposal
        else:
            events = [1] * k + ([0] if k < g else [])
        v = _Verdict(accepted=k, emitted=dr.tokens[:k] + [tgt[k]], events=events)
        if g > 0 and k == g and proposal:  # token mode, looked ahead: the bonus position's record
            v.bonus_rec = (dr.t + g, dr.sigs[g], host[-1] == tgt[g])
        return v

    def _first_rejection(self, p: torch.Tensor, dr: _Drafted, t: int) -> int:
        """The first drafted position whose test u < p(d)/q(d) fails (len(dr.tokens) if none):
        p(d_i) and q(d_i) of every drafted token gathered at once, compared with the position's
        uniforms in one float64 operation (u * q(d) < p(d), as the scalar test always was), one
        device-to-host transfer."""
        g = len(dr.tokens)
        d = torch.tensor(dr.tokens, device=p.device)
        p_d = p[torch.arange(g, device=p.device), d].double()
        q_d = torch.stack([q[tok] for q, tok in zip(dr.q_rows, dr.tokens)]).to(p.device).double()
        u = torch.from_numpy(self._u[t : t + g, 1]).to(p.device)
        rejected = torch.cat([~(u * q_d < p_d), torch.ones(1, dtype=torch.bool, device=p.device)])
        return int(torch.argmax(rejected.to(torch.uint8)))  # the first maximum's index

    def _target_rows(self, logits: torch.Tensor, dr: _Drafted, t: int) -> tuple[int, Callable[[int], torch.Tensor]]:
        """The first rejected drafted position k (len(dr.tokens) if none) and the target's
        distribution by row. ``batch_accept`` (on CUDA): every row at once, the acceptance of all
        drafted positions in one operation and one transfer (:meth:`_first_rejection`). Off
        (CPU, where a read costs nothing): rows up to the first rejection only, tested one by
        one, because a top-p row sorts the vocabulary (tens of ms a row on CPU). Both give the
        same rows to the bit (:meth:`_probs_rows`) and the same k."""
        g = len(dr.tokens)
        if self.batch_accept:
            p_all = self._probs_rows(logits)
            return (self._first_rejection(p_all[:g], dr, t) if g else 0), p_all.__getitem__
        rows: dict[int, torch.Tensor] = {}

        def p_row(i: int) -> torch.Tensor:
            if i not in rows:
                rows[i] = self._probs_rows(logits[i : i + 1])[0]
            return rows[i]

        k = 0
        while k < g:
            q, d = dr.q_rows[k], dr.tokens[k]
            if not float(self._u[t + k, 1]) * float(q[d]) < float(p_row(k)[d]):  # u < p/q without dividing
                break
            k += 1
        return k, p_row

    def _accept_sampling(self, logits: torch.Tensor, dr: _Drafted, t: int) -> _Verdict:
        """Exact speculative sampling with position-keyed uniforms (module docstring)."""
        u, g = self._u, len(dr.tokens)
        k, p_row = self._target_rows(logits, dr, t)
        if k < g:  # the residual is drawn at the rejected position only
            p, q = p_row(k), dr.q_rows[k]
            tok = _sample_from(torch.clamp(p - q, min=0.0), float(u[t + k, 2]), fallback=p)
            return _Verdict(accepted=k, emitted=dr.tokens[:k] + [tok], events=[1] * k + [0])
        # all g accepted (or g == 0): draw the token at position t+g with the same rule
        s = t + g
        extra: list[tuple[Any, Any]] = []
        if g == 0 or len(dr.sigs) > g:
            qb_logits = dr.sigs[g]  # the observation's distribution, or the looked-ahead one
        else:
            te = self._clock.mark()
            qb_logits = self._draft_forward([dr.tokens[-1]])[-1]
            dr.forwards += 1
            extra = [(te, self._clock.mark())]
            dr.sigs.append(qb_logits)
        qb, pb = self._probs(qb_logits), p_row(g)
        db = _sample_from(qb, float(u[s, 0]))
        ev = int(float(u[s, 1]) * qb[db].double().to(pb.device) < pb[db].double())  # one transfer
        tok = db if ev else _sample_from(torch.clamp(pb - qb, min=0.0), float(u[s, 2]), fallback=pb)
        return _Verdict(
            accepted=g,
            emitted=dr.tokens + [tok],
            events=[ev] if g == 0 else [1] * g,
            bonus_rec=(s, dr.sigs[-1], bool(ev)),
            extra_spans=extra,
        )

    def _cut_at_eos(self, v: _Verdict) -> str | None:
        """EOS inside the emitted tokens ends generation right after it; the EOS counts as the
        target's token (accepted = tokens before it), as in the trace model of replay/."""
        for j, tok in enumerate(v.emitted):
            if tok in self.eos:
                v.emitted = v.emitted[: j + 1]
                if j < v.accepted:
                    v.accepted = j
                    v.events = [1] * j + [0]
                return "eos"
        return None

    def _record_step(self, t: int, g: int, v: _Verdict, dr: _Drafted, acc_raw: int) -> None:
        """Per-position records for full-information traces (replay/SCHEMA.md)."""
        n_em = len(v.emitted)
        if g == 0:
            self._record(t, dr.sigs[0], bool(v.events[0]))
            return
        for i in range(min(v.accepted + 1, g, n_em)):
            self._record(t + i, dr.sigs[i], i < acc_raw)
        if v.accepted == g and n_em == g + 1:
            if v.bonus_rec is not None:  # sampling; greedy when the draft looked ahead (token mode)
                self._record(*v.bonus_rec)
            else:
                self._late_pos = t + g  # filled by the next observe() (greedy)

    def _rollback(self, g: int, v: _Verdict, dr: _Drafted) -> None:
        """Crop both caches to what was accepted; queue the tokens each model has not seen."""
        base_t = self._t_cache.get_seq_length() - (g + 1)  # before this verification
        _crop(self._t_cache, base_t + 1 + v.accepted)  # keep y[-1] and the accepted drafts
        self._t_pending = v.emitted[-1]
        # the draft was fed `consumed` drafted tokens; the accepted ones among them stay
        keep = min(v.accepted, dr.consumed)
        _crop(self._d_cache, dr.d_len0 + keep)
        self._d_pending = v.emitted[keep:]

    def generate(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        max_new_tokens: int,
        gamma: int | Sequence[int] | Callable[[int, DraftSignals], int] = 4,
        seed: int = 0,
    ) -> GenerationResult:
        """Decode to EOS or max_new_tokens; ``gamma`` is an int, a per-step list, or f(step, signals)."""
        t0 = self._clock.mark()
        self.start(prompt_ids, max_new_tokens, seed)
        steps: list[StepResult] = []
        while not self.done:
            if callable(gamma):
                g = int(gamma(len(steps), self.observe()))
            elif isinstance(gamma, int):
                g = gamma
            else:
                g = int(gamma[len(steps) % len(gamma)])
            steps.append(self.step(g))
        return GenerationResult(list(self.out), steps, self.finish_reason, self._clock.elapsed(t0))
