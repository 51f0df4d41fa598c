"""``slab demo --lm``: a small causal SLAB language model on text from a tiny formal grammar.

The text is generated on the fly (seeded) from a probabilistic context-free grammar of English-like
sentences with subject-verb number agreement across relative clauses and prepositional phrases
(so the model must carry the head noun's number over a distance). Perplexity is per word token
on held-out generated text; ``latency_ms`` is milliseconds per token of a full-sequence forward;
``decode`` times greedy generation after a prompt of ``context`` tokens: SLAB's O(1)-state SLA
step against a softmax twin with a preallocated KV cache.
"""

from __future__ import annotations

import copy
import math
import random
import statistics
import time
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

import slab

from . import _ddp
from .common import interleaved_median, seed_all, train_loop
from .models import LMNet

_DET = {"sg": ["the", "a", "this", "every"], "pl": ["the", "some", "these", "many"]}
_NOUN = {
    "sg": ["cat", "dog", "bird", "child", "teacher", "robot", "farmer"],
    "pl": ["cats", "dogs", "birds", "children", "teachers", "robots", "farmers"],
}
_VT = {"sg": ["sees", "likes", "chases", "finds", "helps"], "pl": ["see", "like", "chase", "find", "help"]}
_VI = {"sg": ["sleeps", "runs", "sings"], "pl": ["sleep", "run", "sing"]}
_ADJ = ["big", "small", "red", "happy", "old"]
_PREP = ["near", "with", "behind"]
_WORDS = sorted(
    {w for d in (_DET, _NOUN, _VT, _VI) for ws in d.values() for w in ws}
    | set(_ADJ)
    | set(_PREP)
    | {"that", "and", "."}
)
VOCAB = {w: i for i, w in enumerate(_WORDS)}


class Grammar:
    """Sentences ``NP[n] VP[n] .``; ``NP[n] -> Det[n] (Adj) N[n] (PP | that VP[n])``,
    ``VP[n] -> Vt[n] NP | Vi[n] | VP[n] and VP[n]``, ``PP -> P NP``; recursion damped by depth."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def _np(self, n: str, depth: int) -> list[str]:
        r = self.rng
        out = [r.choice(_DET[n])]
        if r.random() < 0.3:
            out.append(r.choice(_ADJ))
        out.append(r.choice(_NOUN[n]))
        p = r.random()
        if p < 0.35 / (1 + depth):
            out += [r.choice(_PREP)] + self._np(r.choice(("sg", "pl")), depth + 1)
        elif p < 0.6 / (1 + depth):
            out += ["that"] + self._vp(n, depth + 1)
        return out

    def _vp(self, n: str, depth: int) -> list[str]:
        r = self.rng
        out = (
            [r.choice(_VT[n])] + self._np(r.choice(("sg", "pl")), depth + 1)
            if r.random() < 0.65
            else [r.choice(_VI[n])]
        )
        if depth == 0 and r.random() < 0.15:
            out += ["and"] + self._vp(n, depth + 1)
        return out

    def sentence(self) -> list[str]:
        n = self.rng.choice(("sg", "pl"))
        return self._np(n, 0) + self._vp(n, 0) + ["."]

    def tokens(self, count: int) -> torch.Tensor:
        ids: list[int] = []
        while len(ids) < count:
            ids += [VOCAB[w] for w in self.sentence()]
        return torch.tensor(ids[:count], dtype=torch.long)


def _config(quick: bool) -> dict:
    if quick:
        return dict(
            dim=32,
            depth=1,
            heads=2,
            hidden=64,
            seq=64,
            batch=8,
            steps=8,
            contexts=(64, 128, 256),
            gen=8,
            eval_seqs=8,
            repeats=2,
        )
    return dict(
        dim=128,
        depth=2,
        heads=4,
        hidden=256,
        seq=128,
        batch=16,
        steps=500,
        contexts=(512, 2048, 8192),
        gen=32,
        eval_seqs=32,
        repeats=3,
    )


def _ce(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)), torch.zeros(())


@torch.inference_mode()
def perplexity(model, data: torch.Tensor, batch: int = 8) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, data.shape[0], batch):
        x = data[i : i + batch]
        logits = model(x[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        count += x[:, 1:].numel()
    return math.exp(total / count)


@torch.inference_mode()
def decode_speed(model, prompt: torch.Tensor, gen: int, warmup: int = 4) -> float:
    """Greedy tokens/s (1 / the median time of one step) after prefilling ``prompt`` (1, L); prefill is not timed."""
    model.eval()
    logits, caches = model.prefill(prompt, prompt.shape[1] + gen + warmup)
    tok = logits.argmax(-1)
    for _ in range(warmup):
        tok = model.step(tok, caches).argmax(-1)
    times = []
    for _ in range(gen):  # the median step: one busy moment of a shared machine does not move it
        t = time.perf_counter()
        tok = model.step(tok, caches).argmax(-1)
        times.append(time.perf_counter() - t)
    return 1.0 / statistics.median(times)


def run(args, world: _ddp.World, device: torch.device) -> Optional[dict]:
    cfg = _config(args.quick)
    if args.steps is not None:
        cfg["steps"] = args.steps
    steps, seq, batch = cfg["steps"], cfg["seq"], cfg["batch"]
    if batch % world.size:
        raise SystemExit(f"slab demo: the batch ({batch}) must divide by the world size ({world.size})")
    share = batch // world.size
    say = print if world.main else (lambda *a, **k: None)
    say(
        f"lm: grammar text, vocab {len(VOCAB)}, dim {cfg['dim']}, {cfg['depth']} layers, {cfg['heads']} heads, "
        f"MLP {cfg['hidden']}; {steps} steps x batch {batch} x {seq} tokens",
        flush=True,
    )
    sizes = {k: cfg[k] for k in ("dim", "depth", "heads", "hidden")}
    warm, decay = (2, max(1, steps - 4)) if args.quick else (max(1, steps // 20), (steps * 65) // 100)

    def batches(seed):
        gram = Grammar(seed * 1000 + world.rank)  # each rank reads its own text

        def get_xy(_step):
            x = gram.tokens(share * (seq + 1)).view(share, seq + 1).to(device)
            return x[:, :-1], x[:, 1:]

        return get_xy

    log_every = max(1, steps // 10)
    seed_all(args.seed)
    model = LMNet(len(VOCAB), "slab", warm=warm, step=decay, **sizes).to(device)
    if world.initialized:
        slab.nn.convert_sync(model)
    from .vision import _wrap

    from .vision import make_dog

    opt = make_dog(args.optim, model.parameters())
    say(
        f"training SLAB LM (PRepBN/RMSNorm: RMSNorm only for {warm} steps, lam 1 -> 0 over {decay}; "
        f"{type(opt).__name__} lr 1.0)",
        flush=True,
    )
    hist, train_s = train_loop(
        _wrap(model, world, device),
        opt,
        batches(args.seed + 1),
        steps,
        _ce,
        world,
        device,
        "slab lm",
        log_every=log_every,
        quiet=args.quick,
        track_acc=False,
    )
    seed_all(args.seed)
    base = LMNet(len(VOCAB), "baseline", **sizes).to(device)
    bopt = torch.optim.AdamW(base.parameters(), lr=3e-3, weight_decay=0.01)
    bsched = torch.optim.lr_scheduler.OneCycleLR(bopt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    say("training softmax LM (RMSNorm, causal SDPA, AdamW lr 3e-3 one-cycle)", flush=True)
    bhist, btrain_s = train_loop(
        _wrap(base, world, device),
        bopt,
        batches(args.seed + 1),
        steps,
        _ce,
        world,
        device,
        "softmax lm",
        log_every=log_every,
        quiet=args.quick,
        sched=bsched,
        track_acc=False,
    )
    if not world.main:
        return None

    model.eval()
    base.eval()
    held = Grammar(10_000 + args.seed).tokens(cfg["eval_seqs"] * (seq + 1)).view(cfg["eval_seqs"], seq + 1).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deployed, report = slab.deploy(model, return_report=True)
    w4a8 = slab.quant.convert(copy.deepcopy(deployed), group_size=32 if args.quick else 64)
    cal = [held[:, :-1][:4]] if args.quick else [Grammar(20_000).tokens(8 * seq).view(8, seq).to(device)]
    sparsity = 0.5
    # CATS on the undeployed model: deploy folds each MLP norm into gate/up as a bias, and the fused
    # CATS decode kernel takes bias-free gate/up projections
    cats = slab.sparse.convert(copy.deepcopy(model), slab.sparse.calibrate(model, cal, sparsity=sparsity))
    variants = {"float": model, "deployed": deployed, "w4a8": w4a8, "cats": cats, "baseline": base}
    ppl = {k: perplexity(m, held) for k, m in variants.items()}
    inp = held[:, :-1][:8]

    def timer(m):
        def fn():
            with torch.inference_mode():
                m(inp)

        return fn

    secs = interleaved_median({k: timer(m) for k, m in variants.items()}, repeats=cfg["repeats"])
    notes = {
        "float": "PRepBN(RMSNorm) + causal SLA + gated MLP, " + type(opt).__name__,
        "deployed": f"slab.deploy: {report.summary()}",
        "w4a8": "deployed, every Linear W4A8 (group 64)",
        "cats": f"float + CATS MLPs (sparsity {sparsity}; norms kept so gate/up stay bias-free for the fused decode kernel); the decode model",
        "baseline": "RMSNorm + causal softmax SDPA + AdamW",
    }
    models = [
        {"name": k, "perplexity": ppl[k], "latency_ms": secs[k] * 1e3 / inp.numel(), "note": notes[k]} for k in variants
    ]

    say("timing decode (prefill, then greedy steps) ...", flush=True)
    stream = Grammar(30_000 + args.seed).tokens(max(cfg["contexts"])).to(device)
    decode = []
    for ctx in cfg["contexts"]:
        prompt = stream[:ctx].unsqueeze(0)
        s = decode_speed(cats, prompt, cfg["gen"])
        b = decode_speed(base, prompt, cfg["gen"])
        decode.append({"context": ctx, "slab_tokens_per_s": s, "softmax_kv_tokens_per_s": b})
        say(f"  context {ctx}: slab {s:.1f} tok/s, softmax+KV {b:.1f} tok/s", flush=True)
    return {
        "task": "lm",
        "train_seconds": train_s,
        "baseline_train_seconds": btrain_s,
        "models": models,
        "decode": decode,
        "steps": steps,
        "batch": batch,
        "seq": seq,
        "world_size": world.size,
        "sizes": sizes,
        "vocab": len(VOCAB),
        "prepbn": {"warm": warm, "decay_steps": decay},
        "cats_sparsity": sparsity,
        "decode_tokens": cfg["gen"],
        "deploy_report": report.summary(),
        "history": {"slab": hist, "baseline": bhist},
    }
