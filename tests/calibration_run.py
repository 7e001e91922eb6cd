"""THE LightningModule the callback tests share, its calibration data, and one calibration run as a script.

`Calibrated(network, call=..., fields=...)` is a small LightningModule whose
`validation_step` (and test, predict and training steps) calls `self.model` the way
`call` says, from dict, tuple or list batches (`loader(data, form)` collates them).

    python tests/calibration_run.py OUT_DIR STRATEGY DEVICES [METHOD [N_REMOVE SEQUENCES BATCH_SIZE]] [--compensate=M]

runs one `Trainer.validate` (the multi-process tests) and writes OUT_DIR/rank{r}.json
(the plan each rank holds; with --compensate, rank{r}-compensation.json: what the callback fitted and
folded, and the pruned network's weights' sums) and, in the launching process, OUT_DIR/parent.json (the
plan the parent can see).
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_model  # noqa: E402

from lorp_fx import LoRPCallback  # noqa: E402

TOKEN_FIELDS = ("input_ids", "attention_mask")
PLAIN_FIELDS = ("x", "y")

# How validation_step calls the network: the calling conventions a user may write.
CALLS = {
    # token models
    "keywords": lambda net, f: net(input_ids=f["input_ids"], attention_mask=f["attention_mask"], use_cache=False),
    "plain_keywords": lambda net, f: net(input_ids=f["input_ids"], attention_mask=f["attention_mask"]),
    "positional": lambda net, f: net(f["input_ids"], f["attention_mask"]),
    "mixed": lambda net, f: net(f["input_ids"], attention_mask=f["attention_mask"]),
    "ids_only": lambda net, f: net(f["input_ids"]),
    "labels": lambda net, f: net(input_ids=f["input_ids"], labels=f["input_ids"], use_cache=False),
    "unpack": lambda net, f: net(**f),
    # plain networks
    "x": lambda net, f: net(f["x"]),
    "x_keyword": lambda net, f: net(x=f["x"]),
}


class Calibrated(L.LightningModule):
    """`self.model` called as `CALLS[call]` on the batch's fields (a dict batch, or a tuple/list in `fields` order)."""

    def __init__(self, network, call: str = "keywords", fields: tuple[str, ...] = TOKEN_FIELDS, lr: float = 1e-3):
        super().__init__()
        self.model = network
        self.call, self.fields, self.lr = call, fields, lr
        self.steps = {"train": 0, "validation": 0}

    def named_fields(self, batch) -> dict:
        return dict(batch) if isinstance(batch, dict) else dict(zip(self.fields, batch))

    def run(self, batch):
        fields = self.named_fields(batch)
        return fields, CALLS[self.call](self.model, fields)

    def objective(self, batch) -> torch.Tensor:
        fields, output = self.run(batch)
        if hasattr(output, "loss") and output.loss is not None:
            return output.loss
        logits = output.logits if hasattr(output, "logits") else output
        ids = fields.get("decoder_input_ids", fields.get("input_ids"))  # the tokens the logits follow
        if ids is not None:
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        return torch.nn.functional.cross_entropy(logits, fields["y"])

    def validation_step(self, batch, batch_idx):
        self.steps["validation"] += 1
        loss = self.objective(batch)
        self.log("loss", loss, batch_size=2)
        return loss

    def test_step(self, batch, batch_idx):
        return self.objective(batch)

    def predict_step(self, batch, batch_idx):
        return self.run(batch)[1]

    def training_step(self, batch, batch_idx):
        self.steps["train"] += 1
        return self.objective(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def calibration_data(n=8, length=12, seed=0):
    """Token samples {input_ids, attention_mask} with ragged right padding (every sequence keeps a token)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 97, (n, length), generator=generator)
    mask = torch.ones_like(ids)
    for i in range(n):
        mask[i, length - i :] = 0
    return [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(n)]


def plain_data(n=8, shape=(16,), classes=3, seed=0):
    """Samples {x, y} for plain networks: x of `shape`, y a class index."""
    generator = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, *shape, generator=generator)
    ys = torch.randint(0, classes, (n,), generator=generator)
    return [{"x": xs[i], "y": ys[i]} for i in range(n)]


class Collate:
    """Batches of dict samples as dicts, tuples or lists of their fields (a class: ddp_spawn pickles loaders)."""

    def __init__(self, form: str):
        self.form = form

    def __call__(self, samples):
        batch = torch.utils.data.default_collate(samples)
        if self.form == "dict":
            return batch
        values = [batch[name] for name in samples[0]]
        return tuple(values) if self.form == "tuple" else values


def loader(data=None, form: str = "dict", batch_size: int = 2):
    """A DataLoader of `data` (dict samples; default `calibration_data()`) whose batches have `form`."""
    data = calibration_data() if data is None else data
    return torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=Collate(form))


def trainer(*callbacks, **options):
    return L.Trainer(
        accelerator="cpu", callbacks=list(callbacks), logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, **options,
    )


def eager_statistics(model, data, masked: bool = True):
    """The reference the callback must match: statistics from forward hooks on a causal LM's eager
    layers, run on `data` in batches of 2 with (`masked`) or without its attention mask."""
    import lorp_fx

    states = []
    layers = model.model.layers

    def record_input(module, args, kwargs):
        states.append(kwargs.get("hidden_states", args[0] if args else None))

    hooks = [layer.register_forward_pre_hook(record_input, with_kwargs=True) for layer in layers]
    hooks.append(layers[-1].register_forward_hook(lambda m, a, o: states.append(o[0] if isinstance(o, tuple) else o)))
    accumulator = lorp_fx.SimilarityAccumulator(len(layers) + 1)
    with torch.no_grad():
        for batch in loader(data):
            states.clear()
            mask = batch["attention_mask"] if masked else None
            model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False)
            accumulator.update(torch.stack(states), mask)
    for hook in hooks:
        hook.remove()
    return accumulator.statistics([str(i) for i in range(len(layers) + 1)], [], [])


class WriteEveryRank(L.Callback):
    def __init__(self, lorp, out):
        self.lorp, self.out = lorp, out

    def on_validation_end(self, trainer, pl_module):
        (self.out / f"rank{trainer.global_rank}.json").write_text(self.lorp.plan.to_json())
        if self.lorp.compensation is not None:
            weights = {name: float(p.detach().double().sum()) for name, p in pl_module.model.named_parameters()}
            (self.out / f"rank{trainer.global_rank}-compensation.json").write_text(
                json.dumps({"compensation": self.lorp.compensation, "weights": weights}))


def main(out: Path, strategy: str, devices: int, method: str = "shortgpt", n_remove: int = 2, sequences: int = 8,
         batch_size: int = 2, compensate: str | None = None) -> None:
    lorp = LoRPCallback(n_remove=n_remove, method=method, plan_path=out / "plan.json", compensate=compensate,
                        apply=compensate is not None)
    run = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, callbacks=[lorp, WriteEveryRank(lorp, out)],
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    # Positional calls from tuple batches: what the single-process tests cover by keyword.
    data = calibration_data(n=sequences)
    run.validate(Calibrated(tiny_model("llama", layers=6), call="mixed"),
                 dataloaders=loader(data, form="tuple", batch_size=batch_size))
    if run.is_global_zero or strategy == "ddp_spawn":
        plan = lorp.plan
        (out / "parent.json").write_text("null" if plan is None else plan.to_json())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Left to interpreter exit, gloo's threads occasionally abort the process ("terminate called
        # without an active exception") after the work is done; torch asks for an explicit teardown.
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    options = [a for a in sys.argv[1:] if a.startswith("--")]
    positional = [a for a in sys.argv[1:] if not a.startswith("--")]
    compensate = next((a.split("=", 1)[1] for a in options if a.startswith("--compensate=")), None)
    main(Path(positional[0]), positional[1], int(positional[2]), *positional[3:4], *map(int, positional[4:]),
         compensate=compensate)
