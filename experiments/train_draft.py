"""Train, evaluate and ship the SpecKV draft for the embedded default target (SmolLM2-135M-Instruct).

Pipeline (see speckv_env/draft.py for the architecture):

1. data: ``experiments/gen_distill_data.py`` writes the target's own responses to the distillation
   prompts with its top-k log-probs at every response position (shards under ``--data``).
2. train (default action): the draft body is initialised from the target's ``--layers``, the head
   from the target's embedding rows of the ``--head-size`` most frequent response tokens.
   Loss = soft cross-entropy to the target's top-k distribution renormalised over the head tokens
   + ``--hard-weight`` x cross-entropy on the target's argmax. AdamW, warmup + cosine, seeded,
   checkpoints every ``--ckpt-minutes`` to ``<out>/ckpt/last.pt`` (``--resume`` continues),
   validation on held-out prompts (by prompt id), early stopping, best weights to ``<out>/best``.
3. ``--eval``: alpha per task on the prompt suites (teacher-forced along the target's own greedy
   output, ``--eval-max-new`` tokens), the fraction of target outputs in repetition loops, the
   draft/target decode-step latency ratio (batch 1, KV cache, median) and the shipped file size.
4. ``--ship``: copy ``<out>/best`` into ``speckv_env/assets/draft``.

``--budget tiny`` runs generate -> train -> save -> eval end to end on a few built-in prompts in
well under a minute (used by tests/test_draft_training.py).

Examples::

    python experiments/train_draft.py --data runs/draft/data --out runs/draft --layers 0,1,2 \
        --head-size 8192 --time-budget 40
    python experiments/train_draft.py --eval --draft runs/draft/best --splits test,validation
    python experiments/train_draft.py --budget tiny --out /tmp/tiny
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting collapse throughput ~10x when the CPU is shared with
# other processes (measured: 6.5 vs 64 tok/s); must be set before torch initialises OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import glob
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

TASKS = ("chat", "code", "math", "summarization")

TINY_PROMPTS = [
    ("chat", "Give me two tips for sleeping better."),
    ("code", "Write a Python function that reverses a string."),
    ("math", "What is 12 times 7? Explain briefly."),
    ("summarization", "Summarize: The cat sat on the mat all day because the sun was warm and the house was quiet."),
    ("chat", "Name three colours of the rainbow."),
    ("code", "Write a Python function that returns the sum of a list."),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Data


def load_shards(data_dir: str | Path) -> list[dict]:
    exs = []
    for p in sorted(glob.glob(str(Path(data_dir) / "shard_*.pt"))):
        r = torch.load(p, weights_only=True)
        for i in range(len(r["ids"])):
            if len(r["response_ids"][i]) == 0:
                continue
            exs.append(
                {
                    "id": r["ids"][i],
                    "task": r["tasks"][i],
                    "mode": r["mode"],
                    "prompt": r["prompt_ids"][i].long(),
                    "resp": r["response_ids"][i].long(),
                    "lp": r["topk_logprobs"][i],
                    "tk": r["topk_ids"][i].long(),
                }
            )
    return exs


def is_val(pid: str, frac: float) -> bool:
    return int(hashlib.sha1(pid.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < frac


def choose_head(train: list[dict], k: int) -> tuple[torch.Tensor, Counter]:
    """The k most frequent tokens among the target's response tokens and argmax tokens (+ specials)."""
    c: Counter = Counter()
    for e in train:
        c.update(e["resp"].tolist())
        c.update(e["tk"][:, 0].tolist())
    ids = [0, 1, 2]
    for t, _ in c.most_common():
        if len(ids) >= k:
            break
        if t not in (0, 1, 2):
            ids.append(t)
    return torch.tensor(ids, dtype=torch.long), c


def make_batches(exs: list[dict], tokens_per_batch: int, max_batch: int, rng: random.Random | None) -> list[list[int]]:
    order = sorted(range(len(exs)), key=lambda i: len(exs[i]["prompt"]) + len(exs[i]["resp"]))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        n = len(exs[i]["prompt"]) + len(exs[i]["resp"]) - 1
        m = max(cur_max, n)
        if cur and (m * (len(cur) + 1) > tokens_per_batch or len(cur) >= max_batch):
            batches.append(cur)
            cur, m = [], n
        cur.append(i)
        cur_max = m
    if cur:
        batches.append(cur)
    if rng is not None:
        rng.shuffle(batches)
    return batches


def collate(exs: list[dict], idx: list[int], lut: torch.Tensor, pad: int = 2):
    """Right-padded inputs (prompt + response[:-1]) and, for every response position, the
    flattened input position whose output predicts it, teacher top-k (head-mapped) and argmax."""
    seqs = [torch.cat([exs[i]["prompt"], exs[i]["resp"][:-1]]) for i in idx]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    flat_pos, lps, tks = [], [], []
    for b, (i, s) in enumerate(zip(idx, seqs)):
        ids[b, : len(s)] = s
        mask[b, : len(s)] = 1
        P, R = len(exs[i]["prompt"]), len(exs[i]["resp"])
        flat_pos.append(b * L + torch.arange(P - 1, P - 1 + R))
        lps.append(exs[i]["lp"].float())
        tks.append(exs[i]["tk"])
    tk = torch.cat(tks)
    return ids, mask, torch.cat(flat_pos), torch.cat(lps), lut[tk], lut[tk[:, 0]]


def kd_loss(draft, batch, hard_weight: float):
    ids, mask, pos, lp, tk_head, top1_head = batch
    h = draft.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    h = h.reshape(-1, h.shape[-1])[pos]
    logq = F.log_softmax(draft.lm_head(h).float(), dim=-1)  # [N, K]
    valid = tk_head >= 0
    # teacher distribution over its top-k tokens that are in the head, renormalised
    p = torch.where(valid, lp, torch.full_like(lp, -1e4)).softmax(-1) * valid
    soft = -(p * logq.gather(-1, tk_head.clamp(min=0))).sum(-1)
    has = valid.any(-1)
    soft = (soft * has).sum() / has.sum().clamp(min=1)
    ok = top1_head >= 0
    hard = F.nll_loss(logq[ok], top1_head[ok]) if ok.any() else logq.new_zeros(())
    agree = ((logq.argmax(-1) == top1_head) & ok).float().sum()
    return soft + hard_weight * hard, soft.detach(), hard.detach(), agree.detach(), torch.tensor(len(pos))


@torch.no_grad()
def evaluate_val(draft, exs, batches, lut, hard_weight):
    draft.eval()
    tot = {"loss": 0.0, "soft": 0.0, "agree": 0.0, "n": 0}
    for bidx in batches:
        loss, soft, hard, agree, n = kd_loss(draft, collate(exs, bidx, lut), hard_weight)
        n = int(n)
        tot["loss"] += float(loss) * n
        tot["soft"] += float(soft) * n
        tot["agree"] += float(agree)
        tot["n"] += n
    draft.train()
    n = max(tot["n"], 1)
    return {"val_loss": tot["loss"] / n, "val_soft": tot["soft"] / n, "val_agree": tot["agree"] / n}


# ---------------------------------------------------------------------------------------------
# Training


def train(args) -> dict:
    from speckv_env.draft import build_draft_from_target, save_draft
    from speckv_env.models import default_target_path

    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    out = Path(args.out)
    (out / "ckpt").mkdir(parents=True, exist_ok=True)
    exs = load_shards(args.data)
    if not exs:
        raise SystemExit(f"no data shards in {args.data}: run experiments/gen_distill_data.py first")
    train_ex = [e for e in exs if not is_val(e["id"], args.val_frac)]
    val_ex = [e for e in exs if is_val(e["id"], args.val_frac)] or exs[:1]
    if args.max_train_examples:
        train_ex = train_ex[: args.max_train_examples]
    ntok = sum(len(e["resp"]) for e in train_ex)
    log(
        f"data: {len(train_ex)} train examples ({ntok} response tokens), {len(val_ex)} val examples "
        f"({sum(len(e['resp']) for e in val_ex)} tokens)"
    )

    ck_path = out / "ckpt" / "last.pt"
    resume = args.resume and ck_path.exists()
    ck = torch.load(ck_path, weights_only=False) if resume else None
    warm = torch.load(args.init_from, weights_only=False) if (args.init_from and not ck) else None
    src = ck or warm
    head = src["head_ids"] if src else choose_head(train_ex, args.head_size)[0]
    layers = src["layers"] if src else [int(x) for x in args.layers.split(",")]
    tpath = default_target_path()
    draft = build_draft_from_target(tpath, layers, head)
    if warm:  # weights only: fresh optimizer, schedule and batching
        draft.load_state_dict(warm["model"], strict=False)
        log(f"initialised from {args.init_from} (step {warm['step']} of that run)")
    lut = torch.full((draft.config.vocab_size,), -1, dtype=torch.long)
    lut[draft.head_ids] = torch.arange(draft.head_size)
    cov = sum(int((lut[e["tk"][:, 0]] >= 0).sum()) for e in val_ex) / max(1, sum(len(e["resp"]) for e in val_ex))
    log(f"draft: layers {layers}, head {draft.head_size} tokens, val argmax coverage {cov:.4f}")
    params = [p for p in draft.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    # 1-D parameters (RMSNorm gains, O(1) values) get a larger step: the early layers' residual stream
    # has a few massive dimensions, and the target's final-norm gains must move far to undo them.
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay, "mult": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "mult": args.norm_lr_mult},
        ],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    rng = random.Random(args.seed)
    nb_epoch = len(make_batches(train_ex, args.tokens_per_batch, args.max_batch, None))
    total_steps = ck["total_steps"] if ck else max(1, int(args.epochs * nb_epoch))
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    step, epoch, best, bad_evals, history = 0, 0, None, 0, []
    wall_before = 0.0
    if ck:
        draft.load_state_dict(ck["model"], strict=False)
        opt.load_state_dict(ck["opt"])
        step, epoch, best, bad_evals, history = ck["step"], ck["epoch"], ck["best"], ck["bad_evals"], ck["history"]
        rng.setstate(ck["rng"])
        torch.set_rng_state(ck["torch_rng"])
        wall_before = ck["wall"]
        log(f"resumed from {ck_path} at step {step}/{total_steps}")
    val_batches = make_batches(val_ex, args.tokens_per_batch, args.max_batch, None)

    def lr_at(s):
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        prog = min(1.0, (s - args.warmup) / max(1, total_steps - args.warmup))
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * prog)))

    def save_ckpt():
        torch.save(
            {
                "model": draft.trainable_state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "epoch": epoch,
                "best": best,
                "bad_evals": bad_evals,
                "history": history,
                "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(),
                "wall": wall_before + time.time() - t0,
                "total_steps": total_steps,
                "head_ids": draft.head_ids.clone(),
                "layers": layers,
            },
            str(ck_path) + ".tmp",
        )
        os.replace(str(ck_path) + ".tmp", ck_path)

    extra = {
        "training": {
            "layers": layers,
            "seed": args.seed,
            "data": str(args.data),
            "argv": " ".join(sys.argv[1:]),
            "init_from": args.init_from,
            "train_examples": len(train_ex),
            "train_tokens": ntok,
        }
    }
    t0 = time.time()
    if not ck:
        m = evaluate_val(draft, val_ex, val_batches, lut, args.hard_weight)
        m.update(step=0, wall=0.0)
        history.append(m)
        log(f"step 0 (init) {m}")
    draft.train()
    last_ck, first_loss, recent = time.time(), None, []
    calibrated = ck is not None
    stop = False
    while step < total_steps and not stop:
        batches = make_batches(train_ex, args.tokens_per_batch, args.max_batch, rng)
        # skip the batches of this epoch already seen before a resume
        skip = step - epoch * nb_epoch if step > epoch * nb_epoch else 0
        for bidx in batches[skip:]:
            if step >= total_steps or (args.stop_after and step >= args.stop_after):
                stop = True
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(step) * g.get("mult", 1.0)
            loss, soft, hard, agree, n = kd_loss(draft, collate(train_ex, bidx, lut), args.hard_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, args.clip)
            opt.step()
            step += 1
            recent.append(float(loss))
            if first_loss is None:
                first_loss = float(loss)
            el = time.time() - t0
            if not calibrated and step == args.calib_steps and args.time_budget:
                per = el / step
                fit = int(args.time_budget * 60 * 0.87 / per)
                if fit < total_steps:
                    log(
                        f"{per:.2f} s/step: shrinking the run from {total_steps} to {fit} steps to fit "
                        f"{args.time_budget} min"
                    )
                    total_steps = max(fit, step + 1)
                calibrated = True
            if step % args.log_every == 0:
                log(
                    f"step {step}/{total_steps} ep {epoch} loss {sum(recent) / len(recent):.4f} "
                    f"soft {float(soft):.3f} agree {float(agree) / int(n):.3f} lr {lr_at(step):.2e} {el / 60:.1f} min"
                )
                recent = []
            if step % args.eval_every == 0 or step == total_steps:
                m = evaluate_val(draft, val_ex, val_batches, lut, args.hard_weight)
                m.update(step=step, wall=wall_before + time.time() - t0, train_loss=float(loss))
                history.append(m)
                improved = best is None or m["val_agree"] > best["val_agree"] + 1e-4
                if improved:
                    best = m
                    bad_evals = 0
                    extra["training"].update(step=step, val=m)
                    save_draft(draft, out / "best", extra_config=extra)
                else:
                    bad_evals += 1
                log(f"eval step {step}: {m} {'*best*' if improved else f'(no gain {bad_evals})'}")
                if bad_evals >= args.patience:
                    log(f"early stop: no val gain for {bad_evals} evals")
                    stop = True
                    break
            if time.time() - last_ck > args.ckpt_minutes * 60:
                save_ckpt()
                last_ck = time.time()
        else:
            epoch += 1
    save_ckpt()
    wall = wall_before + time.time() - t0
    summary = {
        "steps": step,
        "total_steps": total_steps,
        "epochs": epoch,
        "wall_s": wall,
        "first_loss": first_loss,
        "history": history,
        "best": best,
        "layers": layers,
        "head_size": draft.head_size,
        "train_examples": len(train_ex),
        "train_tokens": ntok,
        "val_examples": len(val_ex),
        "val_argmax_coverage": cov,
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
    log(f"done: {step} steps in {wall / 60:.1f} min; best {best}")
    return summary


# ---------------------------------------------------------------------------------------------
# Evaluation


def loop_fraction(tokens: list[int], n: int = 8) -> float:
    """Fraction of positions that start an n-gram already seen earlier in the same output."""
    if len(tokens) < 2 * n:
        return 0.0
    seen, rep = set(), 0
    for i in range(len(tokens) - n + 1):
        g = tuple(tokens[i : i + n])
        if g in seen:
            rep += 1
        seen.add(g)
    return rep / (len(tokens) - n + 1)


def suite_prompts(task: str, split: str) -> list[dict]:
    try:
        from speckv_env.prompts import load_prompts

        return [{"text": r.text, "id": r.id} for r in load_prompts(task=task, split=split)]
    except ImportError:
        p = REPO / "speckv_env" / "data" / "prompts" / f"{task}.jsonl"
        if not p.exists():
            return []
        records = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
        return [r for r in records if r.get("split") == split]


@torch.no_grad()
def target_greedy(target, tok, texts: list[str], max_new: int, batch: int = 16) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, greedy response ids up to and including EOS) for each text, batched with left padding."""
    res: list[tuple[list[int], list[int]]] = []
    enc_all = [
        tok(
            tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        for t in texts
    ]
    order = sorted(range(len(texts)), key=lambda i: len(enc_all[i]))
    out: list[tuple[list[int], list[int]] | None] = [None] * len(texts)
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        L = max(len(enc_all[i]) for i in idx)
        ids = torch.full((len(idx), L), 2, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, i in enumerate(idx):
            ids[b, L - len(enc_all[i]) :] = torch.tensor(enc_all[i])
            mask[b, L - len(enc_all[i]) :] = 1
        g = target.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=2,
            eos_token_id=tok.eos_token_id,
        )[:, L:]
        for b, i in enumerate(idx):
            r = g[b].tolist()
            if tok.eos_token_id in r:
                r = r[: r.index(tok.eos_token_id) + 1]
            out[i] = (enc_all[i], r)
    for o in out:
        assert o is not None  # every text was in one batch
        res.append(o)
    return res


@torch.no_grad()
def draft_matches(draft, prompt: list[int], resp: list[int]) -> list[bool]:
    ids = torch.tensor([prompt + resp[:-1]])
    logits = draft(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 :]
    return (logits.argmax(-1) == torch.tensor(resp)).tolist()


@torch.no_grad()
def decode_latency(model, steps: int = 60, prompt_len: int = 64) -> float:
    ids = torch.randint(100, 20000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    o = model(input_ids=ids, use_cache=True)
    cache, nxt, ts = o.cache, o.logits[:, -1:].argmax(-1), []
    for _ in range(steps + 5):
        t = time.perf_counter()
        o = model(input_ids=nxt, cache=cache, use_cache=True)
        cache, nxt = o.cache, o.logits[:, -1:].argmax(-1)
        ts.append(time.perf_counter() - t)
    ts = sorted(ts[5:])
    return ts[len(ts) // 2]


def evaluate(
    draft_dir: str | Path,
    splits: list[str],
    max_new: int,
    out_json: str | Path | None = None,
    cache_dir: str | Path | None = None,
    prompts: dict | None = None,
    latency_steps: int = 60,
    threads: int = 2,
) -> dict:
    from speckv_env.draft import load_draft
    from speckv_env.models import load_model, load_tokenizer

    torch.set_num_threads(threads)
    tok = load_tokenizer(None)
    target = load_model(None, device="cpu").eval()
    draft = load_draft(draft_dir, device="cpu")
    res: dict[str, Any] = {"draft": str(draft_dir), "max_new": max_new, "splits": {}}
    for split in splits:
        per = {}
        for task in TASKS:
            if prompts is not None:
                texts = [t for (tk, t) in prompts.get(split, []) if tk == task]
            else:
                texts = [r["text"] for r in suite_prompts(task, split)]
            if not texts:
                continue
            cf = Path(cache_dir) / f"target_greedy_{task}_{split}_{max_new}.pt" if cache_dir else None
            key = hashlib.sha1("\n".join(texts).encode()).hexdigest()
            pairs = None
            if cf and cf.exists():
                c = torch.load(cf, weights_only=True)
                if c.get("key") == key:
                    pairs = c["pairs"]
            if pairs is None:
                t0 = time.time()
                pairs = target_greedy(target, tok, texts, max_new)
                log(f"target greedy {task}/{split}: {len(pairs)} prompts in {time.time() - t0:.0f} s")
                if cf:
                    cf.parent.mkdir(parents=True, exist_ok=True)
                    torch.save({"key": key, "pairs": pairs}, cf)
            m_all, m_clean, loops = [], [], 0
            for p, r in pairs:
                if not r:
                    continue
                mm = draft_matches(draft, p, r)
                m_all += mm
                if loop_fraction(r) > 0.3:
                    loops += 1
                else:
                    m_clean += mm
            per[task] = {
                "alpha": sum(m_all) / max(1, len(m_all)),
                "alpha_no_loops": sum(m_clean) / max(1, len(m_clean)),
                "n_prompts": len(pairs),
                "n_tokens": len(m_all),
                "loop_frac": loops / max(1, len(pairs)),
            }
            log(f"{split}/{task}: {per[task]}")
        if per:
            res["splits"][split] = {
                "tasks": per,
                "mean_alpha": sum(v["alpha"] for v in per.values()) / len(per),
                "mean_alpha_no_loops": sum(v["alpha_no_loops"] for v in per.values()) / len(per),
                "loop_frac": sum(v["loop_frac"] * v["n_prompts"] for v in per.values())
                / max(1, sum(v["n_prompts"] for v in per.values())),
            }
            log(f"{split}: mean alpha {res['splits'][split]['mean_alpha']:.4f}")
    if latency_steps:
        lt, ld = [], []
        for _ in range(3):  # interleave to share the same CPU conditions
            lt.append(decode_latency(target, latency_steps))
            ld.append(decode_latency(draft, latency_steps))
        res["latency"] = {
            "target_ms": 1000 * sorted(lt)[1],
            "draft_ms": 1000 * sorted(ld)[1],
            "ratio": sorted(ld)[1] / sorted(lt)[1],
            "threads": threads,
        }
        log(f"latency: {res['latency']}")
    w = Path(draft_dir) / "model.safetensors"
    res["file_bytes"] = w.stat().st_size
    res["file_mb"] = w.stat().st_size / 1e6
    if out_json:
        Path(out_json).write_text(json.dumps(res, indent=1))
    return res


# ---------------------------------------------------------------------------------------------
# Tiny end-to-end budget


def run_tiny(args) -> dict:
    import gen_distill_data as gd

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pf = out / "tiny_prompts.jsonl"
    with open(pf, "w") as f:
        for i, (task, text) in enumerate(TINY_PROMPTS):
            f.write(json.dumps({"id": f"tiny-{i}", "task": task, "split": "distill", "text": text}) + "\n")
    t0 = time.time()
    gd.generate(str(pf), str(out / "data"), batch=8, max_new=12, topk=8, seed=args.seed, threads=args.threads, log=log)
    log(f"tiny: generated in {time.time() - t0:.1f} s")
    a = argparse.Namespace(**vars(args))
    a.data, a.val_frac, a.head_size = str(out / "data"), 0.0, 512
    a.max_steps, a.epochs, a.eval_every, a.log_every, a.patience = 30, 1000, 1000, 10, 100
    a.warmup, a.lr, a.time_budget, a.resume, a.layers = 3, 1e-3, None, False, "0,1"
    summ = train(a)
    last_loss = summ["history"][-1]["train_loss"]
    ev = evaluate(
        out / "best", ["test"], max_new=8, prompts={"test": TINY_PROMPTS[:4]}, latency_steps=5, threads=args.threads
    )
    res = {
        "first_loss": summ["first_loss"],
        "last_loss": last_loss,
        "steps": summ["steps"],
        "eval": ev,
        "wall_s": time.time() - t0,
    }
    (out / "tiny_result.json").write_text(json.dumps(res, indent=1))
    log(f"tiny done in {res['wall_s']:.1f} s: loss {res['first_loss']:.3f} -> {last_loss:.3f}")
    return res


def ship(run_dir: str | Path, notes: str = "") -> Path:
    """Copy ``<run_dir>/best`` into speckv_env/assets/draft and write TRAINING.md from the run's
    train_summary.json, gen plan and eval_best.json."""
    run_dir = Path(run_dir)
    src = run_dir / "best"
    dst = REPO / "speckv_env" / "assets" / "draft"
    dst.mkdir(parents=True, exist_ok=True)
    for n in ("model.safetensors", "config.json"):
        shutil.copyfile(src / n, dst / n)
    summ = json.loads((run_dir / "train_summary.json").read_text())
    cfg = json.loads((src / "config.json").read_text())["speckv_draft"]
    ev = json.loads((run_dir / "eval_best.json").read_text()) if (run_dir / "eval_best.json").exists() else None
    tr = cfg.get("training", {})
    plan_f = Path(tr.get("data", "runs/draft/data")) / "plan.json"
    plan = json.loads(plan_f.read_text()) if plan_f.exists() else {}
    L = ["# SpecKV draft for SmolLM2-135M-Instruct: how it was trained", ""]
    L += [
        "## Model",
        "",
        f"- LlamaForCausalLM subclass `speckv_env.draft.SpecKVDraftForCausalLM`: {len(cfg['init_layers'])} layers, "
        f"hidden 576, 9 heads / 3 kv heads, body initialised from target layers {cfg['init_layers']}, final norm "
        "from the target's.",
        "- Input embedding: the target's, frozen, not shipped (read from the target's safetensors at load).",
        f"- Output head: Linear(576, {cfg['head_size']}) over the {cfg['head_size']} most frequent tokens of the "
        "target's generations (+ ids 0, 1, 2), initialised from their embedding rows; forward returns full-vocab "
        "logits, other tokens at finfo(dtype).min.",
        f"- Weights stored as {cfg.get('weights_dtype')}; {((dst / 'model.safetensors').stat().st_size) / 1e6:.1f} MB.",
        "",
    ]
    L += [
        "## Data",
        "",
        "- Prompts: experiments/data/distill_prompts.jsonl (2400 prompts; chat, code, math, summarization), "
        "chat-template formatted.",
        f"- Target responses: batched HF generation on CPU (left padding, batch {plan.get('batch')}, max_new_tokens "
        f"{plan.get('max_new')}, stop at EOS), half greedy and half temperature {plan.get('temperature')} "
        f"sampling by prompt-id hash, seed {plan.get('seed')}; generation ran under a wall-clock budget so "
        "only the shards finished in time are used (shards in a seeded random order).",
        f"- Teacher signal: the target's top-{plan.get('topk')} log-probs at every response position, taken from "
        "the logits generate already computes (no second pass).",
        f"- Train: {summ['train_examples']} responses, {summ['train_tokens']} response tokens; validation "
        f"(held out by prompt id, 5%): {summ['val_examples']} responses.",
        "",
    ]
    best = summ.get("best") or {}
    L += [
        "## Training",
        "",
        "- Loss: soft cross-entropy to the target's top-k distribution renormalised over the head tokens "
        "+ `--hard-weight` x cross-entropy on the target's argmax (values in the commands below); "
        "AdamW (betas 0.9/0.98, wd 0.01), warmup + cosine, "
        "grad clip 1.0, body + norm + head trained, embedding frozen; 2 CPU threads.",
        f"- {summ['steps']} steps ({summ['epochs']} full epochs), {summ['wall_s'] / 60:.1f} min wall; best "
        f"checkpoint at step {best.get('step')} (val top-1 agreement {best.get('val_agree', float('nan')):.4f}, "
        f"val soft CE {best.get('val_soft', float('nan')):.4f}); head covers "
        f"{summ['val_argmax_coverage']:.4f} of the target's validation argmax tokens.",
        "",
    ]
    if ev:
        L += [
            "## Evaluation",
            "",
            f"Alpha = fraction of positions where the draft's greedy token equals the target's, teacher-forced "
            f"along the target's own greedy output (max_new_tokens {ev['max_new']}), on the prompt suites "
            "(speckv_env/data/prompts). Loops: target outputs whose repeated 8-grams cover > 30% of positions.",
            "",
            "| split | task | alpha | alpha w/o loop outputs | prompts | tokens | loop frac |",
            "|---|---|---|---|---|---|---|",
        ]
        for sp, r in ev["splits"].items():
            for t, v in r["tasks"].items():
                L.append(
                    f"| {sp} | {t} | {v['alpha']:.4f} | {v['alpha_no_loops']:.4f} | {v['n_prompts']} | "
                    f"{v['n_tokens']} | {v['loop_frac']:.3f} |"
                )
            L.append(
                f"| {sp} | **mean** | **{r['mean_alpha']:.4f}** | {r['mean_alpha_no_loops']:.4f} | | | "
                f"{r['loop_frac']:.3f} |"
            )
        if "latency" in ev:
            la = ev["latency"]
            L += [
                "",
                f"Decode step (batch 1, KV cache, {la['threads']} CPU threads, median): draft "
                f"{la['draft_ms']:.2f} ms, target {la['target_ms']:.2f} ms, ratio {la['ratio']:.3f}.",
                "",
            ]
    L += [
        "## Commands",
        "",
        "```",
        "export OMP_WAIT_POLICY=PASSIVE   # spinning OpenMP threads collapse throughput on a shared CPU",
        "python experiments/gen_distill_data.py --prompts experiments/data/distill_prompts.jsonl "
        "--out runs/draft/data "
        f"--batch {plan.get('batch')} --max-new {plan.get('max_new')} --topk {plan.get('topk')} --time-budget 38 "
        f"--seed {plan.get('seed')}   # then resumed with --time-budget 7",
        f"python experiments/train_draft.py {tr.get('argv', '')}".rstrip(),
        f"python experiments/train_draft.py --eval --out {run_dir} --draft {run_dir}/best --splits test,validation",
        f"python experiments/train_draft.py --ship --out {run_dir}",
        "```",
        "",
    ]
    if notes:
        L += ["## Notes", "", notes, ""]
    (dst / "TRAINING.md").write_text("\n".join(L))
    return dst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/draft/data")
    ap.add_argument("--out", default="runs/draft")
    ap.add_argument("--layers", default="0,1,2", help="target layers that initialise the draft body")
    ap.add_argument("--head-size", type=int, default=8192)
    ap.add_argument("--epochs", type=float, default=6)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--stop-after", type=int, default=0, help="stop at this step without changing the schedule")
    ap.add_argument("--norm-lr-mult", type=float, default=1.0, help="lr multiplier for norm gains (1-D params)")
    ap.add_argument("--time-budget", type=float, default=40, help="minutes; the step count shrinks to fit")
    ap.add_argument("--calib-steps", type=int, default=20)
    ap.add_argument("--tokens-per-batch", type=int, default=6144)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--hard-weight", type=float, default=0.3)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--val-frac", type=float, default=0.05)
    ap.add_argument("--max-train-examples", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--ckpt-minutes", type=float, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init-from", default=None, help="a ckpt/last.pt to take the weights from (fresh optimizer)")
    ap.add_argument("--eval", action="store_true", help="evaluate --draft instead of training")
    ap.add_argument("--draft", default=None, help="draft folder for --eval (default <out>/best)")
    ap.add_argument("--splits", default="test,validation")
    ap.add_argument("--eval-max-new", type=int, default=128)
    ap.add_argument("--ship", action="store_true", help="copy <out>/best into speckv_env/assets/draft")
    ap.add_argument("--budget", choices=["full", "tiny"], default="full")
    ap.add_argument("--notes-file", default=None, help="markdown appended to TRAINING.md by --ship")
    a = ap.parse_args(argv)
    if a.budget == "tiny":
        run_tiny(a)
    elif a.eval:
        d = a.draft or str(Path(a.out) / "best")
        evaluate(
            d,
            a.splits.split(","),
            a.eval_max_new,
            out_json=Path(a.out) / f"eval_{Path(d).name}.json",
            cache_dir=Path(a.out) / "eval_cache",
            threads=a.threads,
        )
    elif a.ship:
        notes = Path(a.notes_file).read_text() if a.notes_file else ""
        log(
            f"shipped to {ship(a.out, notes)}; next, fit its context-lookup weights: "
            "python experiments/fit_lookup.py --draft speckv_env/assets/draft"
        )
    else:
        train(a)


if __name__ == "__main__":
    main()
