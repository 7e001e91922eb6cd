"""What observing costs: Trainer.validate on the same batches with and without LoRPCallback.

    python benchmarks/callback_overhead.py [--batches 4] [--batch-size 8] [--seq-len 256]

Runs plain and observed validation alternately (A B A B) on SmolLM2-135M and prints
per-batch medians and their ratio. The first observed batch also traces the model
(torch.export); that one-off cost is reported on its own line, not in the ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import lightning as L
import torch

from lorp_fx import LoRPCallback
from lorp_fx.io.models import load_model
from lorp_fx.io.text import shared_data_dir, text_windows


class CausalLM(L.LightningModule):
    def __init__(self, network):
        super().__init__()
        self.model = network

    def validation_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1].sum()


class BatchTimer(L.Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_validation_batch_start(self, *args, **kwargs):
        self._start = time.perf_counter()

    def on_validation_batch_end(self, *args, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def run(module, loader, *callbacks) -> list[float]:
    timer = BatchTimer()
    trainer = L.Trainer(
        accelerator="cpu", callbacks=[*callbacks, timer], logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    with torch.no_grad():
        trainer.validate(module, dataloaders=loader, verbose=False)
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    n = args.batches * args.batch_size
    data = shared_data_dir()
    if data is not None:
        windows = text_windows(tokenizer, [data / "wikitext-2" / "valid.txt"], n, args.seq_len)
    else:  # timing does not depend on the text
        windows = torch.randint(0, tokenizer.vocab_size, (n, args.seq_len), generator=torch.Generator().manual_seed(0))
    items = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows]
    loader = torch.utils.data.DataLoader(items, batch_size=args.batch_size)

    plain, observed, first = [], [], []
    for _ in range(args.rounds):
        plain += run(CausalLM(model), loader)
        times = run(CausalLM(model), loader, LoRPCallback(n_remove=3, method="shortgpt"))
        first.append(times[0])
        observed += times[1:]
    plain_median, observed_median = statistics.median(plain), statistics.median(observed)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"batches of {args.batch_size} x {args.seq_len} tokens, {args.rounds} rounds, A/B alternated")
    print(f"plain validate     median {plain_median:.3f} s/batch over {len(plain)} batches")
    print(f"with LoRPCallback  median {observed_median:.3f} s/batch over {len(observed)} batches")
    print(f"overhead ratio     {observed_median / plain_median:.3f}x  (target < 1.10x)")
    print(f"first observed batch (includes torch.export trace): {statistics.median(first):.1f} s")


if __name__ == "__main__":
    main()
