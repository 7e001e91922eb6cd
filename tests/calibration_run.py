"""One calibration run through Trainer.validate, for the multi-process tests (run as a script).

    python tests/calibration_run.py OUT_DIR STRATEGY DEVICES [METHOD]

Writes OUT_DIR/rank{r}.json (the plan each rank holds) and, in the launching
process, OUT_DIR/parent.json (the plan the parent can see).
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_model  # noqa: E402

from lorp_fx import LoRPCallback  # noqa: E402


class CausalLM(L.LightningModule):
    def __init__(self, network):
        super().__init__()
        self.model = network

    def validation_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.mean()


def calibration_data(n=8, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 97, (n, length), generator=generator)
    mask = torch.ones_like(ids)
    for i in range(n):
        mask[i, length - i :] = 0  # ragged padding, every sequence keeps a token
    return [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(n)]


class WriteEveryRank(L.Callback):
    def __init__(self, lorp, out):
        self.lorp, self.out = lorp, out

    def on_validation_end(self, trainer, pl_module):
        (self.out / f"rank{trainer.global_rank}.json").write_text(self.lorp.plan.to_json())


def main(out: Path, strategy: str, devices: int, method: str = "shortgpt") -> None:
    lorp = LoRPCallback(n_remove=2, method=method, plan_path=out / "plan.json")
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, callbacks=[lorp, WriteEveryRank(lorp, out)],
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(calibration_data(), batch_size=2)
    trainer.validate(CausalLM(tiny_model("llama", layers=6)), dataloaders=loader)
    if trainer.is_global_zero or strategy == "ddp_spawn":
        plan = lorp.plan
        (out / "parent.json").write_text("null" if plan is None else plan.to_json())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Left to interpreter exit, gloo's threads occasionally abort the process ("terminate called
        # without an active exception") after the work is done; torch asks for an explicit teardown.
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
