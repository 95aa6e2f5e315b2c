"""Generate distillation data for the SpecKV draft: the target's own responses plus its top-k log-probs.

The target (default: the embedded SmolLM2-135M-Instruct) answers the distillation prompts with
batched Hugging Face generation on CPU (left padding, stop at EOS). Half of the prompts are
answered greedily, half with temperature sampling, both seeded. The raw logits that generate
already computes at every response position (``output_logits=True``) are the teacher signal, so
no separate teacher-forcing pass is needed: at each position we keep the target's top-k
log-probs (fp16) and their token ids (int32).

Work is split into shards (one generate batch each) written atomically to ``--out``; a restart
skips finished shards, so the script is resumable. ``--time-budget`` stops starting new shards
after that many minutes (shards run in a seeded random order, so a partial run is a
representative subset).

Example::

    python experiments/gen_distill_data.py --prompts experiments/data/distill_prompts.jsonl \
        --out runs/draft/data --batch 32 --max-new 192 --topk 32 --time-budget 35
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting collapse throughput ~10x when the CPU is shared with
# other processes (measured: 6.5 vs 64 tok/s); must be set before torch initialises OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _hash01(s: str) -> float:
    return int(hashlib.sha1(s.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def read_prompts(path: str | Path, splits: set[str] | None = None, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            if splits and r.get("split") not in splits:
                continue
            rows.append(r)
    if limit:
        rng = random.Random(1234)
        rng.shuffle(rows)
        rows = rows[:limit]
    return rows


def plan_shards(rows: list[dict], tok, batch: int, sample_frac: float, seed: int, max_prompt: int) -> list[dict]:
    """Tokenise, split into greedy/sampled halves, sort by length, batch, shuffle batch order."""
    items = []
    for r in rows:
        text = tok.apply_chat_template(
            [{"role": "user", "content": r["text"]}], add_generation_prompt=True, tokenize=False
        )
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt:
            continue
        mode = "sample" if _hash01(f"{seed}:{r['id']}") < sample_frac else "greedy"
        items.append(
            {"id": str(r["id"]), "task": r.get("task", "?"), "mode": mode, "ids": ids, "split": r.get("split", "train")}
        )
    shards: list[dict[str, Any]] = []
    for mode in ("greedy", "sample"):
        sub = sorted([it for it in items if it["mode"] == mode], key=lambda it: len(it["ids"]))
        for i in range(0, len(sub), batch):
            shards.append({"mode": mode, "items": sub[i : i + batch]})
    rng = random.Random(seed)
    rng.shuffle(shards)
    for i, s in enumerate(shards):
        key = "|".join(it["id"] for it in s["items"])
        s["name"] = f"shard_{i:04d}_{s['mode']}_{hashlib.sha1(key.encode()).hexdigest()[:8]}.pt"
        s["index"] = i
    return shards


@torch.no_grad()
def run_shard(model, tok, shard: dict, max_new: int, topk: int, temperature: float, seed: int) -> dict:
    items = shard["items"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 2
    eos = tok.eos_token_id
    L = max(len(it["ids"]) for it in items)
    input_ids = torch.full((len(items), L), pad, dtype=torch.long)
    attn = torch.zeros((len(items), L), dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it["ids"])
        input_ids[b, L - n :] = torch.tensor(it["ids"])
        attn[b, L - n :] = 1
    torch.manual_seed(seed * 100003 + shard["index"])
    kw = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if shard["mode"] == "sample"
        else {"do_sample": False}
    )
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attn,
        max_new_tokens=max_new,
        pad_token_id=pad,
        eos_token_id=eos,
        return_dict_in_generate=True,
        output_logits=True,
        **kw,
    )
    seq = out.sequences[:, L:]
    T = len(out.logits)
    vals = torch.empty((len(items), T, topk), dtype=torch.float16)
    idx = torch.empty((len(items), T, topk), dtype=torch.int32)
    for t, lg in enumerate(out.logits):
        lp = torch.log_softmax(lg.float(), dim=-1)
        v, i = lp.topk(topk, dim=-1)
        vals[:, t] = v.half()
        idx[:, t] = i.int()
    rec = {
        "prompt_ids": [],
        "response_ids": [],
        "topk_logprobs": [],
        "topk_ids": [],
        "ids": [],
        "tasks": [],
        "splits": [],
        "mode": shard["mode"],
    }
    for b, it in enumerate(items):
        r = seq[b].tolist()
        n = len(r)
        if eos in r:
            n = r.index(eos) + 1  # keep EOS: the draft must learn to predict it
        rec["prompt_ids"].append(torch.tensor(it["ids"], dtype=torch.int32))
        rec["response_ids"].append(torch.tensor(r[:n], dtype=torch.int32))
        rec["topk_logprobs"].append(vals[b, :n].clone())
        rec["topk_ids"].append(idx[b, :n].clone())
        rec["ids"].append(it["id"])
        rec["tasks"].append(it["task"])
        rec["splits"].append(it["split"])
    return rec


def generate(
    prompts: str,
    out: str,
    batch: int = 32,
    max_new: int = 192,
    topk: int = 32,
    sample_frac: float = 0.5,
    temperature: float = 0.7,
    seed: int = 0,
    time_budget: float | None = None,
    limit: int | None = None,
    splits: set[str] | None = None,
    max_prompt: int = 768,
    target: str | None = None,
    threads: int = 2,
    log=print,
) -> list[Path]:
    from speckv_env.models import load_model, load_tokenizer

    torch.set_num_threads(threads)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(target)
    model = load_model(target, device="cpu")
    model.eval()
    rows = read_prompts(prompts, splits=splits, limit=limit)
    shards = plan_shards(rows, tok, batch, sample_frac, seed, max_prompt)
    (outdir / "plan.json").write_text(
        json.dumps(
            {
                "n_prompts": len(rows),
                "n_shards": len(shards),
                "batch": batch,
                "max_new": max_new,
                "topk": topk,
                "temperature": temperature,
                "sample_frac": sample_frac,
                "seed": seed,
            },
            indent=1,
        )
    )
    log(f"[gen] {len(rows)} prompts -> {len(shards)} shards of <= {batch}")
    t0 = time.time()
    done_tokens = 0
    paths = []
    for s in shards:
        p = outdir / s["name"]
        if p.exists():
            paths.append(p)
            continue
        if time_budget is not None and (time.time() - t0) / 60 > time_budget:
            log(f"[gen] time budget {time_budget} min reached; stopping before {s['name']}")
            break
        ts = time.time()
        rec = run_shard(model, tok, s, max_new, topk, temperature, seed)
        tmp = p.with_suffix(".tmp")
        torch.save(rec, tmp)
        os.replace(tmp, p)
        paths.append(p)
        n = sum(len(r) for r in rec["response_ids"])
        done_tokens += n
        el = time.time() - t0
        log(
            f"[gen] {s['name']} {s['mode']} bs={len(s['items'])} plen<={max(len(i['ids']) for i in s['items'])} "
            f"resp_tok={n} {n / (time.time() - ts):.1f} tok/s | total {done_tokens} tok in {el / 60:.1f} min "
            f"({done_tokens / el:.1f} tok/s)"
        )
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="experiments/data/distill_prompts.jsonl")
    ap.add_argument("--out", default="runs/draft/data")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-new", type=int, default=192)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--sample-frac", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget", type=float, default=None, help="minutes; no new shard starts after this")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--splits", default=None, help="comma list of prompt splits to use (default: all)")
    ap.add_argument("--max-prompt", type=int, default=768)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    generate(
        a.prompts,
        a.out,
        a.batch,
        a.max_new,
        a.topk,
        a.sample_frac,
        a.temperature,
        a.seed,
        a.time_budget,
        a.limit,
        set(a.splits.split(",")) if a.splits else None,
        a.max_prompt,
        None,
        a.threads,
        log=lambda m: print(m, flush=True),
    )


if __name__ == "__main__":
    sys.exit(main())
