"""Calibrate with Lightning: LoRPCallback on Trainer.validate, then validate the pruned model.

    python examples/lightning_calibration.py [--text FILE] [--remove 3]

A LightningModule around a `transformers` causal LM computes its next-token loss in
`validation_step`, unchanged. The callback watches the residual stream during the
first `validate`, chooses layers, and (apply=True) hands back the eager model without
them (still a `transformers` model: it generates and saves), so the second `validate`
measures the pruned model on the same text.
"""

import argparse
import math

import lightning as L
import torch

from lorp_fx import LoRPCallback
from lorp_fx.selection.registry import DEFAULT_SELECTOR
from lorp_fx.calibration.sampling import self_calibration
from lorp_fx.io.text import shared_data_dir, text_windows
from lorp_fx.io.models import load_model


class CausalLM(L.LightningModule):
    def __init__(self, network):
        super().__init__()
        self.model = network

    def validation_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())
        self.log("loss", loss, prog_bar=True)
        return loss


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--text", help="calibration text file (default: WikiText-2 validation if present, else text the model writes)")
    parser.add_argument("--remove", type=int, default=3)
    parser.add_argument("--method", default=DEFAULT_SELECTOR)
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2-135m")
    text = args.text or (shared_data_dir() / "wikitext-2" / "valid.txt" if shared_data_dir() else None)
    if text:
        windows = text_windows(tokenizer, [text], n_samples=8, seq_len=128)
    else:
        windows = self_calibration(model, tokenizer, n_samples=8, seq_len=128, seed=0)
    loader = torch.utils.data.DataLoader(
        [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows], batch_size=4
    )

    callback = LoRPCallback(n_remove=args.remove, method=args.method, apply=True)
    trainer = L.Trainer(accelerator="cpu", callbacks=[callback], logger=False, enable_model_summary=False)
    module = CausalLM(model)
    dense = trainer.validate(module, dataloaders=loader)[0]["loss"]
    plan = callback.plan
    print(f"removed: {plan.remove}")
    pruned = trainer.validate(module, dataloaders=loader)[0]["loss"]
    print(f"calibration perplexity: dense {math.exp(dense):.2f} -> pruned {math.exp(pruned):.2f}")


if __name__ == "__main__":
    main()
