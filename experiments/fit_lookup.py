"""Fit the context-lookup weights of a draft (speckv_env/lookup.py) on the training prompts.

The draft's distribution becomes q' = (1 - w_n) q + w_n [x = c] where c is the copy proposal
from the longest earlier match of the context's last n tokens (n <= max n-gram). Greedy
drafting then picks c exactly when w_n / (1 - w_n) >= max q - q(c), so the positions with
match length n decide w_n alone: for each n the weight on a grid that maximises agreement
with the target's greedy token (teacher-forced along the target's own greedy output, the
same measure as ``train_draft.py --eval``) on the *train* split of the prompt suites is kept.
Validation and test prompts are not looked at. The weights are written into the draft's
config.json (``speckv_draft.lookup_weights``, plus ``lookup_fit`` with the data and counts).

    python experiments/fit_lookup.py --draft speckv_env/assets/draft --max-ngram 8

Deterministic (greedy target, fixed grid); about 4 minutes on 2 CPU threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

from train_draft import TASKS, log, suite_prompts, target_greedy  # noqa: E402

GRID = [round(float(x), 2) for x in np.arange(0.0, 0.96, 0.05)]


@torch.no_grad()
def neural_stats(draft, prompt: list[int], resp: list[int], max_ngram: int) -> dict:
    """Per response position: target token, draft argmax / max prob / prob of the copy proposal,
    copy proposal and match length (the draft is run without lookup)."""
    from speckv_env.lookup import lookup_table

    logits = draft(input_ids=torch.tensor([prompt + resp[:-1]]), use_cache=False).logits[0, len(prompt) - 1 :]
    lp = torch.log_softmax(logits.float(), -1)
    props, ns = lookup_table(prompt + resp, len(prompt), max_ngram)
    props, ns = props[: len(resp)], ns[: len(resp)]
    qc = lp.gather(1, torch.as_tensor(props).clamp(min=0)[:, None])[:, 0].exp().numpy()
    return {
        "tgt": np.array(resp),
        "am": lp.argmax(-1).numpy(),
        "qmax": lp.max(-1).values.exp().numpy(),
        "qc": qc,
        "prop": props,
        "n": ns,
    }


def greedy_hits(s: dict, w: np.ndarray, m: np.ndarray | slice = slice(None)) -> np.ndarray:
    """Whether greedy drafting with copy weight ``w`` (per position of ``s[...][m]``) matches the
    target: the copy proposal wins exactly when w / (1 - w) >= max q - q(c) (speckv_env/lookup.py)."""
    copy = (w > 0) & (w / (1 - w) >= s["qmax"][m] - s["qc"][m])
    return np.where(copy, s["prop"][m] == s["tgt"][m], s["am"][m] == s["tgt"][m])


def fit(stats: list[dict], max_ngram: int) -> tuple[list[float], dict]:
    weights, counts = [], {}
    for n in range(1, max_ngram + 1):
        sel = [(s, s["n"] == n) for s in stats]
        sel = [(s, m) for s, m in sel if m.any()]
        total = sum(int(m.sum()) for _, m in sel)
        best = (-1, 0.0)
        for w in GRID:
            hit = sum(int(greedy_hits(s, np.full(int(m.sum()), w), m).sum()) for s, m in sel)
            if hit > best[0]:
                best = (hit, w)
        weights.append(float(best[1]))
        counts[n] = total
    return weights, counts


def agreement(stats: list[dict], weights: list[float]) -> float:
    w = np.array([0.0] + list(weights))
    return float(np.concatenate([greedy_hits(s, w[s["n"]]) for s in stats]).mean())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft", default=str(REPO / "speckv_env" / "assets" / "draft"))
    ap.add_argument("--max-ngram", type=int, default=8)
    ap.add_argument("--split", default="train")
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true", help="print the weights, do not write config.json")
    a = ap.parse_args(argv)
    from speckv_env.draft import load_draft
    from speckv_env.models import load_model, load_tokenizer

    torch.set_num_threads(a.threads)
    t0 = time.time()
    tok = load_tokenizer(None)
    target = load_model(None, device="cpu").eval()
    draft = load_draft(a.draft, device="cpu")
    draft.config.speckv_draft.pop("lookup_weights", None)  # neural statistics only
    stats = []
    for task in TASKS:
        texts = [r["text"] if isinstance(r, dict) else r.text for r in suite_prompts(task, a.split)]
        pairs = target_greedy(target, tok, texts, a.max_new)
        stats += [neural_stats(draft, p, r, a.max_ngram) for p, r in pairs if r]
        log(f"{task}/{a.split}: {len(pairs)} prompts")
    weights, counts = fit(stats, a.max_ngram)
    info = {
        "split": a.split,
        "max_new_tokens": a.max_new,
        "grid": [GRID[0], GRID[-1], 0.05],
        "positions_per_match_length": counts,
        "positions": int(sum(len(s["tgt"]) for s in stats)),
        "agreement_neural": agreement(stats, [0.0] * a.max_ngram),
        "agreement_with_lookup": agreement(stats, weights),
        "wall_s": round(time.time() - t0, 1),
    }
    log(f"weights {weights}; {info}")
    if not a.dry_run:
        cf = Path(a.draft) / "config.json"
        raw = json.loads(cf.read_text())
        raw["speckv_draft"]["lookup_weights"] = weights
        raw["speckv_draft"]["lookup_fit"] = info
        cf.write_text(json.dumps(raw, indent=1) + "\n")
        log(f"wrote lookup weights into {cf}")
    return {"weights": weights, **info}


if __name__ == "__main__":
    main()
