"""`LoRPCallback`: collect residual-stream statistics inside a Lightning loop and choose blocks to prune."""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lorp_fx.arch.families import check_sublayer_pruning
from lorp_fx.calibration.graph_observer import ResidualObserver
from lorp_fx.calibration.network_call import NetworkCall
from lorp_fx.core.errors import CalibrationError, ConfigError, LoRPError
from lorp_fx.core.model import is_transformers_model
from lorp_fx.core.plan import PruningPlan
from lorp_fx.healing.after_pruning import HealAfterPruning
from lorp_fx.healing.config import HealConfig
from lorp_fx.judge.loss import OutputLoss
from lorp_fx.lightning.arguments import check_arguments
from lorp_fx.lightning.compensated_judge import (
    compensation_for,
    kept_maps,
    sharded_judge,
)
from lorp_fx.lightning.first_call import check_blocks, check_loss
from lorp_fx.lightning.over_ranks import (
    calibration_loader,
    plain_loss,
    reduce_statistics,
)
from lorp_fx.lightning.pruned_network import pruned_network
from lorp_fx.lightning.windows import LossWindows
from lorp_fx.selection.registry import (
    DEFAULT_SELECTOR,
    SELECTORS,
    select,
)

_STEP = {"fit": "validation_step", "validate": "validation_step", "test": "test_step", "predict": "predict_step"}


class LoRPCallback(Callback):
    """Observe the residual stream of `pl_module.<attribute>` during one Lightning stage, then plan a pruning.

    Usage::

        cb = LoRPCallback(n_remove=9, method="shortgpt")
        Trainer(callbacks=[cb], accelerator="cpu", logger=False).validate(module, dataloaders=calibration)
        pruned = lorp_fx.prune(cb.graph_module, cb.plan)

    The LightningModule is used as written. For the duration of the loop its network
    attribute is replaced by a `ResidualObserver`, which takes whatever call the
    network takes (positional, keyword or both, from dict, tuple or list batches),
    traces the network on the first call and records the residual states of every
    call (padding excluded through the `attention_mask` passed to the network). At
    the end the sums are all-reduced across processes (DDP, FSDP), every rank
    selects the same plan, and the network is put back, or with `apply=True`
    replaced by the pruned one. The callback calibrates once, in `stage` ("validate":
    `trainer.validate`; "fit": the first validation loop of `trainer.fit` after its
    sanity check; "test"; "predict"), never on sanity-check batches; later loops
    only measure. Used on another LightningModule or network it raises, until
    `reset()`.

    With `apply=True` the LightningModule gets back (see `lorp_fx/pruned_network.py`):

    * for a `transformers` network, the eager model with the layers removed
      (`lorp_fx.remove_layers`, in place for layer plans): a `PreTrainedModel` with
      a consistent config that generates, saves with `save_pretrained` and pickles,
      checked against the pruned graph on a calibration call;
    * for any other network, the pruned graph (`lorp_fx.prune`), which keeps the
      network's modules when `symbolic_trace` could trace it (dropout and
      `.train()` work, `torch.save` works).

    Loss-judged methods (`lorp`, the default, and `sleb`) compare candidates by the
    loss of the pruned graph on the first `loss_batches` calls of the network,
    recorded as the network received them: next-token cross-entropy where the
    output has logits and the inputs token ids (`lorp_fx.judge.loss`), otherwise
    `loss_fn(output, inputs)` (inputs: the network's arguments by parameter name)
    must be given. Whether the loss can be measured, and whether the budget can be
    met, is checked on the first batch.

    Args:
        n_remove: number of blocks to remove; or `ratio`, a fraction of the blocks.
        method: a name from `lorp_fx.SELECTORS`.
        granularity: "layer" or "sublayer" (attention and MLP separately).
        apply: hand the LightningModule the pruned network when the loop ends (True or
            False; 1 and 0 are taken for them). A `transformers` network of a family
            that removes whole layers only (post-norm, such as BERT) is refused with
            `granularity="sublayer"` when the callback first sees it, before calibrating.
        stage: the Lightning stage that calibrates: "validate", "fit", "test" or "predict".
        loss_fn: `loss_fn(output, inputs) -> scalar` for loss-judged methods where
            next-token cross-entropy is not defined.
        attribute: where the LightningModule keeps its network.
        plan_path: where rank zero writes the plan as JSON; the way to get the plan
            back from `strategy="ddp_spawn"`, whose workers share no memory with the
            parent process (`cb.plan` reads it there).
        loss_batches: the first `loss_batches` batches of the calibration data (in one
            process's order) are the loss windows, each window measured on its own; under
            DDP each rank measures those it holds and the ranks average all of them, so the
            windows and the loss do not depend on the number of processes
            (`lorp_fx/lightning/windows.py`).
        measure_loss: False chooses from the statistics alone even with a loss-judged
            method that can do without (`lorp`; `sleb` cannot), as `prune_model` does
            for encoder-decoders, which have no causal-LM loss.
        protected, seed, n_clusters: passed to the selector (`protected`: a block name or
            index, or a list of them; `seed`: a whole number >= 0; `n_clusters`: a whole
            number >= 1, at most the number of blocks, checked on the first batch).
        compensate: "auto", "cosine" or "lstsq" (None: no compensation, the default): judge candidates by
            the calibration loss with each gap's linear map (fitted on the other calibration windows, as
            `lorp-fx prune` does), and with `apply=True` fold the maps into the pruned network. Every
            calibration window is kept (token ids); under DDP each rank fits and measures the windows it
            holds and the sums are all-reduced, so the plan and the maps are one process's
            (`lorp_fx/lightning/compensated_judge.py`). `transformers` causal LMs called with `input_ids`;
            "auto" leaves a family that takes no map (BERT) uncompensated, and drops maps that do not help.
            `cb.compensation` then says what was fitted and folded, and `cb.fits` holds the maps.
        heal_steps: with `apply=True`, heal the pruned network by that many steps of
            distillation from the dense one (`lorp_fx.heal`, in a Trainer of its own) before
            handing it back; `heal` takes a whole `HealConfig` instead. The healing text is
            the calibration calls' `input_ids` (unpadded), or `heal_data` (token windows, or
            text files read with `heal_tokenizer`). `transformers` causal LMs only.

    Every argument is checked here, and whatever depends on the network (budget,
    protected blocks, n_clusters, whether `apply` can remove sublayers) when the
    callback first sees it, before any statistics are collected
    (`lorp_fx/lightning/first_call.py`).
    """

    def __init__(
        self,
        n_remove: int | None = None,
        *,
        ratio: float | None = None,
        method: str = DEFAULT_SELECTOR,
        granularity: str = "layer",
        apply: bool = False,
        stage: str = "validate",
        loss_fn: OutputLoss | None = None,
        attribute: str = "model",
        plan_path: str | os.PathLike | None = None,
        loss_batches: int = 2,
        measure_loss: bool = True,
        protected: Sequence[str | int] | None = None,
        seed: int | None = None,
        n_clusters: int | None = None,
        compensate: str | None = None,
        heal_steps: int | None = None,
        heal: HealConfig | None = None,
        heal_data=None,
        heal_tokenizer=None,
    ):
        given = check_arguments(n_remove, ratio, method, granularity, apply, stage, loss_fn, attribute, plan_path,
                                loss_batches, measure_loss, protected, seed, n_clusters, compensate)
        self.judges_by_loss = SELECTORS[method].judges_by_loss and measure_loss
        self.n_remove, self.ratio, self.method, self.granularity = n_remove, ratio, method, granularity
        self.apply, self.stage, self.loss_fn, self.attribute = bool(apply), stage, loss_fn, attribute
        self.loss_batches, self.compensate = loss_batches, compensate
        self.plan_path = None if plan_path is None else Path(plan_path)
        self.selector_options = given
        self.healing = HealAfterPruning(heal_steps, heal, heal_data, self.apply, heal_tokenizer)
        self._failed = False
        self._clear()

    def _clear(self) -> None:
        self.graph_module: torch.fx.GraphModule | None = None
        self._plan: PruningPlan | None = None
        self._observer: ResidualObserver | None = None
        self._original: torch.nn.Module | None = None
        self._windows = LossWindows(self.loss_batches, every=self.compensate is not None)
        self._apply_call: NetworkCall | None = None  # a call to check the pruned network against
        self._compensation_method: str | None = None  # what the network takes of `compensate`
        self.compensation: dict | None = None
        self.fits: list = []
        self._first_call_checked = False
        self._batches_seen = 0
        self._module: weakref.ref | None = None  # the LightningModule the plan belongs to
        self._networks: list[weakref.ref] = []  # its network, and what `apply` handed it

    # ------------------------------------------------------------------ results

    @property
    def plan(self) -> PruningPlan | None:
        """The plan; after `ddp_spawn`, read from `plan_path`, which rank zero wrote."""
        if self._plan is None and self.plan_path is not None and self.plan_path.exists():
            self._plan = PruningPlan.load(self.plan_path)
        return self._plan

    def reset(self) -> None:
        """Forget the plan (and delete `plan_path`, which holds it), so the next run of `stage` calibrates
        again, on any LightningModule."""
        self._clear()
        if self.plan_path is not None and self.plan_path.exists():
            self.plan_path.unlink()

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._failed = False
        if stage == "fit" and self.stage == "validate" and self._plan is None:
            rank_zero_warn("LoRPCallback calibrates in trainer.validate (stage='validate'), so this trainer.fit will not "
                           "calibrate and cb.plan stays None; pass LoRPCallback(stage='fit') to calibrate in fit's "
                           "first validation loop")
        network = getattr(pl_module, self.attribute, None)
        if stage == self.stage and self._plan is None and isinstance(network, torch.nn.Module):
            self._check_network(network)  # before any loop; a network made later is checked when its loop starts

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Swap the network for an observer, in the calibrating stage and only until a plan exists."""
        if trainer.sanity_checking or trainer.state.fn != self.stage:
            return
        network = self._network(pl_module)
        if self._plan is not None:
            self._check_same_module(pl_module, network)
            return
        self._check_network(network)
        self._original, self._module = network, weakref.ref(pl_module)
        self._apply_call, self._first_call_checked, self._batches_seen = None, False, 0
        self._windows = LossWindows(self.loss_batches, every=self._compensation_method is not None)
        self._windows.start(calibration_loader(trainer, self.stage))
        self._observer = ResidualObserver(network, self.granularity, on_call=self._on_network_call)
        setattr(pl_module, self.attribute, self._observer)

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if self._observer is not None:
            self._windows.batch(batch_idx if dataloader_idx == 0 else len(self._windows.batches or ()))

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._observer is None:
            return
        self._batches_seen += 1
        if self._batches_seen == 1 and not self._first_call_checked:
            raise LoRPError(
                f"{_STEP[self.stage]} did not call {type(pl_module).__name__}.{self.attribute} on the first batch, so "
                "nothing was observed; pass LoRPCallback(attribute=...) naming the network it calls"
            )

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Reduce the sums across processes, select, and put the network back (or the pruned one)."""
        if self._observer is None:
            return
        observer, network = self._observer, self._original
        try:
            reduce_statistics(trainer, observer.accumulators(), observer.calls)
            stats = observer.statistics()
            self.graph_module = observer.graph
            options = dict(self.selector_options)
            judge = None
            if self._compensation_method is not None:
                judge = sharded_judge(self.graph_module, trainer, self._windows, self._compensation_method,
                                      self.compensate == "auto")
            if self.judges_by_loss:
                options["loss_fn"] = judge if judge is not None else plain_loss(trainer, self.graph_module, self._windows, self.loss_fn)
            plan = select(stats, self.n_remove, ratio=self.ratio, method=self.method, **options)
            if judge is not None:  # every rank: the judge sums over the ranks
                self.fits, self.compensation = kept_maps(plan, self.compensate, self._compensation_method, judge, network)
        finally:
            self._restore(pl_module)
        self._plan, self._networks = plan, [weakref.ref(network)]
        if self.plan_path is not None and trainer.is_global_zero:
            plan.save(self.plan_path)
        rank_zero_info(f"LoRP ({self.method}): remove {', '.join(plan.remove)}")
        if self.apply:
            teacher = self.healing.teacher(network)  # before the layers go: a layer plan prunes the network in place
            replacement = pruned_network(network, self.graph_module, plan, self._apply_call, self.fits)
            if teacher is not None:
                replacement = self.healing.heal(replacement, teacher, plan, trainer.progress_bar_callback is not None)
            setattr(pl_module, self.attribute, replacement)
            self._networks.append(weakref.ref(replacement))
        # the recorded inputs are no longer needed
        self._windows, self._apply_call = LossWindows(self.loss_batches, every=self.compensate is not None), None

    on_test_start = on_predict_start = on_validation_start
    on_test_batch_start = on_predict_batch_start = on_validation_batch_start
    on_test_batch_end = on_predict_batch_end = on_validation_batch_end
    on_test_end = on_predict_end = on_validation_end

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Whatever failed, the LightningModule gets its own network back."""
        self._failed = True
        self._restore(pl_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """A calibrating stage that saw no batch (Lightning skips an empty loop without a hook) says so."""
        if stage == self.stage and self._plan is None and not self._failed:
            where = "any validation loop after the sanity check" if stage == "fit" else f"the {self.stage} loop"
            raise CalibrationError(
                f"no calibration batch was seen in {where}: the calibration loader is empty or missing; pass a "
                f"dataloader with at least one batch of calibration data (LoRPCallback calibrates in stage={self.stage!r})"
            )

    def state_dict(self) -> dict[str, Any]:
        """The plan (it holds the statistics: similarity, angular distances, token counts)."""
        return {"plan": None if self._plan is None else self._plan.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` saved; a restored plan belongs to the first module it meets."""
        plan = state_dict.get("plan")
        self._clear()
        self._plan = None if plan is None else PruningPlan.from_dict(plan)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)  # weak references do not pickle (ddp_spawn pickles the trainer)
        state["_module"], state["_networks"] = None, []
        return state

    # ------------------------------------------------------------------ first call

    def _on_network_call(self, call: NetworkCall, output: Any) -> None:
        """Keep the calls a loss (or the `apply` check) needs; check budget and loss on the first one."""
        if self.judges_by_loss or self._compensation_method is not None:
            self._windows.keep(call)
        if self.apply and self._apply_call is None:
            self._apply_call = call.detached()
        self.healing.record(call.inputs)
        if self._first_call_checked:
            return
        self._first_call_checked = True
        check_blocks(self._observer.blocks, self.n_remove, self.ratio, self.method, self.granularity, self.selector_options)
        if self.judges_by_loss:
            check_loss(self.method, self.loss_fn, call, output)

    # ------------------------------------------------------------------ helpers

    def _check_network(self, network: torch.nn.Module) -> None:
        """What `prune_model` refuses before any work: sublayers of a family that removes whole layers only
        (`apply` removes them from the eager `transformers` model; other networks get the pruned graph)."""
        if self.healing.asked and not is_transformers_model(network):
            raise ConfigError(f"heal_steps heals transformers causal LMs, and {type(network).__name__} is not one; "
                              "heal the pruned network with lorp_fx.heal yourself, or drop heal_steps")
        self._compensation_method = compensation_for(self.compensate, network)
        if not (self.apply and self.granularity == "sublayer" and is_transformers_model(network)):
            return
        check_sublayer_pruning(network)

    def _network(self, pl_module: LightningModule) -> torch.nn.Module:
        network = getattr(pl_module, self.attribute, None)
        if not isinstance(network, torch.nn.Module):
            children = ", ".join(name for name, _ in pl_module.named_children()) or "none"
            raise LoRPError(
                f"{type(pl_module).__name__} has no network attribute {self.attribute!r} "
                f"(its submodules: {children}); pass LoRPCallback(attribute=...)"
            )
        return network

    def _check_same_module(self, pl_module: LightningModule, network: torch.nn.Module) -> None:
        """A plan belongs to the module it was made for; a restored plan adopts the first module it meets."""
        if self._module is None:
            self._module, self._networks = weakref.ref(pl_module), [weakref.ref(network)]
            return
        known = [ref() for ref in self._networks]
        if self._module() is pl_module and any(network is other for other in known):
            return
        raise CalibrationError(
            f"this LoRPCallback already holds a plan for another network than {type(pl_module).__name__}."
            f"{self.attribute}; call cb.reset() to calibrate again, or use a new LoRPCallback"
        )

    def _restore(self, pl_module: LightningModule) -> None:
        if self._original is not None:
            setattr(pl_module, self.attribute, self._original)
        self._original = None
        self._observer = None
