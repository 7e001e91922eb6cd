"""`LoRPCallback`: collect residual-stream statistics during `Trainer.validate` and choose blocks to prune."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from .budget import budget_from_ratio, check_budget
from .errors import BudgetError, CalibrationError, ConfigError, LoRPError
from .loss import calibration_loss
from .observe import ResidualObserver
from .plan import PruningPlan
from .rewrite import prune
from .selectors import DEFAULT_METHOD, SELECTORS, check_options, select
from .stats import SimilarityAccumulator


class LoRPCallback(Callback):
    """Observe the residual stream of `pl_module.<attribute>` during validation, then plan a pruning.

    Usage::

        cb = LoRPCallback(n_remove=9, method="shortgpt")
        Trainer(callbacks=[cb], accelerator="cpu", logger=False).validate(module, dataloaders=calibration)
        pruned = lorp_fx.prune(cb.graph_module, cb.plan)

    The LightningModule's `validation_step` is left as it is: for the duration of the
    loop the network attribute is replaced by a `ResidualObserver` that traces it on
    the first call and records the residual states of every call (padding excluded
    through `attention_mask`). At the end the sums are all-reduced across processes
    (DDP, FSDP), every rank selects the same plan, and the network is put back
    (or, with `apply=True`, replaced by the pruned graph). The callback calibrates
    once; later validations only measure.

    Args:
        n_remove: number of blocks to remove; or `ratio`, a fraction of the blocks.
        method: a name from `lorp_fx.SELECTORS`.
        granularity: "layer" or "sublayer" (attention and MLP separately).
        apply: replace the network by the pruned graph when validation ends.
        attribute: where the LightningModule keeps its network.
        plan_path: where rank zero writes the plan as JSON; the way to get the plan
            back from `strategy="ddp_spawn"`, whose workers share no memory with the
            parent process (`cb.plan` reads it there).
        loss_batches: calibration batches kept (inputs only) for methods that judge
            candidates by calibration loss (sleb, lorp); under DDP each rank keeps
            its own and the loss is their mean over ranks, so all ranks choose alike.
        protected, seed, n_clusters: passed to the selector.
    """

    def __init__(
        self,
        n_remove: int | None = None,
        *,
        ratio: float | None = None,
        method: str = DEFAULT_METHOD,
        granularity: str = "layer",
        apply: bool = False,
        attribute: str = "model",
        plan_path: str | os.PathLike | None = None,
        loss_batches: int = 2,
        protected: Sequence[str | int] | None = None,
        seed: int | None = None,
        n_clusters: int | None = None,
    ):
        if (n_remove is None) == (ratio is None):
            raise BudgetError("give exactly one budget: n_remove (a number of blocks) or ratio (a fraction)")
        if n_remove is not None and (isinstance(n_remove, bool) or not isinstance(n_remove, int) or n_remove < 1):
            raise BudgetError(f"n_remove must be a whole number of blocks, at least 1, got {n_remove!r}")
        if ratio is not None:
            budget_from_ratio(10, ratio)  # validates the range
        if granularity not in ("layer", "sublayer"):
            raise ConfigError(f"granularity must be 'layer' or 'sublayer', not {granularity!r}")
        given = {k: v for k, v in {"protected": protected, "seed": seed, "n_clusters": n_clusters}.items() if v is not None}
        check_options(method, given, require=False)
        self.n_remove, self.ratio, self.method, self.granularity = n_remove, ratio, method, granularity
        self.apply, self.attribute, self.loss_batches = apply, attribute, loss_batches
        self.plan_path = None if plan_path is None else Path(plan_path)
        self.selector_options = given
        self.graph_module: torch.fx.GraphModule | None = None
        self._plan: PruningPlan | None = None
        self._observer: ResidualObserver | None = None
        self._original: torch.nn.Module | None = None
        self._loss_inputs: list[dict] = []
        self._failed = False

    # ------------------------------------------------------------------ results

    @property
    def plan(self) -> PruningPlan | None:
        """The plan; after `ddp_spawn`, read from `plan_path`, which rank zero wrote."""
        if self._plan is None and self.plan_path is not None and self.plan_path.exists():
            self._plan = PruningPlan.load(self.plan_path)
        return self._plan

    # ------------------------------------------------------------------ hooks

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Swap the network for an observer (only until a plan exists)."""
        if self._plan is not None:
            return
        network = getattr(pl_module, self.attribute, None)
        if not isinstance(network, torch.nn.Module):
            children = ", ".join(name for name, _ in pl_module.named_children()) or "none"
            raise LoRPError(
                f"{type(pl_module).__name__} has no network attribute {self.attribute!r} "
                f"(its submodules: {children}); pass LoRPCallback(attribute=...)"
            )
        self._original = network
        self._observer = ResidualObserver(network, self.granularity)
        self._loss_inputs = []
        setattr(pl_module, self.attribute, self._observer)

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._observer is not None and len(self._loss_inputs) < self.loss_batches and isinstance(batch, dict):
            self._loss_inputs.append({k: v.detach().clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        # Fail on the first batch, not after the whole loop, when the budget cannot be met.
        if self._observer is not None and self._observer.calls and batch_idx == 0:
            blocks = self._observer.blocks
            self._check_budget(len(blocks), len([b for b in blocks if b.removable]))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Reduce the sums across processes, select, and put the network back (or the pruned one)."""
        if self._observer is None:
            return
        observer = self._observer
        try:
            self._reduce(trainer, observer.accumulators(), observer.calls)
            stats = observer.statistics()
            self.graph_module = observer.graph
            options = dict(self.selector_options)
            if SELECTORS[self.method].judges_by_loss:
                loss_fn = self._loss_function(trainer, observer)
                if loss_fn is not None:
                    options["loss_fn"] = loss_fn
            self._plan = select(stats, self.n_remove, ratio=self.ratio, method=self.method, **options)
        finally:
            self._restore(pl_module)
        if self.plan_path is not None and trainer.is_global_zero:
            self._plan.save(self.plan_path)
        rank_zero_info(f"LoRP ({self.method}): remove {', '.join(self._plan.remove)}")
        if self.apply:
            setattr(pl_module, self.attribute, prune(self.graph_module, self._plan))

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Whatever failed, the LightningModule gets its own network back."""
        self._failed = True
        self._restore(pl_module)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._failed = False

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Lightning skips an empty loop without a hook; say so instead of leaving no plan."""
        if stage == "validate" and self._plan is None and not self._failed:
            raise CalibrationError(
                "no calibration batch was seen: the calibration loader is empty; "
                "pass a dataloader with at least one batch of calibration text"
            )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"plan": None if self._plan is None else self._plan.to_dict()}
        if self._observer is not None:
            state["sums"] = [acc.state_dict() for acc in self._observer.accumulators()]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        plan = state_dict.get("plan")
        self._plan = None if plan is None else PruningPlan.from_dict(plan)

    # ------------------------------------------------------------------ helpers

    def _restore(self, pl_module: LightningModule) -> None:
        if self._original is not None:
            setattr(pl_module, self.attribute, self._original)
        self._original = None
        self._observer = None

    def _check_budget(self, blocks: int, removable: int) -> None:
        wanted = self.n_remove if self.n_remove is not None else budget_from_ratio(blocks, self.ratio)
        check_budget(blocks, wanted, eligible=removable, what=f"{self.granularity} blocks")

    @staticmethod
    def _reduce(trainer: Trainer, accumulators: list[SimilarityAccumulator], calls: int) -> None:
        """All-reduce the sums once; clones, because `strategy.reduce` may work in place."""
        total_calls = trainer.strategy.reduce(torch.tensor(float(calls), device=trainer.strategy.root_device), reduce_op="sum")
        if float(total_calls) == 0:
            raise CalibrationError("no calibration batch was seen: the calibration loader is empty")
        for accumulator in accumulators:
            for name in SimilarityAccumulator.SUM_NAMES:
                value = getattr(accumulator, name).clone()
                setattr(accumulator, name, trainer.strategy.reduce(value, reduce_op="sum").to(torch.float64))

    def _loss_function(self, trainer: Trainer, observer: ResidualObserver) -> Callable[[list[str]], float] | None:
        """Calibration loss on the kept batches, averaged over the ranks.

        Loss-judged selectors choose their next candidates from the losses they have
        seen, so every rank must see the same numbers to ask the same questions (the
        reductions stay matched) and end with the same plan.
        """
        local = None if observer.graph is None else calibration_loss(observer.graph, self._loss_inputs)
        if trainer.world_size == 1:
            return local
        reduce, device = trainer.strategy.reduce, trainer.strategy.root_device  # NCCL reduces device tensors only
        if float(reduce(torch.tensor(float(local is not None), device=device), reduce_op="sum")) == 0:
            return None

        def loss(removed: list[str]) -> float:
            value, count = (local(removed), 1.0) if local is not None else (0.0, 0.0)
            total = reduce(torch.tensor([value * count, count], dtype=torch.float64, device=device), reduce_op="sum")
            return float(total[0] / total[1])

        return loss
