"""Healing SmolLM2 after pruning: perplexity against healing steps, per choice of what trains, on three texts.

    python benchmarks/heal.py row --budget 9 --train gaps --steps 1000 --eval-at 100,300   # one grid row
    python benchmarks/heal.py cli --budget 9                 # the command line's --heal defaults (the targets)
    python benchmarks/heal.py cli --budget 9 --self-text     # the same, data-free: the model's own text
    python benchmarks/heal.py dense --steps 300              # reference: the dense model fine-tuned on the same text
    python benchmarks/heal.py pass                           # one pass with 1 and 2 threads (minutes from passes)
    python benchmarks/heal.py render                         # benchmarks/results/heal-smollm2.md from the rows

Protocol (issue 25; the quality benchmark's): prune with `lorp-fx prune --remove K
--calib-file valid.txt` (the first 32 x 256 tokens of WikiText-2 validation), heal on
WikiText-2 validation text, never on test. Perplexity, fp32 on the CPU, on

* `wikitext2-test`: the first 40 x 512 tokens of WikiText-2 test.txt (the quality protocol);
* `wikitext2-valid-tail`: the last 40 x 512 tokens of valid.txt, which no row heals on
  (`row` and `dense` heal on valid.txt without them; `cli` rows heal on the whole file
  with their own held-out tail, and report that too);
* `python-stdlib`: the first 40 x 512 tokens of a fixed list of Python standard-library
  modules: a text domain in neither the healing nor the calibration text.

Each row runs in its own process (`row`, `dense`; `cli` runs the real command), so its
peak RSS is its own. Time is given in seconds and in passes: one pass is one plain
forward of the dense model over the calibration tokens (32 x 256), timed in the same
process (`cli`: the command's own unit). Evaluations made during a run (`--eval-at`)
are excluded from its time. A point of `--eval-at` is the state of that run at that
step: its learning rate follows the schedule of the whole run, not of a shorter one.
Rows are appended to `benchmarks/results/heal-smollm2.jsonl`; `render` writes the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

ROWS = common.RESULTS / "heal-smollm2.jsonl"
OUT = common.RESULTS / "heal-smollm2.md"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
STDLIB = ["argparse.py", "dataclasses.py", "textwrap.py", "pathlib.py", "json/decoder.py", "json/encoder.py",
          "functools.py", "tempfile.py", "shutil.py", "inspect.py"]
EVALS = ("wikitext2-test", "wikitext2-valid-tail", "python-stdlib")


def log(message: str) -> None:
    print(f"[heal-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- texts


def stdlib_text() -> str:
    folder = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((folder / name).read_text(encoding="utf-8") for name in STDLIB)


def eval_windows(tokenizer, samples: int, length: int) -> dict[str, torch.Tensor]:
    """The three evaluation texts as (samples, length) windows (module docstring)."""
    def cut(ids, tail=False):
        needed = samples * length
        chosen = ids[-needed:] if tail else ids[:needed]
        return torch.tensor(chosen, dtype=torch.long).view(samples, length)

    encode = lambda text: tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return {
        "wikitext2-test": cut(encode((DATA / "test.txt").read_text(encoding="utf-8"))),
        "wikitext2-valid-tail": cut(encode((DATA / "valid.txt").read_text(encoding="utf-8")), tail=True),
        "python-stdlib": cut(encode(stdlib_text())),
    }


def healing_windows(tokenizer, seq_len: int, tail_tokens: int) -> torch.Tensor:
    """valid.txt without its last `tail_tokens` tokens (the held-out evaluation tail), in windows."""
    ids = tokenizer((DATA / "valid.txt").read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)["input_ids"]
    ids = ids[: len(ids) - tail_tokens]
    count = len(ids) // seq_len
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


# ----------------------------------------------------------------------------- measuring


def perplexities(model, evals: dict, names: list[str]) -> dict[str, float]:
    from lorp_fx.judge.perplexity import perplexity

    return {name: round(perplexity(model, evals[name], batch_size=4, progress=False), 3) for name in names}


@torch.no_grad()
def pass_seconds(model, tokenizer) -> float:
    """One pass: a plain forward over 32 x 256 calibration tokens, from the median of 3 forwards of 4 x 256."""
    ids = tokenizer((DATA / "valid.txt").read_text(encoding="utf-8")[:20000], add_special_tokens=False)["input_ids"]
    batch = torch.tensor(ids[:1024], dtype=torch.long).view(4, 256)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        model(input_ids=batch, use_cache=False)
        times.append(time.perf_counter() - start)
    return sorted(times)[1] * 8


def peak_rss_mib(children: bool = False) -> float:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)


def pruned_model(budget: int, cache: Path):
    """The model `lorp-fx prune --remove budget --calib-file valid.txt` writes (made once, then read from `cache`)."""
    from transformers import AutoModelForCausalLM

    folder = cache / f"pruned-{budget}"
    if not (folder / "plan.json").exists():
        log(f"pruning {budget} of 30 into {folder}")
        command = [sys.executable, "-m", "lorp_fx.cli", "prune", "--remove", str(budget), "--calib-file",
                   str(DATA / "valid.txt"), "--out", str(folder), "--no-gguf", "--overwrite"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), folder


class EvalAt:
    """A Lightning callback measuring perplexity at given steps; its own time is kept apart."""

    def __new__(cls, steps, evals, names, record):
        import lightning as L

        class Callback(L.Callback):
            seconds = 0.0

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step in steps:
                    start = time.perf_counter()
                    record[trainer.global_step] = perplexities(pl_module.model, evals, names)
                    log(f"step {trainer.global_step}: {record[trainer.global_step]}")
                    Callback.seconds += time.perf_counter() - start

        return Callback()


# ----------------------------------------------------------------------------- rows


def run_row(args) -> dict:
    """One configuration: heal the cached pruned model (or the dense one with --budget 0), measure, return the row."""
    import lorp_fx
    from lorp_fx.core.plan import PruningPlan
    from lorp_fx.io.models import load_model

    torch.set_num_threads(args.threads)
    teacher, tokenizer = load_model("smollm2-135m")
    evals = eval_windows(tokenizer, args.eval_samples, args.eval_len)
    names = args.evals.split(",")
    unit = pass_seconds(teacher, tokenizer)
    student, folder = pruned_model(args.budget, Path(args.cache))
    plan = PruningPlan.load(folder / "plan.json")
    record = {0: perplexities(student, evals, names)} if args.eval_zero else {}
    at = {int(s) for s in args.eval_at.split(",") if s} if args.eval_at else set()
    callback = EvalAt(at, evals, names, record)
    data = None if args.self_text else healing_windows(tokenizer, args.seq_len, args.eval_samples * args.eval_len)
    config = lorp_fx.HealConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, train=args.train,
                                lr=args.lr, hidden_weight=args.hidden_weight, seed=args.seed)
    healed = lorp_fx.heal(student, teacher, data, config, plan=plan, tokenizer=tokenizer, progress=not args.quiet,
                          callbacks=[callback], pass_unit={"seconds": unit, "tokens": 8192})
    record[args.steps] = perplexities(healed.model, evals, names)
    report = healed.report
    seconds = report["seconds"] - type(callback).seconds
    return {
        "kind": "row", "budget": args.budget, "removed": plan.remove, "train": args.train, "steps": args.steps,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": config.learning_rate,
        "hidden_weight": args.hidden_weight, "text": "self" if args.self_text else "wikitext2-valid",
        "ppl": {str(k): v for k, v in sorted(record.items())}, "seconds": round(seconds, 1),
        "passes": round(seconds / unit, 2), "pass_seconds": round(unit, 2), "peak_rss_mib": peak_rss_mib(),
        "tokens": report["tokens"], "held_out": report["held_out"], "teacher": report["teacher"]["outputs"],
        "threads": args.threads, "tag": args.tag,
    }


def run_cli(args) -> dict:
    """The command line's `--heal` (its defaults unless given), run as the user runs it, then measured."""
    from transformers import AutoModelForCausalLM

    from lorp_fx.io.models import load_model

    out = Path(args.cache) / f"cli-{args.budget}{'-self' if args.self_text else ''}{args.tag and '-' + args.tag}"
    command = [sys.executable, "-m", "lorp_fx.cli", "prune", "--remove", str(args.budget), "--heal", "--out", str(out),
               "--overwrite", "--no-gguf", "--eval-file", str(DATA / "test.txt"), *args.extra]
    if not args.self_text:
        command += ["--calib-file", str(DATA / "valid.txt")]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log(" ".join(command))
    output = out.with_name(out.name + ".log")  # the command's progress bars and summary, to watch a long run
    start = time.perf_counter()
    with output.open("w", encoding="utf-8") as stream:
        done = subprocess.run(command, env=env, stdout=stream, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"lorp-fx failed ({done.returncode}); see {output}")
    report = json.loads((out / "report.json").read_text())
    torch.set_num_threads(args.threads)
    _, tokenizer = load_model("smollm2-135m")
    evals = eval_windows(tokenizer, args.eval_samples, args.eval_len)
    names = args.evals.split(",")
    healed = AutoModelForCausalLM.from_pretrained(out).eval()
    unhealed, _ = pruned_model(args.budget, Path(args.cache))
    healing = report["healing"]
    return {
        "kind": "cli", "budget": args.budget, "removed": report["removed"], "train": healing["train"],
        "steps": healing["steps"], "batch_size": healing["config"]["batch_size"], "seq_len": healing["seq_len"],
        "lr": healing["learning_rate"], "hidden_weight": healing["config"]["hidden_weight"],
        "text": "self" if args.self_text else "wikitext2-valid", "command": " ".join(command[2:]),
        "ppl": {"0": perplexities(unhealed, evals, names), str(healing["steps"]): perplexities(healed, evals, names)},
        "evaluation": report["evaluation"], "seconds": healing["seconds"], "passes": healing["passes"],
        "pass_seconds": round(report["pass_unit"]["seconds"], 2), "peak_rss_mib": peak_rss_mib(children=True),
        "wall_seconds": round(wall, 1), "timings": report["timings"], "tokens": healing["tokens"],
        "held_out": healing["held_out"], "teacher": healing["teacher"]["outputs"], "threads": args.threads,
        "tag": args.tag,
    }


def run_dense(args) -> dict:
    """Reference: the dense model fine-tuned on the same text with next-token cross-entropy (distilling the dense
    model from itself changes nothing: its KL is 0 at the start, so every gradient is 0), with healing's data
    order, optimizer, schedule and trained parts (`--train all` or `lora`)."""
    import torch.nn.functional as F

    import lorp_fx
    from lorp_fx.healing.data import step_windows
    from lorp_fx.healing.module import warmup_cosine
    from lorp_fx.healing.trainable import finish, prepare
    from lorp_fx.io.models import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m")
    evals = eval_windows(tokenizer, args.eval_samples, args.eval_len)
    names = args.evals.split(",")
    unit = pass_seconds(model, tokenizer)
    record = {0: perplexities(model, evals, names)} if args.eval_zero else {}
    windows = healing_windows(tokenizer, args.seq_len, args.eval_samples * args.eval_len)[:-8]  # as heal holds out 8
    config = lorp_fx.HealConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, train=args.train,
                                lr=args.lr, seed=args.seed)
    trainable = prepare(model, None, None, config)
    parameters = [p for p in trainable.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.steps))
    at = {int(s) for s in args.eval_at.split(",") if s} if args.eval_at else set()
    start, evaluating = time.perf_counter(), 0.0
    for step in range(config.steps):
        batch = windows[step_windows(step, len(windows), config.batch_size, 1, 0, config.seed)]
        logits = trainable.module(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        if step + 1 in at:
            begin = time.perf_counter()
            record[step + 1] = perplexities(trainable.module, evals, names)
            evaluating += time.perf_counter() - begin
            log(f"dense step {step + 1}: {record[step + 1]}")
    model = finish(trainable, model)
    seconds = time.perf_counter() - start - evaluating
    record[config.steps] = perplexities(model, evals, names)
    return {
        "kind": "dense", "budget": 0, "removed": [], "train": args.train, "steps": args.steps,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": config.learning_rate, "hidden_weight": 0.0,
        "text": "wikitext2-valid", "loss": "next-token cross-entropy", "ppl": {str(k): v for k, v in sorted(record.items())},
        "seconds": round(seconds, 1), "passes": round(seconds / unit, 2), "pass_seconds": round(unit, 2),
        "peak_rss_mib": peak_rss_mib(), "tokens": args.steps * args.batch_size * args.seq_len, "threads": args.threads,
        "tag": args.tag,
    }


def run_pass(args) -> dict:
    """The pass with 1 and with 2 torch threads, alternated (median of 5 each), and the load around it: what turns
    a healing cost in passes into minutes on these 2 cores."""
    from lorp_fx.io.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    load = os.getloadavg()
    seconds: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(5):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            seconds[threads].append(pass_seconds(model, tokenizer))
    return {"kind": "pass", "seconds": {str(k): round(sorted(v)[2], 2) for k, v in seconds.items()},
            "load_average": [round(x, 2) for x in (*load, *os.getloadavg())], "tag": args.tag}


# ----------------------------------------------------------------------------- the results file


TARGETS = {9: 36.0, 6: 31.0}  # issue 25: WikiText-2 test after --heal with its defaults


def held_out(row: dict, step: str) -> str:
    """Held-out WikiText: the valid.txt tail no row heals on; for a `cli` row (which heals on the whole file, tail
    included) the windows the command itself held out (8 x 256 tokens), marked with *."""
    if row["kind"] != "cli":
        return common.fmt_ppl(row["ppl"][step].get("wikitext2-valid-tail"))
    value = row["held_out"]["ppl_before" if step == "0" else "ppl_after"]
    return f"{common.fmt_ppl(value)}*"


def table_rows(rows: list[dict]) -> list[list]:
    out = []
    for row in (r for r in rows if r["kind"] != "pass"):
        for step, ppl in row["ppl"].items():
            last = int(step) == row["steps"]
            removed = f"{row['budget']} of 30" if row["budget"] else "dense"
            out.append([row["kind"], removed, row["train"], row["text"], row["lr"], f"{row['batch_size']} x {row['seq_len']}",
                        step, common.fmt_ppl(ppl.get("wikitext2-test")), held_out(row, step),
                        common.fmt_ppl(ppl.get("python-stdlib")), row["seconds"] if last else "",
                        row["passes"] if last else "", row["threads"], row["peak_rss_mib"] if last else "", row.get("tag", "")])
    return out


def target_lines(rows: list[dict], passes: dict | None) -> list[str]:
    """Each issue-25 target against the `cli` rows that measure it (the latest of each)."""
    latest = {(r["budget"], r["text"]): r for r in rows if r["kind"] == "cli" and r.get("tag", "") in ("", "default")}  # no --tag: the defaults
    lines = []
    for (budget, text), row in sorted(latest.items()):
        before, after = row["ppl"]["0"], row["ppl"][str(row["steps"])]
        test = after["wikitext2-test"]
        # Data-free rows prune with the command's own calibration (other layers than the cached `pruned_model`, whose
        # perplexity is step 0): their unhealed baseline is the command's own evaluation of its pruned model.
        unhealed = before["wikitext2-test"] if text == "wikitext2-valid" else row["evaluation"]["ppl_after"]
        target = TARGETS.get(budget) if text == "wikitext2-valid" else unhealed
        what = f"<= {target}" if text == "wikitext2-valid" else f"not worse than its own unhealed model ({unhealed:.2f})"
        verdict = "met" if target is not None and test <= target else "NOT met"
        other = after["python-stdlib"] <= before["python-stdlib"]
        minutes = ""
        if passes:
            minutes = (f"; {row['passes']:.1f} passes = {row['passes'] * passes['2'] / 60:.1f} min at the 2-thread pass "
                       f"({passes['2']:.1f} s), {row['passes'] * passes['1'] / 60:.1f} min at the 1-thread one")
        lines.append(f"- **{budget} of 30, healing text {text}**: WikiText-2 test {before['wikitext2-test']:.2f} -> "
                     f"{test:.2f} (target {what}: {verdict}); Python stdlib {before['python-stdlib']:.2f} -> "
                     f"{after['python-stdlib']:.2f} ({'not worse' if other else 'WORSE'}); healing {row['seconds']:.0f} s "
                     f"with {row['threads']} thread(s) on the shared machine{minutes}.")
    return lines or ["- no `cli` row yet"]


PLOT = common.RESULTS / "heal-smollm2.png"
GRID_STEPS = ("0", "100", "300", "1000")
TEXT_NAMES = {"wikitext2-test": "WikiText-2 test", "wikitext2-valid-tail": "held-out WikiText",
              "python-stdlib": "Python stdlib"}


def grid_rows(rows: list[dict]) -> list[dict]:
    """The curve runs (`--tag grid`: 1,000 steps measured at 0, 100 and 300 on the way), latest per configuration."""
    latest = {(r["kind"], r["budget"], r["train"]): r for r in rows if r.get("tag") == "grid" and r["kind"] != "pass"}
    return sorted(latest.values(), key=lambda r: (r["budget"] == 0, -r["budget"], r["train"]))


def grid_label(row: dict) -> str:
    return f"dense, {row['train']} (cross-entropy)" if row["kind"] == "dense" else f"{row['budget']} of 30, {row['train']}"


def load_at_end(row: dict) -> str:
    """The 1-minute load average when the run ended: above its own threads, other work shared the 2 cores and its
    seconds and passes are high (rows written before the field existed have none)."""
    load = row.get("load_average_at_end")
    return f"{load[0]:.1f}" if load else ""


def grid_lines(rows: list[dict]) -> list[str]:
    """One table per text: perplexity at 0, 100, 300 and 1,000 steps for each configuration of the curve."""
    grid = grid_rows(rows)
    if not grid:
        return ["No curve run yet (`heal.py row --steps 1000 --eval-at 100,300 --eval-zero --tag grid`)."]
    lines = []
    for text, name in TEXT_NAMES.items():
        table = [[grid_label(r), *(common.fmt_ppl(r["ppl"].get(s, {}).get(text)) for s in GRID_STEPS),
                  r["seconds"], r["passes"], r["threads"], load_at_end(r), r["peak_rss_mib"]] for r in grid]
        lines += [f"### {name}", "", common.table(["run", *(f"step {s}" for s in GRID_STEPS), "seconds (1,000 steps)",
                                                    "passes", "threads", "load at end", "peak RSS MiB"], table), ""]
    for dense in (r for r in grid if r["kind"] == "dense"):
        last = str(dense["steps"])
        moved = "; ".join(f"{name} {dense['ppl']['0'][text]:.2f} -> {dense['ppl'][last][text]:.2f}"
                          for text, name in TEXT_NAMES.items() if text in dense["ppl"].get("0", {}))
        lines += [(f"The dense model fine-tuned the same way ({dense['train']}, {last} steps): {moved}. That much of a "
                   "gain on WikiText needs no pruning at all: it is adaptation to the healing text's domain, not repair. "
                   "Python stdlib, in neither text, is the measure of repair."), ""]
    missing = [f"{b} of 30, {t}" for b in (9, 6) for t in ("gaps", "lora", "all")
               if not any(r["kind"] == "row" and r["budget"] == b and r["train"] == t for r in grid)]
    if not any(r["kind"] == "dense" for r in grid):
        missing.append("the dense reference")
    if missing:
        lines += [f"Not measured yet: {', '.join(missing)}.", ""]
    return lines


def plot(rows: list[dict]) -> bytes | None:
    """Perplexity against healing steps, one panel per text (log scales), from the curve runs."""
    grid = grid_rows(rows)
    if not grid:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, len(TEXT_NAMES), figsize=(15, 4.6), dpi=110)
    for ax, (text, name) in zip(axes, TEXT_NAMES.items()):
        ax.set_title(name)
        if not any(text in point for row in grid for point in row["ppl"].values()):
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
            continue
        for row in grid:
            steps = [int(s) for s in GRID_STEPS if text in row["ppl"].get(s, {})]
            values = [row["ppl"][str(s)][text] for s in steps]
            # step 0 sits at x = 10 on the log axis, as a marker of "before healing"
            ax.plot([max(s, 10) for s in steps], values, marker="o", ls="--" if row["kind"] == "dense" else "-",
                    label=grid_label(row))
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xticks([10, 100, 300, 1000], ["0", "100", "300", "1000"])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("healing steps (2 x 256 tokens each)")
        ax.set_ylabel("perplexity (log scale)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: healing after pruning (benchmarks/heal.py)")
    return common.png_bytes(fig)


def render(rows: list[dict], info: dict) -> str:
    timing = [r for r in rows if r["kind"] == "pass"]
    passes = timing[-1]["seconds"] if timing else None
    lines = [
        "# Healing SmolLM2-135M-Instruct after pruning",
        "",
        ("Written by `benchmarks/heal.py render` from the rows in `heal-smollm2.jsonl`, each measured by the script in "
         "its own process; do not edit the numbers by hand. Protocol: the module docstring of `benchmarks/heal.py`."),
        "",
        common.machine_markdown(info),
        "",
        "## Targets (issue 25)",
        "",
        *target_lines(rows, passes),
        "",
    ]
    if passes:
        lines += [(f"One pass (a plain float32 forward of the dense model over 32 x 256 tokens): {passes['1']:.1f} s with "
                   f"1 torch thread, {passes['2']:.1f} s with 2 (medians of 5, alternated; load average before and after "
                   f"{timing[-1]['load_average']})."), ""]
    lines += [
        "## The curve: 0, 100, 300 and 1,000 steps",
        "",
        ("Each configuration is one run of 1,000 steps (`heal.py row`/`dense --steps 1000 --eval-at 100,300 --eval-zero "
         "--batch-size 2 --threads N --tag grid`; N in the tables), measured on the way: a point's learning rate follows the 1,000-step "
         "schedule. Healing text: WikiText-2 validation without its last 40 x 512 tokens. The dense reference is the "
         "dense model fine-tuned the same way (cross-entropy, `all`): how much of a gain on WikiText is domain "
         "adaptation rather than repair. Time and peak RSS of the whole run. The machine was not idle for every run: "
         "a load at the end above the run's own threads means other work shared the 2 cores, and its seconds and passes "
         "are high (blank: a row from before the field). ![curve](heal-smollm2.png)"),
        "",
        *grid_lines(rows),
        "## All rows",
        "",
        ("Perplexity on WikiText-2 test (40 x 512), held-out WikiText (the last 40 x 512 tokens of valid.txt, which no "
         "`row` or `dense` run heals on; * a `cli` run heals on the whole of valid.txt and holds out its last 8 x 256 "
         "tokens itself: those) and Python standard-library source (40 x 512, in neither text). Step 0 is the pruned, "
         "compensated model before healing. Time: healing alone (evaluations excluded), in seconds and in passes. Peak "
         "RSS: the whole process (the `cli` command's own, loading and pruning included)."),
        "",
        common.table(["kind", "removed", "train", "text", "lr", "batch", "step", "WikiText-2 test", "held-out WikiText",
                      "Python stdlib", "seconds", "passes", "threads", "peak RSS MiB", "tag"], table_rows(rows)),
        "",
    ]
    notes = common.kept_notes(OUT)
    return "\n".join(lines) + ("\n" + notes if notes else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["row", "cli", "dense", "pass", "render"])
    parser.add_argument("--budget", type=int, default=9)
    parser.add_argument("--train", default="gaps")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--hidden-weight", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--self-text", action="store_true", help="heal on text the dense model samples itself")
    parser.add_argument("--eval-at", default="", help="steps to measure at during the run, e.g. 100,300")
    parser.add_argument("--eval-zero", action="store_true", help="also measure before healing")
    parser.add_argument("--evals", default=",".join(EVALS))
    parser.add_argument("--eval-samples", type=int, default=40)
    parser.add_argument("--eval-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "lorp-heal-bench"))
    parser.add_argument("--rows", type=Path, default=ROWS)
    parser.add_argument("--tag", default="")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("extra", nargs="*", help="cli: more lorp-fx prune flags (after --)")
    args = parser.parse_args()
    if args.mode == "render":
        rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
        common.write_text(OUT, render(rows, common.machine("heal.py render")))
        picture = plot(rows)
        if picture is not None:
            common.write_bytes(PLOT, picture)
        return
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    row = {"row": run_row, "cli": run_cli, "dense": run_dense, "pass": run_pass}[args.mode](args)
    row["date"], row["commit"] = time.strftime("%Y-%m-%d %H:%M %Z"), common.git_commit()
    row["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]  # every kind of row: was the machine idle?
    with args.rows.open("a", encoding="utf-8") as out:
        out.write(json.dumps(row) + "\n")
    log(json.dumps(row))


if __name__ == "__main__":
    main()
