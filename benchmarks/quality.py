"""Quality of every selector, side by side: perplexity and a zero-shot multiple-choice task.

    python benchmarks/quality.py                      # SmolLM2-135M, the REFERENCE.md protocol
    python benchmarks/quality.py --methods shortgpt,sleb --budgets 3,9
    python benchmarks/quality.py --model path/or/hub-id --calib-samples 128 --calib-len 2048 \\
        --eval-samples 64 --eval-len 2048 --budgets 4,8 --tag mymodel

Protocol (../shared/REFERENCE.md, "Measured here"): calibration = the first 32 x 256
tokens of WikiText-2 valid.txt, evaluation = perplexity on the first 40 x 512 tokens of
test.txt, both tokenised with the model's tokenizer, fp32 on CPU. One statistics pass
(`collect_statistics`) serves every method; loss-judged selectors (sleb, and the
default `lorp` once it is registered) get `calibration_loss` on the first 8 calibration
windows (SLEB's 8 x 256 tokens). Each plan is applied with `remove_layers` (the same
surgery as a saved checkpoint) and evaluated.

The multiple-choice task needs no download. It is built from the evaluation text
(WikiText-2 test.txt by default): an item is a paragraph's text up to one of its
sentences (the context, its last `--mc-context-tokens` tokens) and four candidate
next sentences: the true one and three distractors of similar length (in words) drawn
from other articles of the file. The model picks the candidate with the highest
log-likelihood given the context (`acc`), or the highest mean log-likelihood per token
(`acc/tok`). Items, distractors and choice order come from `--mc-seed` alone, so every
run and every model sees the same items. Chance is 1 / choices.

Writes `<out-dir>/quality-<tag>.md` (tables, machine, commit, comparison with
REFERENCE.md), `quality-<tag>.png` (perplexity and accuracy against layers removed)
and, with `--json`, the raw results. The results file is rewritten after every
configuration, so a long run can be watched. A "## Notes" section that follows the
marker comment in an existing file is kept.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from lorp_fx import SELECTORS, select  # noqa: E402
from lorp_fx.arch.surgery import count_parameters, remove_layers  # noqa: E402
from lorp_fx.calibration.batches import token_batches  # noqa: E402
from lorp_fx.calibration.graph_observer import collect_statistics  # noqa: E402
from lorp_fx.core.names import compress, layer_index  # noqa: E402
from lorp_fx.io.text import text_windows  # noqa: E402
from lorp_fx.judge.loss import MemoLoss, calibration_loss  # noqa: E402
from lorp_fx.judge.perplexity import perplexity  # noqa: E402
from lorp_fx.selection.registry import (
    DEFAULT_SELECTOR,  # noqa: E402
    options_for,  # noqa: E402
)

DEFAULT_MODEL = "smollm2-135m"

# REFERENCE.md, "Measured here: SmolLM2-135M-Instruct": method -> budget -> (ppl, removed layers).
# Our selector names; "lorp-paper" is the table's "published LoRP".
REFERENCE_SMOLLM2 = {
    "dense": {0: (25.62, [])},
    "shortgpt": {3: (36.74, [13, 14, 25]), 6: (57.01, [12, 13, 14, 17, 25, 26]), 9: (110.28, [3, 12, 13, 14, 15, 16, 17, 25, 26])},
    "lorp-paper": {3: (50.55, [6, 17, 27]), 6: (8778, [5, 6, 17, 26, 27, 28]), 9: (15245, [4, 5, 6, 7, 17, 19, 26, 27, 28])},
    "streamline": {3: (39.04, [13, 14, 15]), 6: (65.15, list(range(13, 19))), 9: (212.7, list(range(10, 19)))},
    "uidl": {3: (39.04, [13, 14, 15]), 6: (65.15, list(range(13, 19))), 9: (212.7, list(range(10, 19)))},
    "sleb": {3: (36.15, [13, 14, 26]), 6: (57.01, [12, 13, 14, 17, 25, 26]), 9: (97.98, [3, 12, 13, 14, 16, 17, 18, 25, 26])},
    "uniform": {9: (73423, [1, 4, 8, 11, 14, 18, 21, 25, 28])},
    "last-n": {9: (3.2e8, list(range(20, 29)))},
}
# REFERENCE.md's SLEB selection times on an otherwise idle 2-core machine (seconds).
REFERENCE_SLEB_SECONDS = {3: 219, 9: 568}
REFERENCE_PROTOCOL = dict(calib_samples=32, calib_len=256, eval_samples=40, eval_len=512, loss_samples=8)


# --------------------------------------------------------------------------- multiple choice


@dataclass
class ChoiceItem:
    context: str
    choices: list[str]
    answer: int


_ARTICLE = re.compile(r"^ ?= [^=].* = ?$")
_HEADING = re.compile(r"^ ?=+ .* =+ ?$")
_SENTENCE_END = re.compile(r"(?<= [.!?]) (?=\S)")


def wikitext_articles(text: str) -> list[list[list[str]]]:
    """Articles -> paragraphs -> sentences of a raw WikiText file.

    An article starts at a ` = Title = ` line; section headings (` = = ... = = `) are
    dropped; a paragraph is one line; sentences end with a spaced ` . `, ` ? ` or ` ! `
    (WikiText writes decimal points as ` @.@ `, so these are real sentence ends).
    """
    articles: list[list[list[str]]] = []
    for line in text.split("\n"):
        stripped = line.strip()
        if not stripped:
            continue
        if _ARTICLE.match(line.rstrip("\n")) or (not articles and _HEADING.match(line)):
            articles.append([])
            continue
        if _HEADING.match(line):
            continue
        if not articles:
            articles.append([])
        articles[-1].append([s.strip() for s in _SENTENCE_END.split(stripped) if s.strip()])
    return [a for a in articles if a]


def build_multiple_choice(
    text: str, n_items: int, n_choices: int = 4, seed: int = 0, min_words: int = 6, max_words: int = 20
) -> list[ChoiceItem]:
    """Deterministic next-sentence items from a WikiText file (see the module docstring).

    A candidate answer is any sentence after the first of its paragraph with
    `min_words`..`max_words` words; distractors are sentences of other articles whose
    word count is within max(2, 25%) of the answer's. Everything is drawn from
    `random.Random(seed)` over lists in file order.
    """
    if n_choices < 2:
        raise ValueError("a multiple-choice item needs at least 2 choices")
    articles = wikitext_articles(text)
    if len(articles) < 2:
        raise ValueError("the multiple-choice task needs a text with at least two articles (' = Title = ' lines)")
    candidates, pool = [], []
    for a, article in enumerate(articles):
        for p, sentences in enumerate(article):
            for i, sentence in enumerate(sentences):
                words = len(sentence.split())
                if min_words <= words <= max_words:
                    pool.append((a, words, sentence))
                    if i > 0:
                        candidates.append((a, p, i))
    if len(candidates) < n_items:
        raise ValueError(f"the text has {len(candidates)} usable sentences, fewer than the {n_items} items asked for")
    rng = random.Random(seed)
    items = []
    for index in sorted(rng.sample(range(len(candidates)), n_items)):
        a, p, i = candidates[index]
        sentences = articles[a][p]
        answer = sentences[i]
        words = len(answer.split())
        slack = max(2, round(0.25 * words))
        others = [s for b, w, s in pool if b != a and abs(w - words) <= slack and s != answer]
        others = list(dict.fromkeys(others))
        if len(others) < n_choices - 1:
            raise ValueError(f"too few distractors of about {words} words in the text")
        choices = [answer, *rng.sample(others, n_choices - 1)]
        order = list(range(n_choices))
        rng.shuffle(order)
        items.append(ChoiceItem(" ".join(sentences[:i]), [choices[j] for j in order], order.index(0)))
    return items


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _cache_names(model) -> tuple[str, str]:
    """(input keyword, output attribute) of the KV cache: `cache` in transformers >= 5.24, else past_key_values."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    return ("cache", "cache") if "cache" in params else ("past_key_values", "past_key_values")


@torch.no_grad()
def multiple_choice_accuracy(model, tokenizer, items: list[ChoiceItem], max_context_tokens: int = 32) -> dict:
    """Accuracy of choosing each item's answer by log-likelihood of the continuation.

    The context (its last `max_context_tokens` tokens) runs once with the KV cache;
    the cache is repeated for the choices, which run as one right-padded batch (padding
    comes after the scored tokens, so the causal mask keeps it out of them). Returns
    acc (sum of log-probabilities), acc_norm (mean per token), n, chance.
    """
    was_training = model.training
    model.eval()
    cache_in, cache_out = _cache_names(model)
    correct = correct_norm = 0
    try:
        for item in items:
            context = _encode(tokenizer, " " + item.context)[-max_context_tokens:]
            options = [_encode(tokenizer, " " + choice) for choice in item.choices]
            device = next(model.parameters()).device
            out = model(input_ids=torch.tensor([context], device=device), use_cache=True)
            first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            cache = getattr(out, cache_out)
            cache.batch_repeat_interleave(len(options))
            width = max(len(o) for o in options)
            batch = torch.tensor([o + [o[-1]] * (width - len(o)) for o in options], device=device)
            rest = torch.log_softmax(model(input_ids=batch, use_cache=True, **{cache_in: cache}).logits.float(), dim=-1)
            sums, means = [], []
            for j, option in enumerate(options):
                total = float(first[option[0]])
                if len(option) > 1:
                    targets = torch.tensor(option[1:], device=device)
                    total += float(rest[j, : len(option) - 1].gather(-1, targets[:, None]).sum())
                sums.append(total)
                means.append(total / len(option))
            correct += int(max(range(len(sums)), key=sums.__getitem__) == item.answer)
            correct_norm += int(max(range(len(means)), key=means.__getitem__) == item.answer)
    finally:
        model.train(was_training)
    n = len(items)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n, "chance": 1 / len(items[0].choices)}


# --------------------------------------------------------------------------- running


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m, a checkpoint directory, a .gguf file or a hub id")
    p.add_argument("--tag", help="results name: quality-<tag>.md (default: smollm2 for the default model, else the model's name)")
    common.add_text_arguments(p, batch_help="windows per forward pass (statistics and perplexity)")
    p.add_argument("--loss-samples", type=int, default=8, help="calibration windows for loss-judged selectors (sleb, lorp)")
    p.add_argument("--loss-batch-size", type=int, default=4)
    p.add_argument("--no-loss-cache", action="store_true", help="recompute the loss of a removal set every time it is asked for")
    p.add_argument("--budgets", default="3,6,9", help="comma-separated numbers of layers to remove")
    p.add_argument("--methods", help="comma-separated selectors (default: every one in lorp_fx.SELECTORS)")
    p.add_argument("--skip", default="", help="comma-separated selectors to leave out")
    p.add_argument("--seed", type=int, default=0, help="seed for seeded selectors (random, clustering)")
    p.add_argument("--mc-file", type=Path, help="text the multiple-choice task is built from (default: --eval-file)")
    p.add_argument("--mc-items", type=int, default=200, help="multiple-choice items (0: skip the task)")
    p.add_argument("--mc-choices", type=int, default=4)
    p.add_argument("--mc-seed", type=int, default=0)
    p.add_argument("--mc-context-tokens", type=int, default=32)
    p.add_argument("--out-dir", type=Path, default=common.RESULTS)
    p.add_argument("--json", type=Path, help="also write the raw results as JSON here")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--lm-eval", metavar="TASKS", help="if lm-eval is installed: run these tasks on saved checkpoints (optional)")
    p.add_argument("--lm-eval-method", default="shortgpt", help="which method's pruned checkpoints --lm-eval runs on")
    p.add_argument("--merge", type=Path, metavar="JSON",
                   help="take the rows of methods this run leaves out from an earlier --json of the same protocol (marked)")
    p.add_argument("--render", type=Path, metavar="JSON", help="only rewrite the results file and plot from a --json of an earlier run")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice; 1 is far faster on a machine shared with other jobs)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("calib_file", "eval_file"):
        if getattr(args, name) is None:
            p.error(f"--{name.replace('_', '-')} is required: ../shared/data/wikitext-2 is absent")
    args.budgets = sorted({int(b) for b in args.budgets.split(",") if b.strip()})
    args.mc_file = args.mc_file or args.eval_file
    if args.tag is None:
        args.tag = "smollm2" if args.model == DEFAULT_MODEL else re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(str(args.model)).name)
    return args


def method_list(args) -> tuple[list[str], list[str]]:
    """(methods to run, notes about methods that are not there)."""
    skip = {m.strip() for m in args.skip.split(",") if m.strip()}
    notes = []
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        missing = [m for m in wanted if m not in SELECTORS]
        if missing:
            notes.append(f"not registered in lorp_fx.SELECTORS, not run: {', '.join(missing)}")
        methods = [m for m in wanted if m in SELECTORS]
    else:
        methods = list(SELECTORS)
    if "lorp" not in SELECTORS:
        notes.append(
            "the default selector `lorp` is not registered in lorp_fx.SELECTORS at this commit, so it was not run; "
            "rerun this script once it is (it picks every registered method up by itself)"
        )
    return [m for m in methods if m not in skip], notes


def main(argv=None, *, model=None, tokenizer=None) -> dict:
    """Run the benchmark; `model`/`tokenizer` may be given directly (tests), otherwise `--model` is loaded."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = common.machine(" ".join(["quality.py", *(sys.argv[1:] if argv is None else argv)]))
    progress = not args.quiet
    methods, method_notes = method_list(args)
    out_md = args.out_dir / f"quality-{args.tag}.md"
    out_png = args.out_dir / f"quality-{args.tag}.png"
    notes = common.kept_notes(out_md)
    if args.render:
        results = json.loads(args.render.read_text())
        common.write_text(out_md, render(results, args, notes))
        png = None if args.no_plot else plot(results, args)
        if png is not None:
            common.write_bytes(out_png, png)
        return results

    def log(message: str) -> None:
        print(f"[quality {time.strftime('%H:%M:%S')}] {message}", flush=True)

    if model is None:
        from lorp_fx.io.models import load_model

        log(f"loading {args.model}")
        model, tokenizer = load_model(args.model)
    model.eval()
    calib = text_windows(tokenizer, [args.calib_file], args.calib_samples, args.calib_len)
    evaluation = text_windows(tokenizer, [args.eval_file], args.eval_samples, args.eval_len)
    items = []
    if args.mc_items > 0:
        items = build_multiple_choice(args.mc_file.read_text(encoding="utf-8"), args.mc_items, args.mc_choices, args.mc_seed)

    results: dict = {
        "machine": info,
        "protocol": {
            "model": str(args.model), "calib_file": str(args.calib_file), "calib": [args.calib_samples, args.calib_len],
            "eval_file": str(args.eval_file), "eval": [args.eval_samples, args.eval_len], "loss_samples": args.loss_samples,
            "mc": {"file": str(args.mc_file), "items": len(items), "choices": args.mc_choices, "seed": args.mc_seed,
                   "context_tokens": args.mc_context_tokens},
            "budgets": args.budgets, "methods": methods, "seed": args.seed,
        },
        "notes": method_notes,
        "rows": [],
    }

    previous = _previous_run(args.merge, results) if args.merge else None

    def write() -> None:
        done = {(r["method"], r["budget"]) for r in results["rows"]}
        results["complete"] = all((m, b) in done for m in results["protocol"]["methods"] for b in args.budgets)
        common.write_text(out_md, render(results, args, notes))
        if args.json:
            common.write_text(args.json, json.dumps(results, indent=1))

    # One statistics pass for every method.
    batches = token_batches(calib, args.batch_size)
    log(f"statistics pass on {calib.shape[0]} x {calib.shape[1]} calibration tokens")
    start = time.perf_counter()
    stats, graph = collect_statistics(model, batches, progress=progress)
    results["statistics_seconds"] = time.perf_counter() - start
    results["n_blocks"] = stats.n_blocks
    results["blocks"] = list(stats.blocks)
    loss_windows = calib[: args.loss_samples]
    base_loss = calibration_loss(graph, token_batches(loss_windows, args.loss_batch_size))

    evaluated: dict[frozenset, dict] = {}

    def evaluate(remove: list[str]) -> dict:
        key = frozenset(remove)
        if key in evaluated:
            return {**evaluated[key], "reused": True}
        start = time.perf_counter()
        pruned = remove_layers(model, remove).model if remove else model
        entry = {"ppl": perplexity(pruned, evaluation, batch_size=args.batch_size, progress=progress),
                 "params": count_parameters(pruned)}
        if items:
            entry.update(multiple_choice_accuracy(pruned, tokenizer, items, args.mc_context_tokens))
        entry["eval_seconds"] = time.perf_counter() - start
        evaluated[key] = entry
        del pruned
        return {**entry, "reused": False}

    log("dense model")
    results["rows"].append({"method": "dense", "budget": 0, "removed": [], "selection_seconds": None, **evaluate([])})
    write()

    caches = {m: MemoLoss(base_loss, memoise=not args.no_loss_cache) if base_loss is not None else None for m in methods}
    for budget in args.budgets:
        for method in methods:
            cache = caches[method]
            asked, computed, seconds = (cache.asked, cache.computed, cache.compute_seconds) if cache else (0, 0, 0.0)
            log(f"{method}, remove {budget}")
            row = {"method": method, "budget": budget}
            start = time.perf_counter()
            try:
                plan = select(stats, budget, method=method, **options_for(method, loss_fn=cache, seed=args.seed))
            except Exception as error:  # noqa: BLE001 - one failing method must not stop the others
                row.update(error=f"{type(error).__name__}: {error}", selection_seconds=time.perf_counter() - start)
                log(f"  failed: {row['error']}")
                results["rows"].append(row)
                write()
                continue
            row["selection_seconds"] = time.perf_counter() - start
            row["remove_names"] = list(plan.remove)
            row["removed"] = [layer_index(n) for n in plan.remove]
            if plan.rls is not None:
                row["rls"] = float(plan.rls)
            if cache is not None and cache.asked > asked:
                new_asked, new_computed = cache.asked - asked, cache.computed - computed
                per_eval = (cache.compute_seconds - seconds) / new_computed if new_computed else cache.compute_seconds / max(cache.computed, 1)
                row["loss_evals"] = {"asked": new_asked, "computed": new_computed}
                row["cold_seconds_estimate"] = row["selection_seconds"] + (new_asked - new_computed) * per_eval
            row.update(evaluate(plan.remove))
            log(f"  removed {compress(row['removed'])}: ppl {row['ppl']:.2f}"
                + (f", mc acc {row['acc']:.3f}" if "acc" in row else "") + f", selection {row['selection_seconds']:.1f} s")
            results["rows"].append(row)
            write()

    if previous is not None:
        _merge(results, previous)
    if args.lm_eval:
        results["lm_eval"] = run_lm_eval(args, model, tokenizer, results, log)
    write()
    if not args.no_plot:
        png = plot(results, args)
        if png is not None:
            common.write_bytes(out_png, png)
    log(f"wrote {out_md}")
    return results


def _previous_run(path: Path, results: dict) -> dict:
    previous = json.loads(Path(path).read_text())
    strip = lambda protocol: {k: v for k, v in protocol.items() if k != "methods"}  # noqa: E731
    if strip(previous["protocol"]) != strip(results["protocol"]):
        raise SystemExit(f"--merge {path}: that run used another protocol ({previous['protocol']}), not {results['protocol']}")
    return previous


def _merge(results: dict, previous: dict) -> None:
    """Add the earlier run's rows of the methods this run did not run, marked with where they come from."""
    ran = set(results["protocol"]["methods"])
    taken = [m for m in previous["protocol"]["methods"] if m not in ran]
    source = f"commit {previous['machine']['commit']}, {previous['machine']['date']}"
    for row in previous["rows"]:
        if row["method"] in taken:
            results["rows"].append({**row, "from": source})
    if taken:
        results["protocol"]["methods"] = [*previous["protocol"]["methods"], *[m for m in results["protocol"]["methods"] if m not in previous["protocol"]["methods"]]]
        results["merged"] = {"methods": taken, "from": source, "machine": previous["machine"]}
    order = {m: i for i, m in enumerate(results["protocol"]["methods"])}
    results["rows"].sort(key=lambda r: (r["budget"], -1 if r["method"] == "dense" else order.get(r["method"], len(order))))


# --------------------------------------------------------------------------- optional lm-eval


def run_lm_eval(args, model, tokenizer, results, log) -> dict:
    """lm-eval on saved dense and pruned checkpoints, if it is installed; nothing else depends on it."""
    if importlib.util.find_spec("lm_eval") is None:
        return {"status": "lm-eval is not installed (pip install lm-eval); skipped"}
    from lorp_fx.io.checkpoint import save_pretrained_atomic

    out = {}
    rows = [r for r in results["rows"] if r["method"] in ("dense", args.lm_eval_method) and "error" not in r]
    with tempfile.TemporaryDirectory(prefix="lorp-quality-") as tmp:
        for row in rows:
            label = f"{row['method']}-{row['budget']}"
            path = Path(tmp) / label
            save_pretrained_atomic(remove_layers(model, row.get("remove_names", [])).model if row["budget"] else model, tokenizer, path)
            command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={path},dtype=float32",
                       "--tasks", args.lm_eval, "--device", "cpu", "--batch_size", "4"]
            log(f"lm-eval on {label}")
            done = subprocess.run(command, capture_output=True, text=True)
            out[label] = done.stdout[-3000:] if done.returncode == 0 else f"failed ({done.returncode}): {done.stderr[-1500:]}"
    return out


# --------------------------------------------------------------------------- rendering


def _reference_applies(results: dict, args) -> bool:
    protocol = results["protocol"]
    return (
        protocol["model"] == DEFAULT_MODEL
        and protocol["calib"] == [REFERENCE_PROTOCOL["calib_samples"], REFERENCE_PROTOCOL["calib_len"]]
        and protocol["eval"] == [REFERENCE_PROTOCOL["eval_samples"], REFERENCE_PROTOCOL["eval_len"]]
        and protocol["loss_samples"] == REFERENCE_PROTOCOL["loss_samples"]
        and Path(protocol["calib_file"]).name == "valid.txt"
        and Path(protocol["eval_file"]).name == "test.txt"
    )


def _ref_ppl(value: float) -> str:
    """A REFERENCE.md perplexity as the file writes it (212.7, 8,778, 3.2e+08)."""
    return f"{value:.1e}" if value >= 1e5 else f"{value:,}"


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def render(results: dict, args, notes: str | None) -> str:
    rows = results["rows"]
    protocol = results["protocol"]
    n = results.get("n_blocks", "?")
    dense = rows[0] if rows else {}
    out = [f"# Quality: every selector on {protocol['model']}", ""]
    if not results.get("complete"):
        out += ["**Run in progress: the tables below are partial.**", ""]
    out += [
        "Written by `benchmarks/quality.py` from one run; do not edit the numbers by hand.",
        "",
        common.machine_markdown(results["machine"]),
        f"- calibration: the first {protocol['calib'][0]} x {protocol['calib'][1]} tokens of `{Path(protocol['calib_file']).name}`; "
        f"one statistics pass for all methods ({common.fmt_seconds(results.get('statistics_seconds'))} s, including the torch.export trace)",
        f"- evaluation: perplexity on the first {protocol['eval'][0]} x {protocol['eval'][1]} tokens of `{Path(protocol['eval_file']).name}`, fp32, "
        "each plan applied with `lorp_fx.arch.surgery.remove_layers` (the saved-checkpoint surgery)",
        f"- loss-judged selectors: `calibration_loss` on the first {protocol['loss_samples']} calibration windows",
    ]
    mc = protocol["mc"]
    if mc["items"]:
        out.append(
            f"- multiple choice: {mc['items']} next-sentence items x {mc['choices']} choices built from "
            f"`{Path(mc['file']).name}` (seed {mc['seed']}, context <= {mc['context_tokens']} tokens, distractors from "
            f"other articles with similar length); chance {_pct(1 / mc['choices'])}. `acc`: sum of log-probabilities, "
            "`acc/tok`: mean per token"
        )
    for note in results.get("notes", []):
        out.append(f"- note: {note}")
    merged = results.get("merged")
    if merged:
        out.append(f"- rows marked † ({', '.join(merged['methods'])}) come from an earlier run of the same protocol "
                   f"({merged['from']}, load average {merged['machine'].get('load_average_at_start')}); its selection times are that machine's")
    marked = set(merged["methods"]) if merged else set()

    def label(method: str) -> str:
        return f"{method} †" if method in marked else method

    out.append("")

    # Pivot: perplexity per method and budget, like REFERENCE.md's table.
    budgets = protocol["budgets"]
    by = {(r["method"], r["budget"]): r for r in rows}
    out += ["## Perplexity (removed layers)", ""]
    if dense:
        out += [f"Dense: **{common.fmt_ppl(dense.get('ppl'))}**"
                + (f", multiple-choice acc {_pct(dense.get('acc'))} (acc/tok {_pct(dense.get('acc_norm'))})" if "acc" in dense else "")
                + f", {dense.get('params', 0):,} parameters.", ""]
    header = ["method"] + [f"{b} of {n}" for b in budgets]

    def grid(cell) -> str:
        """One row per method, one column per budget; `cell(row or None)` fills it."""
        return common.table(header, [[label(m), *(cell(by.get((m, b))) for b in budgets)] for m in protocol["methods"]])

    def ppl_cell(r) -> str:
        if r is None:
            return ""
        return "failed" if "error" in r else f"{common.fmt_ppl(r['ppl'])} [{compress(r['removed'])}]"

    out += [grid(ppl_cell), ""]

    if mc["items"]:
        out += ["## Multiple-choice accuracy (acc / acc per token)", ""]
        p = dense.get("acc", 0.5)
        se = math.sqrt(p * (1 - p) / max(mc["items"], 1))
        out += [f"Dense: {_pct(dense.get('acc'))} / {_pct(dense.get('acc_norm'))}; chance {_pct(1 / mc['choices'])}. "
                f"With {mc['items']} items one accuracy has a binomial standard error of about {100 * se:.1f} points, "
                "so differences of a few points between methods are noise.", "",
                grid(lambda r: "" if r is None or "acc" not in r else f"{_pct(r['acc'])} / {_pct(r['acc_norm'])}"), ""]

    out += default_against_published(rows, label)
    out += ["## All rows", ""]
    header = ["method", "removed", "layers", "ppl", "mc acc", "mc acc/tok", "parameters", "selection s", "loss evals (computed / asked)", "cold selection s (est.)"]
    table_rows = []
    for r in rows:
        if "error" in r:
            table_rows.append([label(r["method"]), r["budget"], f"failed: {r['error']}", "", "", "", "", common.fmt_seconds(r.get("selection_seconds")), "", ""])
            continue
        evals = r.get("loss_evals")
        table_rows.append([
            label(r["method"]), r["budget"], compress(r["removed"]), common.fmt_ppl(r.get("ppl")), _pct(r.get("acc")),
            _pct(r.get("acc_norm")), f"{r.get('params', 0):,}", common.fmt_seconds(r.get("selection_seconds")),
            f"{evals['computed']} / {evals['asked']}" if evals else "",
            common.fmt_seconds(r.get("cold_seconds_estimate")) if evals and evals["computed"] != evals["asked"] else "",
        ])
    out += [common.table(header, table_rows), ""]
    out += [
        "Selection time is wall time of `select` on this (shared) machine, after the shared statistics pass. "
        "Loss-judged selectors memoise the loss of each removal set per method, so a larger budget reuses the greedy "
        "steps of a smaller one; the cold estimate adds the reused evaluations at this run's mean cost per evaluation.",
        "",
    ]

    if _reference_applies(results, args):
        out += ["## Against REFERENCE.md", ""]
        header = ["method", "removed", "ours: ppl [layers]", "REFERENCE: ppl [layers]", "verdict"]
        comparisons = []
        for method, cells in REFERENCE_SMOLLM2.items():
            for budget, (ref_ppl, ref_layers) in cells.items():
                r = by.get((method, budget))
                if r is None or "error" in r:
                    continue
                same_layers = sorted(r["removed"]) == sorted(ref_layers)
                rel = abs(r["ppl"] - ref_ppl) / ref_ppl
                # REFERENCE rounds to 4 significant figures (2 for 3.2e8).
                close = rel <= (0.06 if ref_ppl >= 1e5 else 0.001)
                verdict = ("agrees" if close else f"same layers, ppl differs by {100 * rel:.2f}%") if same_layers else (
                    f"different layers; ppl {'agrees' if close else f'differs by {100 * rel:.1f}%'}")
                comparisons.append([label(method), budget, f"{common.fmt_ppl(r['ppl'])} [{compress(r['removed'])}]",
                                    f"{_ref_ppl(ref_ppl)} [{compress(ref_layers)}]", verdict])
        out += [common.table(header, comparisons), ""]
        sleb = [r for r in rows if r["method"] == "sleb" and "error" not in r]
        if sleb:
            timing = ", ".join(
                f"k={r['budget']}: {common.fmt_seconds(r['selection_seconds'])} s"
                + (f" (cold estimate {common.fmt_seconds(r['cold_seconds_estimate'])} s)" if r.get("loss_evals") and r["loss_evals"]["computed"] != r["loss_evals"]["asked"] else "")
                for r in sleb
            )
            ref = ", ".join(f"k={k}: {v} s" for k, v in REFERENCE_SLEB_SECONDS.items())
            out += [f"SLEB selection time here: {timing}; REFERENCE (idle machine): {ref}.", ""]
    elif protocol["model"] == DEFAULT_MODEL:
        out += ["The protocol differs from REFERENCE.md's, so its cells are not compared.", ""]

    if results.get("lm_eval"):
        out += ["## lm-eval (optional)", "", "```", json.dumps(results["lm_eval"], indent=1)[:6000], "```", ""]
    if Path(args.out_dir / f"quality-{args.tag}.png").exists() or not args.no_plot:
        out += [f"![perplexity and accuracy against layers removed](quality-{args.tag}.png)", ""]
    if notes:
        out += [notes.rstrip(), ""]
    else:
        out += [common.NOTES_HEADING, "", common.NOTES_MARKER, "", "(none yet)", ""]
    return "\n".join(out)


PUBLISHED = ("lorp-paper", "shortgpt", "uidl", "streamline", "sleb")


def _cold_seconds(row: dict) -> float:
    """Selection time as if no loss had been cached from a smaller budget of the same method."""
    evals = row.get("loss_evals")
    return row["cold_seconds_estimate"] if evals and evals["computed"] != evals["asked"] else row["selection_seconds"]


def default_against_published(rows: list[dict], label) -> list[str]:
    """Issue 7's test: the default's perplexity against the best published selector, and its
    selection time against SLEB's when both ran in this run (same machine, same load)."""
    ok = {(r["method"], r["budget"]): r for r in rows if "error" not in r and r["method"] != "dense"}
    budgets = sorted({b for _, b in ok})
    table = []
    for b in budgets:
        mine = ok.get((DEFAULT_SELECTOR, b))
        published = [ok[(m, b)] for m in PUBLISHED if (m, b) in ok]
        if mine is None or not published:
            continue
        best = min(published, key=lambda r: r["ppl"])
        sleb = ok.get(("sleb", b))
        same_run = sleb is not None and "from" not in sleb and "from" not in mine
        ratio = f"{_cold_seconds(mine) / _cold_seconds(sleb):.3f}" if same_run and _cold_seconds(sleb) > 0 else "n/a"
        verdict = "better" if mine["ppl"] < best["ppl"] - 1e-9 else ("equal" if abs(mine["ppl"] - best["ppl"]) <= 1e-9 * best["ppl"] else "worse")
        table.append([b, f"{common.fmt_ppl(mine['ppl'])}", f"{common.fmt_ppl(best['ppl'])} ({label(best['method'])})", verdict,
                      common.fmt_seconds(_cold_seconds(mine)), common.fmt_seconds(_cold_seconds(sleb)) if sleb else "", ratio])
    if not table:
        return []
    header = ["removed", f"{DEFAULT_SELECTOR} ppl", "best published ppl", "default is", f"{DEFAULT_SELECTOR} selection s",
              "sleb selection s", "time ratio"]
    return [f"## The default (`{DEFAULT_SELECTOR}`) against the best published selector", "",
            f"Best of {', '.join(PUBLISHED)} at each budget. Selection times are cold (losses a smaller budget of the same "
            "method had already measured are counted at this run's mean cost per measurement); the ratio is given only "
            "when both ran in this run.", "", common.table(header, table), ""]


def plot(results: dict, args) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    rows = [r for r in results["rows"] if "error" not in r]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    has_mc = dense is not None and "acc" in dense
    fig, axes = plt.subplots(1, 2 if has_mc else 1, figsize=(12 if has_mc else 7, 5), dpi=110, squeeze=False)
    markers = "osD^v<>pPX*h"
    for i, method in enumerate(results["protocol"]["methods"]):
        points = sorted((r["budget"], r) for r in rows if r["method"] == method)
        if not points:
            continue
        if dense is not None:
            points = [(0, dense), *points]
        xs = [b for b, _ in points]
        style = dict(marker=markers[i % len(markers)], label=method, lw=2.2 if method in ("lorp", "sleb") else 1.3)
        axes[0][0].plot(xs, [r["ppl"] for _, r in points], **style)
        if has_mc:
            axes[0][1].plot(xs, [100 * r["acc"] for _, r in points], **style)
    n = results.get("n_blocks", "?")
    ax = axes[0][0]
    ax.set_yscale("log")
    ax.set_xlabel(f"layers removed (of {n})")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"{results['protocol']['model']}: perplexity, {Path(results['protocol']['eval_file']).name}")
    ax.set_xticks([0, *results["protocol"]["budgets"]])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if has_mc:
        ax = axes[0][1]
        ax.axhline(100 * dense["chance"], color="grey", ls="--", lw=1, label="chance")
        ax.set_xlabel(f"layers removed (of {n})")
        ax.set_ylabel("multiple-choice accuracy (%)")
        ax.set_title(f"next-sentence choice, {dense['n']} items")
        ax.set_xticks([0, *results["protocol"]["budgets"]])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return common.png_bytes(fig)


if __name__ == "__main__":
    main()
