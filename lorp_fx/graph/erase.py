"""Erasing residual blocks from a graph in place: the core of the rewrite, shared by GraphModules and
ExportedPrograms.

Removing block `exit = x + f(x)` means: every user of `exit` reads `x` instead, and the
nodes of `f` are erased. The names are resolved and checked first (unknown, duplicated,
overlapping, not removable, or over the budget rule); nothing is erased unless all pass.
"""

from __future__ import annotations

from torch.fx import GraphModule
from torch.fx.node import map_arg

from lorp_fx.core.budget import check_kept
from lorp_fx.core.errors import NotRemovableError, PlanError, UnknownBlockError
from lorp_fx.core.plan import GRANULARITIES
from lorp_fx.graph.blocks import ResidualBlock, find_blocks
from lorp_fx.graph.outputs import output_node

REMOVED_META = "lorp_fx_removed"  # gm.meta: names of the blocks removed so far, in removal order


def remove_blocks(gm: GraphModule, names: list[str]) -> list[str]:
    """Remove the named blocks from `gm` in place (no clean-up); returns the names removed."""
    chosen = _resolve(gm, names)
    for block in sorted(chosen, key=lambda b: b.index, reverse=True):
        _remove_block(gm, block)
    gm.meta[REMOVED_META] = [*gm.meta.get(REMOVED_META, []), *names]
    return names


def _resolve(gm: GraphModule, names: list[str]) -> list[ResidualBlock]:
    by_name: dict[str, ResidualBlock] = {}
    for granularity in GRANULARITIES:
        for block in find_blocks(gm, granularity):
            by_name.setdefault(block.name, block)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PlanError(f"blocks named more than once: {duplicates}; name each block once")
    unknown = [n for n in names if n not in by_name]
    if unknown:
        gone = set(gm.meta.get(REMOVED_META, []))
        if unknown[0] in gone:
            raise UnknownBlockError(f"{unknown[0]!r} was already removed from this graph; name only blocks it still has")
        raise UnknownBlockError(
            f"no residual block named {unknown[0]!r}; the graph has: {', '.join(by_name)}"
        )
    chosen = [by_name[n] for n in names]
    _check_overlap(chosen)
    for block in chosen:
        if not block.removable:
            raise NotRemovableError(f"{block.name} cannot be removed: {block.reason}")
    _check_budget(gm, chosen)
    return chosen


def _check_budget(gm: GraphModule, chosen: list[ResidualBlock]) -> None:
    """The budget rule (lorp_fx/budget.py) at the plan's granularity: layers, or sublayers for a mixed plan."""
    granularity = "layer" if all(b.kind == "layer" for b in chosen) else "sublayer"
    blocks = find_blocks(gm, granularity)
    gone = {n for b in chosen for n in ([b.name] if granularity == "layer" or b.kind != "layer" else b.sublayers)}
    streams = {f"stream {b.stream}": 0 for b in blocks}
    removed = dict(streams)
    for block in blocks:
        streams[f"stream {block.stream}"] += 1
        removed[f"stream {block.stream}"] += block.name in gone
    check_kept(streams, removed, what=f"{granularity} blocks")


def _check_overlap(chosen: list[ResidualBlock]) -> None:
    for block in chosen:
        inner = [other for other in chosen if other is not block and other.name in block.sublayers]
        if inner:
            raise PlanError(
                f"{inner[0].name} is part of {block.name}, which is removed too; name one or the other"
            )


def _remove_block(gm: GraphModule, block: ResidualBlock) -> None:
    block.exit.replace_all_uses_with(block.entry)
    _return_none_for(gm, set(block.nodes))
    for node in reversed(block.nodes):
        _erase_dead_users(gm, node)
        gm.graph.erase_node(node)


def _return_none_for(gm: GraphModule, nodes: set) -> None:
    """Output slots that returned one of `nodes` (a removed layer's attention weights) return None."""
    output = output_node(gm)
    if any(n in nodes for n in output.all_input_nodes):
        output.args = map_arg(output.args, lambda n: None if n in nodes else n)


def _erase_dead_users(gm: GraphModule, node) -> None:
    """Erase the shape arithmetic that only the block's nodes needed (sym_size of its tensors)."""
    for user in list(node.users):
        _erase_dead_users(gm, user)
        if not user.users:
            gm.graph.erase_node(user)
