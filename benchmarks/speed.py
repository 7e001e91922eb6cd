"""Speed and memory of pruned checkpoints, and what the pruning pipeline itself costs.

    python benchmarks/speed.py                        # SmolLM2-135M: dense vs 3, 6, 9 layers removed
    python benchmarks/speed.py --compile              # also the fx graphs under torch.compile
    python benchmarks/speed.py --rounds 9 --threads 1 # more repetitions; one thread on a busy machine

1. Checkpoints. ShortGPT chooses the layers (on `--calib-samples` windows of WikiText-2
   valid.txt; for speed the choice barely matters), `lorp_fx.arch.surgery.remove_layers` cuts
   them, `save_pretrained_atomic` saves each model (dense too) and every measurement
   runs on the checkpoint reloaded with `from_pretrained`. Each reload is checked
   against the in-memory pruned model (logits) and must `generate` with the KV cache.
2. Speed, fp32 on CPU, models alternated in every round (order rotated each round),
   medians over `--rounds`: prefill of `--prefill-len` tokens at batch 1 (KV cache
   built, logits of the last token only, as `generate` does) and greedy decoding with
   the KV cache (`--decode-tokens` steps after a `--prompt-len` prompt, tokens/s over
   the steps only) at each `--decode-batches` size. Every speed-up is shown next to
   N/(N-k) (the decoder stack alone) and to the ratio of weights touched per token
   (the layers plus the output head), both computed from the model.
3. Peak memory: each checkpoint in a fresh process that loads it and runs prefill and
   batched decoding; peak RSS (VmHWM) and its increase over the RSS after importing
   torch and transformers. tracemalloc does not see torch's allocations, hence RSS.
4. `--compile`: the dense graph from `lorp_fx.trace` and the graph from `lorp_fx.prune`,
   eager and under `torch.compile`, forward over `--prefill-len` tokens (all logits).
5. Pipeline cost: calibration throughput (tokens/s) of a `ResidualObserver` against a
   plain forward on the same batches (alternated; the observer's first call, which
   traces, is reported apart), time of `trace`, `find_blocks` and `prune` on the model,
   and on tiny random Llamas of `--depths` layers with the growth exponent.

Writes `<out-dir>/speed-<tag>.md` (and `--json`). A "## Notes" section after the
marker comment of an existing file is kept.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import lorp_fx  # noqa: E402
from lorp_fx.arch.families import layer_stacks  # noqa: E402
from lorp_fx.arch.surgery import count_parameters, remove_layers  # noqa: E402
from lorp_fx.calibration.graph_observer import ResidualObserver  # noqa: E402
from lorp_fx.io.checkpoint import save_pretrained_atomic  # noqa: E402
from lorp_fx.io.text import shared_data_dir, text_windows  # noqa: E402

DEFAULT_MODEL = "smollm2-135m"
# The issue's measurement of plain module surgery removing 9 of 30 layers here.
ISSUE_SURGERY_9 = {"prefill": 1.42, "decode_b1": 1.41, "decode_b8": 1.25}


def log(message: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- measuring


def _signature(model) -> set:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


class Runner:
    """Prefill and greedy decoding with the KV cache on one `transformers` causal LM."""

    def __init__(self, model):
        self.model = model.eval()
        params = _signature(model)
        self.cache_in = "cache" if "cache" in params else "past_key_values"
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _step(self, ids, cache=None):
        kwargs = {self.cache_in: cache} if cache is not None else {}
        out = self.model(input_ids=ids, use_cache=True, **self.extra, **kwargs)
        cache = getattr(out, "cache", None) if self.cache_in == "cache" else getattr(out, "past_key_values", None)
        return out.logits[:, -1].argmax(-1, keepdim=True), cache

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> float:
        start = time.perf_counter()
        self._step(ids)
        return time.perf_counter() - start

    @torch.no_grad()
    def decode(self, prompt: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
        """Seconds for `steps` greedy steps after the (untimed) prompt, and the tokens."""
        token, cache = self._step(prompt)
        tokens = [token]
        start = time.perf_counter()
        for _ in range(steps):
            token, cache = self._step(token, cache)
            tokens.append(token)
        return time.perf_counter() - start, torch.cat(tokens, dim=1)


def weights_per_token(model) -> dict:
    """Parameters a token's forward pass multiplies with: every layer, the final norm, the output head.

    The input embedding is a row lookup (one row per token), so it is left out; a tied
    output head is counted as the head.
    """
    layers = sum(p.numel() for _, container in layer_stacks(model) for p in container.parameters())
    head = model.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else 0
    norm = getattr(getattr(model, "model", None), "norm", None)
    norm_params = sum(p.numel() for p in norm.parameters()) if norm is not None else 0
    return {"layers": layers, "head": head_params, "norm": norm_params, "total": layers + head_params + norm_params}


def plain_surgery(model, names: list[str]):
    """What a user would do by hand: delete the layers from a copy of the module list and
    renumber the attention's cache slots. The speed our checkpoint must match."""
    surgery = copy.deepcopy(model)
    drop = {int(n.rpartition(".")[2]) for n in names}
    kept = [layer for i, layer in enumerate(surgery.model.layers) if i not in drop]
    surgery.model.layers = torch.nn.ModuleList(kept)
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i
    surgery.config.num_hidden_layers = len(kept)
    return surgery.eval()


def n_layers(model) -> int:
    return sum(len(container) for _, container in layer_stacks(model))


def reload(path: Path):
    from transformers import AutoConfig

    from lorp_fx.io.models import model_class

    config = AutoConfig.from_pretrained(path)
    return model_class(config).from_pretrained(path, dtype=torch.float32).eval()


def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_child(args) -> None:
    """Runs in a fresh process: load one checkpoint, prefill and decode, print the RSS figures as JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers  # noqa: F401 - counted in the baseline

    baseline = _rss_kb("VmRSS")
    model = reload(Path(args.memory_child))
    loaded = _rss_kb("VmRSS")
    runner = Runner(model)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    runner.prefill(torch.randint(0, vocab, (1, args.prefill_len), generator=generator))
    batch = max(args.decode_batches)
    runner.decode(torch.randint(0, vocab, (batch, args.prompt_len), generator=generator), args.decode_tokens)
    peak = _rss_kb("VmHWM")
    if peak is None:  # not Linux: the peak of the process, in kB on Linux and bytes on macOS
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
    print("MEMORY " + json.dumps({"baseline_kb": baseline, "loaded_kb": loaded, "peak_kb": peak}), flush=True)


def measure_memory(path: Path, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(path),
               "--prefill-len", str(args.prefill_len), "--prompt-len", str(args.prompt_len),
               "--decode-tokens", str(args.decode_tokens), "--decode-batches", ",".join(map(str, args.decode_batches))]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(common.ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("MEMORY "):
            return json.loads(line[len("MEMORY "):])
    return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no output'}"}


def _timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - start, value


# --------------------------------------------------------------------------- parts


def pipeline_on_model(model, windows: torch.Tensor, args, budgets: list[int]) -> tuple[dict, dict]:
    """Calibration throughput with and without the observer, trace / find_blocks / prune times, and plans."""
    batches = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(args.calib_batch_size)]
    observer = ResidualObserver(model)
    with torch.no_grad():
        first_seconds, _ = _timed(observer, **batches[0])
        plain, observed = [], []
        for round_index in range(args.pipeline_rounds):
            for i, batch in enumerate(batches):
                pair = [("plain", lambda b=batch: model(**b, use_cache=False)), ("observed", lambda b=batch: observer(**b))]
                if (round_index + i) % 2:
                    pair.reverse()
                for kind, call in pair:
                    seconds, _ = _timed(call)
                    (plain if kind == "plain" else observed).append(seconds)
    tokens = batches[0]["input_ids"].numel()
    stats = observer.statistics()
    plans = {k: lorp_fx.select(stats, k, method=args.method) for k in budgets}

    example = {**batches[0], "use_cache": False}
    trace_times, find_times, prune_times = [], [], []
    gm = None
    for _ in range(args.trace_rounds):
        seconds, gm = _timed(lorp_fx.trace, model, example)
        trace_times.append(seconds)
    names = plans[max(budgets)].remove if budgets else []
    for _ in range(args.pipeline_rounds):
        seconds, _ = _timed(lorp_fx.find_blocks, gm)
        find_times.append(seconds)
        seconds, _ = _timed(lorp_fx.prune, gm, names)
        prune_times.append(seconds)
    result = {
        "batch": list(batches[0]["input_ids"].shape),
        "first_observed_call_seconds": first_seconds,
        "plain_seconds": plain,
        "observed_seconds": observed,
        "plain_tokens_per_s": tokens / common.median(plain),
        "observed_tokens_per_s": tokens / common.median(observed),
        "trace_seconds": trace_times,
        "find_blocks_seconds": find_times,
        "prune_seconds": prune_times,
        "prune_removed": len(names),
        "graph_nodes": len(gm.graph.nodes),
    }
    return result, plans


def tiny_llama(layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def scaling(args) -> list[dict]:
    """trace / find_blocks / prune (a quarter of the layers) on tiny random Llamas of growing depth."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    for depth in args.depths:
        model = tiny_llama(depth)
        ids = torch.randint(0, 256, (2, 32), generator=generator)
        example = {"input_ids": ids, "use_cache": False}
        trace_times, find_times, prune_times = [], [], []
        gm = None
        for _ in range(args.trace_rounds):
            seconds, gm = _timed(lorp_fx.trace, model, example)
            trace_times.append(seconds)
        remove = [f"model.layers.{i}" for i in range(1, depth - 1, 4)][: max(1, depth // 4)]
        for _ in range(args.pipeline_rounds):
            seconds, _ = _timed(lorp_fx.find_blocks, gm)
            find_times.append(seconds)
            # a depth too small to remove anything (2 layers) times the copy the rewrite makes
            seconds, _ = _timed(lorp_fx.prune, gm, remove, allow_empty=not remove)
            prune_times.append(seconds)
        rows.append({"layers": depth, "nodes": len(gm.graph.nodes), "removed": len(remove), "trace": trace_times,
                     "find_blocks": find_times, "prune": prune_times})
        log(f"  {depth} layers: trace {common.median(trace_times):.2f} s, find_blocks {common.median(find_times):.3f} s, "
            f"prune {common.median(prune_times):.3f} s")
    return rows


def growth_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y on log x: time ~ depth^slope."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(points) < 2:
        return None
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    sxx = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx if sxx else None


def compiled_graphs(model, plan_names: list[str], args) -> dict:
    """Dense and pruned fx graphs, eager and under torch.compile: forward over prefill-len tokens."""
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prefill_len), generator=generator)
    out: dict = {"removed": len(plan_names)}
    try:
        trace_ids = torch.randint(0, vocab, (2, 16), generator=generator)
        gm = lorp_fx.trace(model, {"input_ids": trace_ids, "use_cache": False})
        pruned = lorp_fx.prune(gm, plan_names)
    except Exception as error:  # noqa: BLE001
        return {**out, "error": f"trace/prune: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
    graphs = {"dense": gm, "pruned": pruned}
    times = {f"{name} {mode}": [] for name in graphs for mode in ("eager", "compiled")}
    compiled = {}
    with torch.no_grad():
        for name, graph in graphs.items():
            try:
                fn = torch.compile(graph)
                seconds, _ = _timed(fn, input_ids=ids)
                compiled[name] = fn
                out[f"{name} compile_seconds"] = seconds
            except Exception as error:  # noqa: BLE001 - report, keep the eager numbers
                text = str(error).strip().splitlines()
                out["error"] = f"torch.compile({name}): {type(error).__name__}: {text[0] if text else ''}"[:600]
                log(f"  {out['error']}")
                break
        for round_index in range(args.rounds):
            order = list(graphs)
            if round_index % 2:
                order.reverse()
            for name in order:
                seconds, _ = _timed(graphs[name], input_ids=ids)
                times[f"{name} eager"].append(seconds)
                if name in compiled:
                    seconds, _ = _timed(compiled[name], input_ids=ids)
                    times[f"{name} compiled"].append(seconds)
    out["times"] = times
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    data = shared_data_dir()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--tag", help="results name: speed-<tag>.md (default: smollm2 for the default model)")
    p.add_argument("--budgets", default="3,6,9")
    p.add_argument("--method", default="shortgpt", help="selector that chooses the layers (speed barely depends on it)")
    p.add_argument("--calib-file", type=Path, default=data / "wikitext-2" / "valid.txt" if data else None,
                   help="calibration text (absent: random tokens; timing does not depend on the text)")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--calib-batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5, help="A/B rounds for the speed medians")
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--decode-batches", default="1,8")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--compile", action="store_true", help="also time the fx graphs under torch.compile (slow to compile on CPU)")
    p.add_argument("--compile-budget", type=int, help="layers removed in the compiled pruned graph (default: the largest budget)")
    p.add_argument("--no-pipeline", action="store_true", help="skip the observer / trace / find_blocks / prune costs on the model")
    p.add_argument("--depths", default="8,16,32,64", help="tiny Llama depths for the pipeline growth ('' to skip)")
    p.add_argument("--pipeline-rounds", type=int, default=3)
    p.add_argument("--trace-rounds", type=int, default=2)
    p.add_argument("--checkpoint-dir", type=Path, help="keep the checkpoints here (default: a temporary folder)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out-dir", type=Path, default=common.RESULTS)
    p.add_argument("--json", type=Path)
    p.add_argument("--render", type=Path, metavar="JSON", help="only rewrite the results file from a --json of an earlier run")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.budgets = sorted({int(b) for b in args.budgets.split(",") if b.strip()})
    args.decode_batches = [int(b) for b in str(args.decode_batches).split(",") if b.strip()]
    args.depths = [int(d) for d in args.depths.split(",") if d.strip()]
    if args.tag is None:
        args.tag = "smollm2" if args.model == DEFAULT_MODEL else re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(str(args.model)).name)
    return args


def main(argv=None, *, model=None, tokenizer=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return {}
    info = common.machine(" ".join(["speed.py", *(sys.argv[1:] if argv is None else argv)]))
    out_md = args.out_dir / f"speed-{args.tag}.md"
    notes = common.kept_notes(out_md)
    if args.render:
        results = json.loads(args.render.read_text())
        common.write_text(out_md, render(results, args, notes))
        return results
    if model is None:
        from lorp_fx.io.models import load_model

        log(f"loading {args.model}")
        model, tokenizer = load_model(args.model)
    model.eval()
    results: dict = {"machine": info, "protocol": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}

    n_calib = args.calib_samples
    if args.calib_file is not None and tokenizer is not None:
        windows = text_windows(tokenizer, [args.calib_file], n_calib, args.calib_len)
    else:
        windows = torch.randint(0, model.config.vocab_size, (n_calib, args.calib_len), generator=torch.Generator().manual_seed(0))

    # 1. plans (and the pipeline's own cost, measured on the way)
    plan_budgets = sorted(set(args.budgets) | ({args.compile_budget or max(args.budgets)} if args.compile else set()))
    if args.no_pipeline:
        from lorp_fx.calibration.graph_observer import collect_statistics

        stats, _ = collect_statistics(model, [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(args.calib_batch_size)], progress=False)
        plans = {k: lorp_fx.select(stats, k, method=args.method) for k in plan_budgets}
    else:
        log("pipeline cost on the model: observer vs plain forward, trace, find_blocks, prune")
        results["pipeline"], plans = pipeline_on_model(model, windows, args, plan_budgets)
    if args.depths:
        log(f"pipeline growth on tiny Llamas of {args.depths} layers")
        results["scaling"] = scaling(args)

    # 2. checkpoints
    tmp = None
    root = args.checkpoint_dir
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="lorp-speed-")
        root = Path(tmp.name)
    try:
        results["models"] = models = []
        runners = {}
        check_ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
        for k in [0, *args.budgets]:
            names = list(plans[k].remove) if k else []
            pruned = remove_layers(model, names).model if k else model
            path = root / f"removed-{k}"
            savable = tokenizer if hasattr(tokenizer, "save_pretrained") else None
            save_pretrained_atomic(pruned, savable, path, overwrite=True)
            loaded = reload(path)
            with torch.no_grad():
                diff = float((loaded(input_ids=check_ids, use_cache=False).logits - pruned(input_ids=check_ids, use_cache=False).logits).abs().max())
                generated = loaded.generate(check_ids[:1, :8], max_new_tokens=4, do_sample=False, use_cache=True)
            entry = {
                "removed": k, "layers": [int(n.rpartition(".")[2]) for n in names], "path": str(path),
                "parameters": count_parameters(loaded), "n_layers": n_layers(loaded),
                "weights_per_token": weights_per_token(loaded), "reload_max_abs_logit_diff": diff,
                "generate_ok": generated.shape[1] == 12,
            }
            models.append(entry)
            runners[k] = Runner(loaded)
            log(f"checkpoint without {k} layers: {entry['parameters']:,} parameters, reload |dlogits| {diff:.2e}")
            if k:
                del pruned
        largest = max(args.budgets)
        if isinstance(getattr(getattr(model, "model", None), "layers", None), torch.nn.ModuleList):
            surgery = plain_surgery(model, list(plans[largest].remove))
            with torch.no_grad():
                surgery_diff = float((surgery(input_ids=check_ids, use_cache=False).logits
                                      - runners[largest].model(input_ids=check_ids, use_cache=False).logits).abs().max())
            runners["surgery"] = Runner(surgery)
            log(f"plain module surgery without the same {largest} layers (|dlogits| vs our checkpoint {surgery_diff:.1e}), in the same rotation")

        # 3. speed, alternated
        generator = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        prefill_ids = torch.randint(0, vocab, (1, args.prefill_len), generator=generator)
        prompts = {b: torch.randint(0, vocab, (b, args.prompt_len), generator=generator) for b in args.decode_batches}
        kinds = ["prefill"] + [f"decode_b{b}" for b in args.decode_batches]
        times = {k: {kind: [] for kind in kinds} for k in runners}
        outputs = {}
        log("warm-up")
        for k, runner in runners.items():
            runner.prefill(prefill_ids)
            for b in args.decode_batches:
                _, outputs[(k, b)] = runner.decode(prompts[b], min(4, args.decode_tokens))
        order = list(runners)
        for round_index in range(args.rounds):
            log(f"round {round_index + 1} of {args.rounds}")
            shift = round_index % len(order)
            rotated = order[shift:] + order[:shift]
            for kind in kinds:
                for k in rotated:
                    if kind == "prefill":
                        times[k][kind].append(runners[k].prefill(prefill_ids))
                    else:
                        b = int(kind[len("decode_b"):])
                        seconds, _ = runners[k].decode(prompts[b], args.decode_tokens)
                        times[k][kind].append(seconds)
        if "surgery" in times:
            results["surgery"] = {"removed": largest, "times": times["surgery"], "max_abs_logit_diff_vs_checkpoint": surgery_diff,
                                  "prefill_seconds": common.median(times["surgery"]["prefill"]),
                                  **{f"decode_b{b}_tokens_per_s": b * args.decode_tokens / common.median(times["surgery"][f"decode_b{b}"])
                                     for b in args.decode_batches}}
        for entry in models:
            k = entry["removed"]
            entry["times"] = times[k]
            entry["prefill_seconds"] = common.median(times[k]["prefill"])
            for b in args.decode_batches:
                entry[f"decode_b{b}_tokens_per_s"] = b * args.decode_tokens / common.median(times[k][f"decode_b{b}"])
        runners.clear()

        # 4. memory, one fresh process per checkpoint
        if not args.no_memory:
            for entry in models:
                log(f"peak memory, {entry['removed']} removed")
                entry["memory"] = measure_memory(Path(entry["path"]), args)
    finally:
        if tmp is not None:
            tmp.cleanup()

    # 5. torch.compile
    if args.compile:
        k = args.compile_budget or max(args.budgets)
        names = list(plans[k].remove)
        log(f"torch.compile: dense graph vs graph without {k} layers")
        results["compile"] = compiled_graphs(model, names, args)

    results["complete"] = True
    common.write_text(out_md, render(results, args, notes))
    if args.json:
        common.write_text(args.json, json.dumps(results, indent=1, default=str))
    log(f"wrote {out_md}")
    return results


# --------------------------------------------------------------------------- rendering


def _x(value: float | None) -> str:
    return "" if value is None or value != value else f"{value:.2f}x"


def render(results: dict, args, notes: str | None) -> str:
    args = argparse.Namespace(**results["protocol"])  # the run's settings, also when re-rendering a JSON
    models = results.get("models", [])
    dense = models[0] if models else None
    out = [f"# Speed and memory: {args.model}, dense vs pruned checkpoints", "",
           "Written by `benchmarks/speed.py` from one run; do not edit the numbers by hand.", "",
           common.machine_markdown(results["machine"])]
    out += [
        f"- layers chosen by `{args.method}` on {args.calib_samples} x {args.calib_len} calibration tokens; every model "
        "(dense too) saved with `save_pretrained_atomic` and reloaded with `from_pretrained`",
        f"- fp32 on CPU, {args.rounds} rounds, models alternated (order rotated every round), medians; prefill: "
        f"1 x {args.prefill_len} tokens with the KV cache, last-token logits; decode: {args.decode_tokens} greedy steps "
        f"with the KV cache after a {args.prompt_len}-token prompt, tokens/s = batch x steps / time of the steps",
        "",
    ]
    if dense is not None:
        N = dense["n_layers"]
        w0 = dense["weights_per_token"]["total"]
        out += ["## Checkpoints", ""]
        rows = []
        for m in models:
            rows.append([m["removed"], "[" + ",".join(map(str, m["layers"])) + "]" if m["layers"] else "", m["n_layers"],
                         f"{m['parameters']:,}", f"{m['parameters'] / dense['parameters']:.3f}",
                         f"{m['reload_max_abs_logit_diff']:.1e}", "yes" if m["generate_ok"] else "NO"])
        out += [common.table(["removed", "layers", "layers left", "parameters", "vs dense",
                              "max abs logit diff, reloaded vs in-memory", "generate with KV cache"], rows), ""]
        head = dense["weights_per_token"]["head"]
        out += [f"Weights per token (layers + final norm + output head): {w0:,}, of which the output head {head:,}.", ""]

        out += ["## Speed", ""]
        header = ["removed", "prefill s", "prefill speed-up"]
        for b in args.decode_batches:
            header += [f"decode b{b} tok/s", f"decode b{b} speed-up"]
        header += ["N/(N-k)", "weights/token ratio"]
        rows = []
        for m in models:
            k = m["removed"]
            row = [k, f"{m['prefill_seconds']:.3f}", _x(dense["prefill_seconds"] / m["prefill_seconds"])]
            for b in args.decode_batches:
                key = f"decode_b{b}_tokens_per_s"
                row += [f"{m[key]:.1f}", _x(m[key] / dense[key])]
            row += [_x(N / (N - k)), _x(w0 / m["weights_per_token"]["total"])]
            rows.append(row)
        out += [common.table(header, rows), ""]
        nine = next((m for m in models if m["removed"] == 9 and N == 30), None)
        if nine is not None:
            ours = {"prefill": dense["prefill_seconds"] / nine["prefill_seconds"]}
            for b in (1, 8):
                key = f"decode_b{b}_tokens_per_s"
                if key in nine:
                    ours[f"decode_b{b}"] = nine[key] / dense[key]
            text = "; ".join(f"{kind.replace('_', ' ')}: ours {_x(ours[kind])}, issue {_x(ref)}" for kind, ref in ISSUE_SURGERY_9.items() if kind in ours)
            out += [f"Against the issue's plain module surgery at 9 of 30 layers: {text}.", ""]
        surgery = results.get("surgery")
        same = next((m for m in models if surgery and m["removed"] == surgery["removed"]), None)
        if same is not None:
            cells = [("prefill", dense["prefill_seconds"] / same["prefill_seconds"], dense["prefill_seconds"] / surgery["prefill_seconds"],
                      surgery["prefill_seconds"] / same["prefill_seconds"])]
            for b in args.decode_batches:
                key = f"decode_b{b}_tokens_per_s"
                cells.append((f"decode b{b}", same[key] / dense[key], surgery[key] / dense[key], same[key] / surgery[key]))
            out += [f"Plain module surgery on the same {surgery['removed']} layers (a copy of the dense model with the layers deleted "
                    f"from its module list; max abs logit difference from our reloaded checkpoint "
                    f"{surgery['max_abs_logit_diff_vs_checkpoint']:.1e}), measured in the same rotation:", "",
                    common.table(["", "ours vs dense", "plain surgery vs dense", "ours vs plain surgery"],
                                 [[name, _x(a), _x(b), _x(c)] for name, a, b, c in cells]), ""]
        spread = []
        for m in models:
            for kind, values in m["times"].items():
                if len(values) > 1:
                    med = common.median(values)
                    spread.append(f"{m['removed']}/{kind} {100 * (max(values) - min(values)) / med:.0f}%")
        out += ["Spread (max - min) / median of the rounds: " + ", ".join(spread) + ".", ""]

        if any("memory" in m for m in models):
            out += ["## Peak memory", "",
                    "One fresh process per checkpoint: load, prefill, decode at the largest batch. Peak RSS is the "
                    "process's VmHWM; 'over baseline' subtracts the RSS after importing torch and transformers. "
                    "`from_pretrained` memory-maps the safetensors file, so the weights enter RSS as they are first used: "
                    "right after loading the process has grown by little, and the peak holds the weights plus activations "
                    "and the KV cache.", ""]
            rows = []
            for m in models:
                mem = m.get("memory", {})
                if "error" in mem:
                    rows.append([m["removed"], f"failed: {mem['error']}", "", "", ""])
                    continue
                base = mem["baseline_kb"] or 0
                weights_mb = m["parameters"] * 4 / 2**20
                rows.append([m["removed"], f"{mem['peak_kb'] / 1024:.0f}", f"{(mem['peak_kb'] - base) / 1024:.0f}",
                             f"{((mem['loaded_kb'] or base) - base) / 1024:.0f}", f"{weights_mb:.0f}"])
            out += [common.table(["removed", "peak RSS MiB", "peak over baseline MiB", "after load, over baseline MiB",
                                  "fp32 weights MiB"], rows), ""]

    compile_result = results.get("compile")
    if compile_result is not None:
        out += ["## fx graphs under torch.compile", ""]
        if "error" in compile_result:
            out += [f"Error: `{compile_result['error']}`", ""]
        t = {k: common.median(v) for k, v in compile_result.get("times", {}).items() if v}
        if t:
            rows = []
            for mode in ("eager", "compiled"):
                d, p_ = t.get(f"dense {mode}"), t.get(f"pruned {mode}")
                if d and p_:
                    rows.append([mode, f"{d:.3f}", f"{p_:.3f}", _x(d / p_)])
            out += [f"Forward over 1 x {args.prefill_len} tokens (all logits), {compile_result['removed']} layers removed by `lorp_fx.prune`.", "",
                    common.table(["graph", "dense s", "pruned s", "speed-up"], rows), ""]
            if t.get("dense eager") and t.get("dense compiled"):
                out += [f"Compiling: dense {common.fmt_seconds(compile_result.get('dense compile_seconds'))} s, pruned "
                        f"{common.fmt_seconds(compile_result.get('pruned compile_seconds'))} s (first call); compiled vs eager dense graph: "
                        f"{_x(t['dense eager'] / t['dense compiled'])}.", ""]
    elif not args.compile:
        out += ["## fx graphs under torch.compile", "", "Not run (pass `--compile`).", ""]

    pipe = results.get("pipeline")
    if pipe is not None:
        out += ["## Cost of the pipeline", ""]
        ratio = pipe["plain_tokens_per_s"] / pipe["observed_tokens_per_s"]
        out += [
            f"Calibration on batches of {pipe['batch'][0]} x {pipe['batch'][1]} tokens, {len(pipe['plain_seconds'])} batches each, alternated: "
            f"plain forward {pipe['plain_tokens_per_s']:.0f} tokens/s, with the `ResidualObserver` {pipe['observed_tokens_per_s']:.0f} tokens/s "
            f"(time ratio {ratio:.3f}x). The observer's first call, which traces the model, took {pipe['first_observed_call_seconds']:.1f} s.",
            "",
            common.table(["step", "median s", "runs"], [
                ["trace (torch.export)", f"{common.median(pipe['trace_seconds']):.2f}", len(pipe["trace_seconds"])],
                ["find_blocks", f"{common.median(pipe['find_blocks_seconds']):.3f}", len(pipe["find_blocks_seconds"])],
                [f"prune ({pipe['prune_removed']} layers)", f"{common.median(pipe['prune_seconds']):.3f}", len(pipe["prune_seconds"])],
            ]),
            f"\nThe graph has {pipe['graph_nodes']:,} nodes.",
            "",
        ]
    rows_scaling = results.get("scaling")
    if rows_scaling:
        out += ["### Growth with depth (tiny random Llamas, hidden 64)", ""]
        rows = []
        for r in rows_scaling:
            rows.append([r["layers"], f"{r['nodes']:,}", f"{common.median(r['trace']):.2f}", f"{common.median(r['find_blocks']):.3f}",
                         f"{common.median(r['prune']):.3f} ({r['removed']} removed)"])
        out += [common.table(["layers", "graph nodes", "trace s", "find_blocks s", "prune s"], rows), ""]
        depths = [r["layers"] for r in rows_scaling]
        exps = {step: growth_exponent(depths, [common.median(r[step]) for r in rows_scaling]) for step in ("trace", "find_blocks", "prune")}
        text = ", ".join(f"{step} ~ depth^{e:.2f}" for step, e in exps.items() if e is not None)
        if text:
            out += [f"Growth (least-squares slope of log time on log depth over {depths[0]}..{depths[-1]} layers): {text} "
                    "(1.00 is linear).", ""]
    if notes:
        out += [notes.rstrip(), ""]
    else:
        out += [common.NOTES_HEADING, "", common.NOTES_MARKER, "", "(none yet)", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
