"""`lorp-fx prune --devices N [--strategy ddp|fsdp]`: calibration through Lightning, in N processes.

Lightning's DDP launcher starts the same command once per rank. Every rank loads the
model, and then, through `Trainer.validate` with the project's `LoRPCallback`:

* the calibration batches are dealt out in turn (batch b to rank b % N); sampled
  calibration text is sampled where it is used: rank r samples only its windows
  (window i has its own seed, so it is the same whoever samples it);
* each rank sums the residual-stream statistics of its batches; the callback
  all-reduces the sums, so every rank holds the statistics of all batches;
* with compensation on (the default) and DDP, every rank then builds the compensating
  judge on its share of the windows (`judge.candidates.CandidateLoss` with their global
  indices): window losses, similarity sums and the maps' normal equations are sums,
  all-reduced through the strategy, so the statistics, the measured losses, the plan and
  the maps are one process's; rank zero folds the maps, removes the layers and writes;
* without compensation (or under FSDP, whose sharded parameters the traced graph cannot
  run), a loss-judged selector measures each candidate on the first `loss_windows`
  windows through the callback, each rank on its share, summed over the ranks; rank
  zero gathers the windows, fits any compensation on them and writes. Under FSDP with
  compensation on, a note says that the selection judged the uncompensated loss.

A rank that fails makes the others stop (Lightning's launcher kills the process
group; a collective fails when a peer is gone), and nothing is written: rank zero
writes only after every rank has handed in its windows.
"""

from __future__ import annotations

import os
import signal
import sys

import lightning as L
import torch
import torch.distributed as dist

from lorp_fx.arch.anatomy import check_compensable
from lorp_fx.arch.surgery import count_layers, count_parameters
from lorp_fx.calibration.batches import on_device, token_batches
from lorp_fx.calibration.sampling import self_calibration
from lorp_fx.core.errors import ConfigError, DistributedError, LoRPError
from lorp_fx.core.model import causal_lm, encoder_decoder, model_device
from lorp_fx.io.gguf.pruned_file import check_removal
from lorp_fx.io.placement import Placement
from lorp_fx.lightning.callback import LoRPCallback
from lorp_fx.lightning.compensated_judge import summed_over_ranks
from lorp_fx.pipeline.calibrate import CalibrationText, calibration_text
from lorp_fx.pipeline.config import PruneConfig
from lorp_fx.pipeline.costs import Stopwatch, plain_pass
from lorp_fx.pipeline.removal import (
    build_judge,
    compensation_method,
    decide_maps,
    remove_and_compensate,
)
from lorp_fx.pipeline.result import PruneResult
from lorp_fx.pipeline.run import (
    build_report,
    check_model,
    loss_batch_count,
    note_uncompensated_selection,
    select_blocks,
    statistics_of_judge,
)
from lorp_fx.selection.registry import options_for

#: For tests: a rank number that raises while it calibrates (the failure path has to be exercised).
FAIL_RANK_VARIABLE = "LORP_FX_TEST_FAIL_RANK"


def lightning_classes():
    """The LightningModule and LightningDataModule used here (built lazily: Lightning is imported only for --devices)."""
    class Calibration(L.LightningModule):
        """Runs the network on each batch; the LoRPCallback swaps `model` for its observer during validation."""

        def __init__(self, network):
            super().__init__()
            self.model = network

        def validation_step(self, batch, batch_idx):
            if os.environ.get(FAIL_RANK_VARIABLE) == str(self.global_rank):
                raise DistributedError(f"rank {self.global_rank} failed on purpose ({FAIL_RANK_VARIABLE} is set)")
            self.model(**batch)

    class Shards(L.LightningDataModule):
        """This rank's calibration batches: batch b goes to rank b % world size."""

        def __init__(self, windows, calibration_args):
            super().__init__()
            self.windows, self.calibration_args = windows, calibration_args
            self.indices: list[int] = []
            self.local_windows: torch.Tensor | None = None

        def val_dataloader(self):
            rank, world = self.trainer.global_rank, self.trainer.world_size
            config, encoder_decoder = self.calibration_args["config"], self.calibration_args["encoder_decoder"]
            self.indices = rank_windows(config.calib_samples, config.batch_size, rank, world)
            if self.windows is None:  # sampled here, by this rank, on its device
                model, tokenizer = self.trainer.lightning_module.model, self.calibration_args["tokenizer"]

                self.local_windows = self_calibration(model, tokenizer, config.calib_samples, config.seq_len, seed=config.seed,
                                                      windows=self.indices, progress=rank == 0)
            else:
                self.local_windows = self.windows[self.indices]
            batches = token_batches(self.local_windows, config.batch_size, encoder_decoder)
            return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)

    return Calibration, Shards


def rank_windows(n_windows: int, batch_size: int, rank: int, world: int) -> list[int]:
    """The windows of the batches rank `rank` of `world` calibrates on: batches rank, rank + world, ..."""
    batches = -(-n_windows // batch_size)
    return [w for b in range(rank, batches, world) for w in range(b * batch_size, min((b + 1) * batch_size, n_windows))]


def loss_batches_of_rank(config: PruneConfig, rank: int, world: int) -> int:
    """How many of the first loss batches (those of the first `loss_windows` windows) rank `rank` holds."""
    return len(range(rank, loss_batch_count(config), world))


def callback_for(config: PruneConfig, no_next_token_loss: bool = False):
    """A LoRPCallback for `config`'s budget, method and options (the callback takes protected, seed, n_clusters).
    A model without a next-token loss (an encoder-decoder, a masked LM) is chosen for from the statistics
    alone, as `prune_model` chooses for it in one process."""
    passed = {"protected", "seed", "n_clusters"}
    unknown = sorted(set(config.selector_options) - passed)
    if unknown:
        raise ConfigError(f"selector option(s) {', '.join(unknown)} cannot be passed through --devices "
                          f"(the Lightning callback takes {', '.join(sorted(passed))}); drop them or run without --devices")
    options = {**config.selector_options, **options_for(config.method, seed=config.seed)}
    return LoRPCallback(config.remove, ratio=config.ratio, method=config.method, granularity=config.granularity,
                        measure_loss=not no_next_token_loss, **{k: v for k, v in options.items() if k in passed})


def trainer_for(devices: int, strategy: str, placement: Placement, callbacks: list):
    accelerator = {"cuda": "gpu", "mps": "mps"}.get(placement.device.type, "cpu")
    return L.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, callbacks=callbacks, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     use_distributed_sampler=False, precision=_precision(placement.dtype))


def _precision(dtype: torch.dtype) -> str:
    """The model is loaded in its dtype already; Lightning is told so (no autocast, no conversion)."""
    return {torch.bfloat16: "bf16-true", torch.float16: "16-true"}.get(dtype, "32-true")


class _RankLoss:
    """Sets each rank's loss batch count once the ranks are known (LoRPCallback keeps that many of its batches)."""

    def __init__(self, lorp, config: PruneConfig):
        parent = self

        class Hook(L.Callback):
            def on_validation_start(self, trainer, pl_module):
                parent.lorp.loss_batches = loss_batches_of_rank(parent.config, trainer.global_rank, trainer.world_size)

        self.lorp, self.config, self.callback = lorp, config, Hook()


def prune_distributed(model, tokenizer, calibration, config: PruneConfig, placement: Placement, devices: int,
                      strategy: str = "ddp", progress: bool = True, gguf=None, every_rank: bool = False):
    """Run on every rank. Returns rank zero's PruneResult, and None on the other ranks (`gguf`: see prune_model);
    with `every_rank`, every rank's (each fits the same maps on the gathered windows: healing goes on in N processes)."""
    check_model(model, config, calibration, tokenizer, None)
    # The sharded compensating judge: DDP (every rank runs the whole graph) on a causal LM, compensation on.
    judged = strategy == "ddp" and causal_lm(model) and _compensates(model, config)
    windows, text = None, None
    if calibration is not None or config.own_windows < config.calib_samples:  # the default: the corpus and own text
        # The compensation guard's own text beside a given text: every rank samples the same windows (each has
        # its own seed) where the judge runs in every rank; without it one process checks the maps.
        text = calibration_text(model, calibration, config, tokenizer, progress=False, guard=judged)
        windows, source = text.selection_windows(), text.source
    else:
        source = f"self-generated by the model (seed {config.seed}, temperature 1.0, top-p 0.95), sampled by the ranks"
    Calibration, Shards = lightning_classes()

    if os.environ.get("LOCAL_RANK", "0") == "0" and not judged:  # once, not by every process Lightning starts
        note_uncompensated_selection(model, config, f"--devices {devices} --strategy {strategy}")
    lorp = callback_for(config, not causal_lm(model) or judged)  # the judge chooses where it runs
    ranks = _RankLoss(lorp, config)
    trainer = trainer_for(devices, strategy, placement, [ranks.callback, lorp])
    data = Shards(windows, {"config": config, "tokenizer": tokenizer, "encoder_decoder": encoder_decoder(model)})
    clock = Stopwatch(placement.device)
    try:
        with clock("calibration_and_selection"):
            trainer.validate(Calibration(model), datamodule=data, verbose=False)
        windows = _gather_windows(trainer, data, windows, config)
    except BaseException:
        _stop_other_ranks(trainer)
        raise
    if text is None:  # sampled by the ranks: the model's own text alone
        text = CalibrationText(windows, source, ["own"] * windows.shape[0], frozenset())
    decision = None
    if judged:
        try:
            with clock("calibration_and_selection"):
                decision = _judged_decision(model, lorp, text, config, trainer, progress)
        except BaseException:
            _stop_other_ranks(trainer)
            raise
    if not trainer.is_global_zero and not every_rank:
        return None
    return _finish_on_rank_zero(model, lorp, text, config, placement, clock, devices, strategy, progress, gguf,
                                decision)


def _compensates(model, config: PruneConfig) -> bool:
    """Whether one process would judge with a compensating judge (`pipeline.removal.build_judge`)."""
    try:
        check_compensable(model)
    except LoRPError:
        return False
    return compensation_method(config) is not None


def _judged_decision(model, lorp, text, config: PruneConfig, trainer, progress: bool) -> dict:
    """Every rank: the compensating judge on this rank's share of the windows, summed over the ranks; the plan,
    statistics and maps one process with every window would get."""
    rank, world = trainer.global_rank, trainer.world_size
    mine = rank_windows(text.windows.shape[0], config.batch_size, rank, world)
    device = model_device(model)
    batches = on_device(token_batches(text.windows[mine], config.batch_size, False), device)
    reduce = summed_over_ranks(trainer)
    judge = build_judge(model, lorp.graph_module, batches, config, progress and rank == 0, text,
                        window_indices=mine, reduce=reduce)
    if judge is None:
        raise LoRPError("the model gives no next-token loss on the calibration windows, so no compensating judge "
                        "can run in several processes; run without --devices, or with --compensate none")
    stats = statistics_of_judge(judge, config) or lorp.plan.statistics
    plan = select_blocks(stats, lorp.graph_module, [], config, progress and rank == 0, judge=judge)
    return {"plan": plan, "statistics": stats, "judge": judge, "maps": decide_maps(plan, config.compensate, judge)}


def _gather_windows(trainer, data, windows, config: PruneConfig) -> torch.Tensor | None:
    """Every rank's windows at every rank, in window order (sampled windows were made where they were used)."""
    if windows is not None or trainer.world_size == 1:
        return windows if windows is not None else data.local_windows

    shares = [None] * trainer.world_size
    dist.all_gather_object(shares, (data.indices, data.local_windows.cpu()))
    out = torch.empty(config.calib_samples, config.seq_len, dtype=torch.long)
    for indices, local in shares:
        out[indices] = local
    return out


def is_rank_zero() -> bool:
    """Whether this process writes: rank zero of a multi-process run, or a single process."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _stop_other_ranks(trainer) -> None:
    launcher = getattr(trainer.strategy, "launcher", None)
    if launcher is not None and hasattr(launcher, "kill") and trainer.is_global_zero:
        launcher.kill(signal.SIGKILL if sys.platform != "win32" else signal.SIGTERM)


def _finish_on_rank_zero(model, lorp, text, config, placement, clock, devices, strategy, progress, gguf,
                         decision: dict | None = None):
    plan = decision["plan"] if decision is not None else lorp.plan
    if plan is None:
        raise LoRPError("the Lightning run ended without a plan")
    if gguf is not None:
        check_removal(gguf, plan)  # before compensation and saving, not after
    device = model_device(model)
    windows = text.windows
    batches = on_device(token_batches(windows, config.batch_size, encoder_decoder(model)), device)
    with clock("pass_unit"):
        unit = plain_pass(model, batches)
    before = (count_parameters(model), count_layers(model))
    with clock("compensation"):
        if decision is not None:  # the sharded judge's maps, decided by every rank
            judge, decided = decision["judge"], decision["maps"]
        else:  # fitted and judged on rank zero as in one process
            judge, decided = build_judge(model, lorp.graph_module, batches, config, text=text), None
        pruned, fits, names, compensation, fx_difference = remove_and_compensate(
            model, lorp.graph_module, plan, batches, config, progress, judge, text, decided)
    statistics = decision["statistics"] if decision is not None else plan.statistics
    statistics_source = (f"the compensating judge's caching pass in {devices} {strategy} processes, windows dealt "
                         "out in turn, sums all-reduced" if decision is not None else
                         f"the traced graph (LoRPCallback's ResidualObserver) in {devices} {strategy} processes, "
                         "batches dealt out in turn, sums all-reduced")
    report = build_report(plan, statistics, text.selection_windows(), text, statistics_source, compensation, {}, fx_difference,
                          before, pruned, clock, unit, config)
    report["distributed"] = {"devices": devices, "strategy": strategy,
                             "loss_batches_per_rank": [loss_batches_of_rank(config, r, devices) if lorp.judges_by_loss or decision else 0
                                                       for r in range(devices)]}
    return PruneResult(pruned, plan, fits, clock.seconds, report, names, lorp.graph_module, gguf)
