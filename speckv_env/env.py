"""SpecKV-v0: live speculative decoding with Hugging Face models; gamma is the action."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base_env import OBS_VERSION_DOC, TOKEN_MODE_DOC, SpecKVBaseEnv
from .core import DEFAULT_GAMMAS, DEFAULT_OBS_VERSION, CostModel, DraftSignals, EpisodeInfo, StepOutcome


class LiveBackend:
    """A :class:`speckv_env.core.Backend` over the speculative decoding engine."""

    def __init__(
        self,
        pair,
        prompts: Sequence[Any],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        cost_model: CostModel,
        gamma_max: int,
        cache: str = "dynamic",
    ) -> None:
        from .engine import SpeculativeEngine

        if not prompts:
            raise ValueError("no prompts selected: check task=, split= or prompts=")
        self.pair = pair
        self.prompts = list(prompts)
        self.max_new_tokens = int(max_new_tokens)
        self.compression = pair.compression
        self.sampling = temperature > 0
        self.cost_model = cost_model
        self.gamma_max = int(gamma_max)
        self.engine = SpeculativeEngine(
            pair.target,
            pair.draft,
            temperature=temperature,
            top_p=top_p,
            eos_token_id=pair.eos_token_id,
            max_gamma=self.gamma_max,
            cache=cache,
        )
        self._encoded: dict[int, list[int]] = {}
        self._last = DraftSignals(0.0, 0.0, 0.0)

    def num_episodes(self) -> int:
        return len(self.prompts)

    def prompt_ids(self, index: int) -> list[int]:
        if index not in self._encoded:
            self._encoded[index] = self.pair.encode_chat(self.prompts[index].text)
        return self._encoded[index]

    def reset(self, index: int, seed: int | None) -> EpisodeInfo:
        p = self.prompts[index]
        self.engine.start(self.prompt_ids(index), self.max_new_tokens, seed=seed or 0)
        return EpisodeInfo(
            prompt_id=p.id,
            task=p.task,
            compression=self.compression,
            mode="sample" if self.sampling else "greedy",
            max_new_tokens=self.max_new_tokens,
            extra={"exact": self.engine.exact},
        )

    def signals(self) -> DraftSignals:
        if not self.engine.done:
            self._last = self.engine.observe()
        return self._last

    def position(self) -> int:
        return self.engine.position

    def obs_features(self) -> np.ndarray:
        """Observation version 2's five features at the current step's start
        (:func:`speckv_env.core.pre_decision_features`, as the replay env computes them from a
        trace): the lookup over prompt + emitted tokens, the draft's top-1 token there, the
        target's signals at the last verified position (the engine keeps them after every
        verification) and the decoding mode."""
        from .core import pre_decision_features

        e = self.engine
        tgt = e.target_signals()
        nan = float("nan")
        return pre_decision_features(
            e.context(),
            [len(e.prompt) + e.position],
            [e.draft_top1_token()],
            [nan if tgt is None else tgt.top1],
            [nan if tgt is None else tgt.entropy],
            self.sampling,
        )[0]

    def step(self, gamma: int) -> StepOutcome:
        return self._outcome(self.engine.step(gamma))

    # ---- token mode -------------------------------------------------------------------
    def draft_token(self, lookahead: bool = True) -> float:
        """Draft one more token of the current step; its own draft probability."""
        return self.engine.draft_token(lookahead)

    def drafted_signals(self) -> DraftSignals:
        """Draft-then-decide: the signals of the distribution the last drafted token came from."""
        return self.engine.drafted_signals()

    def verify(self) -> StepOutcome:
        """Verify what the current step has drafted."""
        return self._outcome(self.engine.verify())

    def _outcome(self, r: Any) -> StepOutcome:
        return StepOutcome(
            gamma=r.gamma,
            accepted=r.accepted,
            tokens=r.tokens,
            done=r.done,
            finish_reason=r.finish_reason,
            events=r.events,
            draft_s=r.draft_s,
            verify_s=r.verify_s,
            extra={
                "draft_signals": r.draft_signals,
                "draft_forwards": r.draft_forwards,
                "exact": self.engine.exact,
            },
        )

    def close(self) -> None:
        pass


def select_prompts(task=None, split=None, prompts=None) -> list:
    """Prompts from the shipped suites (task/split) or from user input (strings, Prompts or a file)."""
    from .prompts import Prompt, load_prompt_file, load_prompts

    if prompts is None:
        return load_prompts(task=task, split=split)
    if isinstance(prompts, (str, os.PathLike)) and Path(prompts).suffix in (".jsonl", ".txt", ".json"):
        return load_prompt_file(prompts)
    if isinstance(prompts, str):
        prompts = [prompts]
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, Prompt):
            out.append(p)
        elif isinstance(p, str):
            out.append(
                Prompt(id=f"custom-{i:03d}", task="custom", split="custom", text=p, source="user", license="unknown")
            )
        else:
            raise TypeError(f"prompts[{i}] must be a string or a speckv_env.prompts.Prompt, got {type(p).__name__}")
    return out


class SpecKVEnv(SpecKVBaseEnv):
    """Live speculative decoding: a draft proposes gamma tokens, the target verifies them.

    ## Description
    One episode is the generation of one prompt's answer by a draft/target pair (default: the
    embedded SmolLM2-135M-Instruct target and the draft shipped for it). Each step, the agent
    picks gamma; the engine drafts gamma tokens, verifies them with one target forward, emits
    the accepted tokens plus one token of the target's, and rolls the KV caches back. Greedy
    decoding, or sampling with position-keyed randomness, makes the emitted text independent
    of the gammas chosen: only the speed changes, so every policy is judged on the same work.

    ## Action Space
    ``Discrete(len(gammas))``: the index of gamma in ``gammas`` (default 0..8). gamma = 0 is
    a plain target step. A gamma that would emit past ``max_new_tokens`` is clipped.

    ## Observation Space
    ``Box(13,)`` float32 (observation version 1, the default; version 2: ``Box(18,)``, see
    "Observation versions"), finite bounds; only what is known before gamma is chosen:

    | idx | name | range | meaning |
    |-----|------|-------|---------|
    | 0 | draft_top1 | [0, 1] | draft's top-1 probability at the current position |
    | 1 | draft_entropy | [0, 12] | entropy (nats) of the draft's distribution there |
    | 2 | draft_margin | [0, 1] | top-1 minus top-2 probability |
    | 3 | accept_ema | [0, 1] | EMA (rate 0.2) of past acceptance events, starts at 0.5 |
    | 4 | accept_mean | [0, 1] | (hits + 1) / (tests + 2) over past acceptance events |
    | 5 | last_gamma | [0, 1] | previous gamma / max gamma |
    | 6 | last_accepted | [0, 1] | previous accepted / max gamma |
    | 7 | last_full_accept | {0, 1} | previous step drafted and all were accepted |
    | 8 | position | [0, 1] | tokens emitted / max_new_tokens |
    | 9 | cost_ratio | [0, 4] | cost model: draft forward time / target-only step time |
    | 10-12 | compression_none/int8/nf4 | {0, 1} | one-hot compression level of the target |

    The draft's distribution at the current position is computed before gamma is chosen (it
    is the first draft token's distribution, so it costs nothing extra when gamma >= 1).

    ## Rewards
    ``reward="cost"`` (default): emitted tokens minus the step's modelled time in units of
    a target-only step, so the return is N - T / t_target: higher return = lower total time
    = higher end-to-end tokens/s (N does not depend on the gammas). ``"tokens"``: tokens per
    step, the SpecKV paper's (the largest gamma always wins it). ``"time"``: -T / t_target.
    Modelled times come from a calibrated :class:`~speckv_env.core.CostModel`, so rewards are
    deterministic; ``info`` also carries the measured (device-synchronised) times.

    ## Starting State
    A prompt drawn with ``self.np_random`` (or ``options={"episode": i}``); under sampling
    the episode's randomness comes from ``options["episode_seed"]`` or ``self.np_random``.

    ## Episode End
    Terminated when EOS is emitted; truncated when ``max_new_tokens`` tokens are emitted.

    ## Arguments
    ``target``, ``draft`` (hub id, folder or .gguf; default: embedded pair), ``compression``
    (fp32, bf16, fp16, int8, nf4), ``device`` ("auto"), ``task``/``split`` (shipped suites)
    or ``prompts`` (strings or a .jsonl/.txt file), ``max_new_tokens`` (128), ``temperature``
    (0 = greedy), ``top_p``, ``gammas``, ``reward``, ``cost_model`` (a CostModel, a path to
    its JSON, or None to calibrate once and cache), ``pair`` (an already loaded ModelPair),
    ``exact`` (True: row-invariant forwards, see below; False: the faster-where-it-differs
    kernels, for users who need speed and not exact replay), ``cache`` ("dynamic"; "static":
    pre-allocated KV buffers, rollback moves a position, the same tokens: :mod:`speckv_env.static_cache`),
    ``obs_version`` (1, the default, or 2: see below).

    ## Observation versions

    ## Token mode
    ``control`` is ``"step"`` (default: the action is gamma) or ``"token"``; ``lookahead``
    (token mode; default True) picks its variant.

    Exactness: with ``exact=True`` (the default) both models compute row-invariant forwards
    (:mod:`speckv_env.invariant`): a position's logits are bit-identical whether it is
    computed alone or inside a verification of any size, so the emitted sequence does not
    depend on the actions, for every compression (tested on the real default pair), and a
    trace recorded this way replays every policy exactly. ``info["exact"]`` says whether this
    holds for the episode (False with ``exact=False`` or a pair loaded without it).

    Determinism: on CPU the tokens, observations and rewards are reproducible for a given
    seed and action sequence. The measured times in ``info`` are wall-clock readings and vary
    between runs, which is why the id is registered with ``nondeterministic=True`` (Gymnasium's
    checker compares ``info`` too).
    """

    def __init__(
        self,
        target: str | None = None,
        draft: str | None = None,
        compression: str = "fp32",
        device: str = "auto",
        task: str | Sequence[str] | None = None,
        split: str | Sequence[str] | None = "train",
        prompts: Any = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        gammas: Sequence[int] = DEFAULT_GAMMAS,
        reward: str = "cost",
        cost_model: CostModel | str | os.PathLike | None = None,
        pair: Any = None,
        render_mode: str | None = None,
        trust_remote_code: bool = False,
        exact: bool = True,
        control: str = "step",
        cache: str = "dynamic",
        lookahead: bool = True,
        obs_version: int = DEFAULT_OBS_VERSION,
    ) -> None:
        from .core import check_control, check_lookahead, check_obs_version
        from .pair import load_pair

        check_control(control)
        check_lookahead(lookahead, control)
        check_obs_version(obs_version)

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        selected = select_prompts(task, split, prompts)
        if pair is None:
            pair = load_pair(
                target, draft, compression=compression, device=device, trust_remote_code=trust_remote_code, exact=exact
            )
        gamma_max = max(int(g) for g in gammas)
        if cost_model is None:
            from .calibrate import cached_calibration

            cost_model = cached_calibration(pair, gamma_max=max(gamma_max, 8))
        elif not isinstance(cost_model, CostModel):
            cost_model = CostModel.load(str(cost_model))
        self.pair = pair
        backend = LiveBackend(
            pair,
            selected,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            cost_model=cost_model,
            gamma_max=gamma_max,
            cache=cache,
        )
        super().__init__(
            backend,
            gammas=gammas,
            reward=reward,
            render_mode=render_mode,
            control=control,
            lookahead=lookahead,
            obs_version=obs_version,
        )

    @property
    def engine(self):
        backend = self.backend
        assert isinstance(backend, LiveBackend)
        return backend.engine

    def text(self) -> str:
        """The text emitted so far in this episode."""
        return self.pair.tokenizer.decode(self.emitted_tokens, skip_special_tokens=True)


# the token-mode section is the replay env's too: one text (speckv_env.base_env.TOKEN_MODE_DOC)
SpecKVEnv.__doc__ = (
    (SpecKVEnv.__doc__ or "")
    .replace("    ## Token mode\n", TOKEN_MODE_DOC, 1)
    .replace("    ## Observation versions\n", OBS_VERSION_DOC, 1)
)
