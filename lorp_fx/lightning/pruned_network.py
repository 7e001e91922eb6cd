"""What `LoRPCallback(apply=True)` hands back to the LightningModule: a model to keep using.

* A `transformers` network gets its layers removed eagerly
  (`surgery.remove_layers`): the result is the same `PreTrainedModel` class with a
  consistent config, so it generates with a KV cache, saves with `save_pretrained`,
  pickles, and `.train()` brings dropout back. A traced graph can do none of that: it
  was traced without a cache and computes what one call computed. The eager model
  is checked against the pruned graph on a recorded calibration call.
* Any other network gets the pruned graph. `symbolic_trace` graphs keep the
  network's modules as `call_module` nodes, so dropout and batch norm follow
  `.train()`/`.eval()`, and the graph pickles. A network that only `torch.export`
  could trace becomes ATen operations recorded in eval mode: dropout stays off and
  batch norm uses its running statistics whatever `.train()` says (a warning says so).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from lorp_fx.arch.surgery import remove_layers
from lorp_fx.calibration.network_call import NetworkCall
from lorp_fx.compensation.fit import apply_compensation
from lorp_fx.core.errors import CalibrationError
from lorp_fx.core.model import is_transformers_model
from lorp_fx.core.plan import PruningPlan
from lorp_fx.graph.rewrite import prune
from lorp_fx.judge.loss import output_logits


def pruned_network(network: nn.Module, graph: GraphModule, plan: PruningPlan, call: NetworkCall | None,
                   fits: list | None = None) -> nn.Module:
    """`network` without the plan's blocks: eager for `transformers` models, else the pruned graph.

    Layer plans are applied to the eager network in place (its kept parameters stay
    the same objects, so an optimizer holding them keeps working); sublayer plans
    zero output projections, which the dense `graph` shares, so they go to a copy.
    `fits` (compensation maps, `transformers` models) are folded after the surgery is
    checked against the pruned graph, which has no maps.
    """
    if not is_transformers_model(network):
        pruned = prune(graph, plan)
        _warn_if_frozen_in_eval_mode(network, pruned)
        return pruned
    surgery = remove_layers(network, plan, inplace=plan.granularity == "layer")
    if call is not None:
        check_agreement(surgery.model, prune(graph, plan), call)
    return apply_compensation(surgery, plan.remove, fits or [])


@torch.no_grad()
def check_agreement(eager: nn.Module, graph: GraphModule, call: NetworkCall) -> float:
    """Max |difference| of the eager and graph outputs on one call; CalibrationError beyond rounding."""
    reference = _main_tensor(call.run(graph))
    result = _main_tensor(eager(*call.args, **call.kwargs))
    if reference is None or result is None or reference.shape != result.shape:
        return 0.0  # nothing comparable (no tensor output): the graph pass is tested on its own
    difference = float((result.float() - reference.float()).abs().max())
    scale = max(1.0, float(reference.float().abs().max()))
    tolerance = 1e-4 if reference.dtype in (torch.float32, torch.float64) else 3e-2
    if not difference <= tolerance * scale:
        raise CalibrationError(
            f"the eager model without the plan's layers differs from the pruned graph by {difference:.3g} on a "
            "calibration call; this is a lorp_fx bug: please report it, and use lorp_fx.prune(cb.graph_module, cb.plan)"
        )
    return difference


def _main_tensor(output) -> torch.Tensor | None:
    logits = output_logits(output)
    if logits is not None:
        return logits
    leaves = [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]
    return leaves[0] if leaves else None


def _warn_if_frozen_in_eval_mode(network: nn.Module, graph: GraphModule) -> None:
    if graph.meta.get("lorp_fx_frontend") != "export":
        return
    kinds = {"dropout": nn.modules.dropout._DropoutNd, "batch norm": nn.modules.batchnorm._BatchNorm}
    frozen = [name for name, kind in kinds.items() if any(isinstance(m, kind) for m in network.modules())]
    if frozen:
        warnings.warn(
            f"the pruned network is a torch.export graph (symbolic_trace could not trace it) recorded in eval mode: "
            f"its {' and '.join(frozen)} stay as in eval mode whatever .train() says; to train it, make the network "
            "symbolic_trace-able or remove its blocks from the eager network yourself",
            stacklevel=3,
        )
