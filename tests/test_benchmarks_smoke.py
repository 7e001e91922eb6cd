"""Smoke tests of the benchmarks: each main function on tiny settings writes its results file.

A tiny random Llama (built in code), a byte-level tokenizer and a few kilobytes of
synthetic WikiText-like text: no download, no shared data, a few seconds each. The
numbers mean nothing; the tests check that the scripts run end to end and write
what they promise.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
import transformers as T
from benchmark_modules import load_benchmark


class ByteTokenizer:
    """The part of a tokenizer the benchmarks use: text -> UTF-8 bytes as ids."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 2
    vocab_size = 256

    def __call__(self, text, add_special_tokens=False, **kwargs):
        return {"input_ids": list(text.encode("utf-8"))}


def tiny_llama(layers: int = 6):
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return T.LlamaForCausalLM(config).eval()


def wikitext_like(path: Path, articles: int = 4, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = "the of a river town built north song album army ship first later during war record".split()
    lines = []
    for a in range(articles):
        lines += ["", f" = Article {a} = ", ""]
        for _ in range(3):
            sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + " ." for _ in range(4)]
            lines.append(" " + " ".join(sentences) + " ")
        lines += ["", " = = Section = = ", ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_quality_smoke(tmp_path):
    quality = load_benchmark("quality")
    text = wikitext_like(tmp_path / "text.txt")
    argv = [
        "--model", "tiny-llama", "--tag", "tiny", "--calib-file", str(text), "--eval-file", str(text),
        "--calib-samples", "2", "--calib-len", "32", "--eval-samples", "2", "--eval-len", "32",
        "--loss-samples", "2", "--loss-batch-size", "2", "--batch-size", "2", "--budgets", "1,2",
        "--methods", "shortgpt,sleb,uidl,no-such-method", "--mc-items", "4", "--out-dir", str(tmp_path / "out"),
        "--json", str(tmp_path / "out" / "quality.json"), "--threads", "1", "--quiet",
    ]
    results = quality.main(argv, model=tiny_llama(), tokenizer=ByteTokenizer())
    md = (tmp_path / "out" / "quality-tiny.md").read_text()
    assert (tmp_path / "out" / "quality-tiny.png").stat().st_size > 1000
    assert (tmp_path / "out" / "quality.json").is_file()
    assert results["complete"]
    rows = {(r["method"], r["budget"]): r for r in results["rows"]}
    assert set(rows) == {("dense", 0)} | {(m, b) for m in ("shortgpt", "sleb", "uidl") for b in (1, 2)}
    assert all(r["ppl"] > 1 and 0 <= r["acc"] <= 1 for r in rows.values())
    assert rows[("sleb", 2)]["loss_evals"]["computed"] < rows[("sleb", 2)]["loss_evals"]["asked"]  # step 1 reused
    assert "no-such-method" in md and "| shortgpt |" in md and "Run in progress" not in md
    # A rewrite keeps the hand-written notes.
    path = tmp_path / "out" / "quality-tiny.md"
    path.write_text(md.replace("(none yet)", "A hand-written remark."))
    common = sys.modules["common"]
    rewritten = quality.render(results, quality.parse_args(argv), common.kept_notes(path))
    assert "A hand-written remark." in rewritten and "(none yet)" not in rewritten


    # --merge: rows of methods a later run leaves out come from the earlier run, marked.
    later = {**results, "protocol": {**results["protocol"], "methods": ["shortgpt"]}, "machine": {**results["machine"], "commit": "later"},
             "rows": [r for r in results["rows"] if r["method"] in ("dense", "shortgpt")]}
    quality._merge(later, results)
    assert sorted((r["method"], r["budget"]) for r in later["rows"]) == sorted(rows)
    assert {r["method"] for r in later["rows"] if "from" in r} == {"sleb", "uidl"}
    assert "| sleb † |" in quality.render(later, quality.parse_args(argv), None)


def test_multiple_choice_items_are_deterministic(tmp_path):
    quality = load_benchmark("quality")
    text = wikitext_like(tmp_path / "text.txt", articles=6).read_text()
    first = quality.build_multiple_choice(text, 10, 4, seed=3)
    assert first == quality.build_multiple_choice(text, 10, 4, seed=3)
    assert first != quality.build_multiple_choice(text, 10, 4, seed=4)
    for item in first:
        assert len(set(item.choices)) == 4 and 0 <= item.answer < 4 and item.context


def test_speed_smoke(tmp_path, capsys):
    speed = load_benchmark("speed")
    text = wikitext_like(tmp_path / "text.txt")
    argv = [
        "--model", "tiny-llama", "--tag", "tiny", "--budgets", "2", "--calib-file", str(text), "--calib-samples", "4",
        "--calib-len", "16", "--calib-batch-size", "2", "--rounds", "2", "--prefill-len", "16", "--prompt-len", "4",
        "--decode-tokens", "3", "--decode-batches", "1,2", "--depths", "2,3", "--pipeline-rounds", "1", "--trace-rounds", "1",
        "--threads", "1", "--no-memory", "--checkpoint-dir", str(tmp_path / "ckpt"),
        "--out-dir", str(tmp_path / "out"), "--json", str(tmp_path / "out" / "speed.json"),
    ]
    results = speed.main(argv, model=tiny_llama(6), tokenizer=ByteTokenizer())
    md = (tmp_path / "out" / "speed-tiny.md").read_text()
    dense, pruned = results["models"]
    assert (dense["n_layers"], pruned["n_layers"]) == (6, 4)
    assert pruned["reload_max_abs_logit_diff"] < 1e-4 and pruned["generate_ok"]
    assert pruned["parameters"] < dense["parameters"]
    assert [r["layers"] for r in results["scaling"]] == [2, 3]
    for heading in ("## Speed", "## Cost of the pipeline", "### Growth with depth", "N/(N-k)", "Plain module surgery"):
        assert heading in md
    assert results["surgery"]["removed"] == 2 and results["surgery"]["max_abs_logit_diff_vs_checkpoint"] < 1e-4
    # The peak-memory probe (normally a fresh process per checkpoint), run in this process on the saved checkpoint.
    capsys.readouterr()
    speed.memory_child(speed.parse_args(argv + ["--memory-child", str(tmp_path / "ckpt" / "removed-2")]))
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("MEMORY ")][0]
    assert json.loads(line[len("MEMORY "):])["peak_kb"] > 0


def test_the_default_is_compared_with_the_best_published_selector():
    quality = load_benchmark("quality")
    row = lambda method, budget, ppl, seconds, **extra: {  # noqa: E731
        "method": method, "budget": budget, "ppl": ppl, "removed": [], "selection_seconds": seconds, **extra}
    rows = [
        row("lorp", 3, 36.0, 50.0), row("sleb", 3, 36.0, 600.0), row("shortgpt", 3, 37.0, 0.0),
        row("lorp", 6, 58.0, 80.0, loss_evals={"asked": 15, "computed": 10}, cold_seconds_estimate=120.0),
        row("sleb", 6, 57.0, 900.0, **{"from": "an earlier run"}),
    ]
    lines = quality.default_against_published(rows, lambda m: m)
    table = "\n".join(lines)
    assert "| 3 | 36.00 | 36.00 (sleb) | equal | 50.0 | 600 | 0.083 |" in table
    assert "| 6 | 58.00 | 57.00 (sleb) | worse | 120 | 900 | n/a |" in table  # sleb 6 is not from this run
