"""Run a traced graph as a pruned, compensated model, starting anywhere in depth.

`lorp_fx.graph.rewrite.prune` builds a new GraphModule per removal set (0.6 s on
SmolLM2-135M, a quarter of a loss measurement). A loss-judged selector asks for
dozens of removal sets, most of which agree with one measured before up to some
depth. `GraphRunner` instead interprets the one traced graph node by node:

* a removed unit's exit takes the value of its entry (what `prune` rewires);
* `maps[u] = T` replaces unit u's residual add `x + m` by `x + m T^T`: a linear map
  on the branch output, which is exactly what folding T into the unit's output
  projection does (`lorp_fx.compensation`), without touching any weight;
* `resume=(u, state)` starts at unit u's entry with a given state: the nodes that
  only lead to that point are not run (depth locality: a model agrees with another
  one up to the first unit where their configurations differ);
* `record=True` returns the state entering every unit from the resume point on, so
  the next measurement can start from it.

Units are the residual sublayers (`find_blocks(graph, "sublayer")`); a layer is the
run of units `find_blocks(graph, "layer")` groups. `fetch` gives the weights where the graph's own
are not real (the meta-device skeleton of a model that accelerate offloads): each weight is then
fetched when a node first needs it and let go after its last use, so a run holds the weights of a
few nodes at a time, as the offloaded model's own forward does. Per node the interpreter costs a
few microseconds (2,400 nodes on SmolLM2: ~10 ms a batch against ~1 s of compute).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch
from torch.fx import GraphModule, Node

from lorp_fx.core.errors import UnknownBlockError
from lorp_fx.graph.blocks import ResidualBlock, find_blocks
from lorp_fx.graph.nodes import module_class

_META = torch.device("meta")
_HISTC = torch.ops.aten.histc.default
# Ops a skip connection may pass through between a unit's entry and its residual add.
_SKIP_OPS = {"to", "_to_copy", "clone", "contiguous", "alias", "detach", "dropout", "type_as", "float", "type"}


@dataclass(frozen=True)
class _Plan:
    steps: tuple  # (node, kind) in execution order
    free_after: dict  # step index -> nodes whose last use it is


class GraphRunner:
    """Interpret `graph` with units removed, maps on branch outputs, a resume point."""

    def __init__(self, graph: GraphModule, fetch: Callable[[str], torch.Tensor] | None = None):
        self.graph = graph
        self._fetch = fetch or partial(_fetch, graph)
        self._streamed = fetch is not None
        self._device: torch.device | None = None  # with `fetch`: the device of the batch being run
        self.units: list[ResidualBlock] = find_blocks(graph, "sublayer")
        self.layers: list[ResidualBlock] = find_blocks(graph, "layer")
        self.nodes = list(graph.graph.nodes)
        self.position = {node: i for i, node in enumerate(self.nodes)}
        self.output = next(n for n in self.nodes if n.op == "output")
        self.layer_units = self._group_units()
        self._exit_unit = {u.exit: i for i, u in enumerate(self.units)}
        self._branch = {i: _branch_operand(u) for i, u in enumerate(self.units)}
        self._plans: dict = {}

    # ------------------------------------------------------------------ names

    def _group_units(self) -> list[list[int]]:
        """Unit indices of each layer block: the units from the layer's entry to its exit."""
        groups, u = [], 0
        for layer in self.layers:
            while self.units[u].entry is not layer.entry:
                u += 1
            first = u
            while self.units[u].exit is not layer.exit:
                u += 1
            groups.append(list(range(first, u + 1)))
            u += 1
        return groups

    def units_of(self, names: Iterable[str]) -> frozenset[int]:
        """Unit indices removed by layer or sublayer names."""
        by_layer = {layer.name: self.layer_units[i] for i, layer in enumerate(self.layers)}
        by_unit = {unit.name: [i] for i, unit in enumerate(self.units)}
        found: set[int] = set()
        for name in names:
            chosen = by_layer.get(name, by_unit.get(name))
            if chosen is None:
                raise UnknownBlockError(f"no residual block named {name!r} in this graph; see stats.blocks for the names")
            found.update(chosen)
        return frozenset(found)

    def compensable(self, unit: int) -> bool:
        """Whether a map on unit's branch output equals a fold into its weights: pre-norm (the add
        is the unit's exit) with the branch operand found. Where the branch is normalised before
        the add (Gemma's sandwich norms) only a per-channel map folds (into that norm's weight):
        see `branch_normalised`."""
        u = self.units[unit]
        return u.exit is u.residual_add and self._branch[unit] is not None

    def branch_normalised(self, unit: int) -> bool:
        """True where the unit's branch output passes a norm right before the residual add."""
        position = self._branch[unit]
        return position is not None and "Norm" in module_class(self.units[unit].residual_add.args[position])

    # ------------------------------------------------------------------ running

    @torch.no_grad()
    def run(
        self,
        batch: dict,
        removed: frozenset[int] = frozenset(),
        maps: dict[int, torch.Tensor] | None = None,
        resume: tuple[int, torch.Tensor] | None = None,
        record: bool = False,
        stop: int | None = None,
    ):
        """(graph output, {unit: state entering it}) when `record`, else the output.

        Recorded states are keyed by unit index, and len(units) for the final state
        before the head. With `stop=u` the run ends at unit u's entry (u = len(units):
        the final state) and the output is None: no head, nothing after.
        """
        maps = maps or {}
        if self._streamed:
            self._device = next(v.device for v in batch.values() if isinstance(v, torch.Tensor))
        start = resume[0] if resume is not None else None
        plan = self._plan(removed, start, stop)
        env: dict[Node, object] = {}
        recorded: dict[int, torch.Tensor] = {}
        watch = self._watch(start, removed) if record else {}
        for index, (node, kind) in enumerate(plan.steps):
            if kind == "resume":
                value = resume[1]
            elif kind == "alias":
                value = env[self.units[self._exit_unit[node]].entry]
            else:
                value = self._compute(node, env, batch, maps)
            env[node] = value
            for unit in watch.get(node, ()):
                recorded[unit] = value
            for dead in plan.free_after.get(index, ()):
                env.pop(dead, None)
        output = None if stop is not None else self.graph.graph._codegen.process_outputs(env.pop(self.output))
        return (output, recorded) if record else output

    def _watch(self, start: int | None, removed: frozenset[int]) -> dict[Node, list[int]]:
        """Nodes whose value is the state entering a unit at or after `start` (and the final state)."""
        watch: dict[Node, list[int]] = {}
        first = start or 0
        for i in range(first, len(self.units)):
            watch.setdefault(self.units[i].entry, []).append(i)
        last = self.units[-1]
        watch.setdefault(last.exit, []).append(len(self.units))
        return watch

    def _compute(self, node: Node, env: dict, batch: dict, maps: dict):
        if node.op == "placeholder":
            return batch.get(node.name)
        if node.op == "get_attr":
            value = self._fetch(node.target)
            # A spread model's weights lie on several devices: each comes to the inputs' device while it is used.
            return value.to(self._device) if self._streamed and isinstance(value, torch.Tensor) else value
        if node.op == "output":
            return _load(node.args[0], env)
        args, kwargs = _load(node.args, env), _load(node.kwargs, env)
        if self._streamed:  # a skeleton's factories, moves and checks name the meta device: the inputs' one instead
            args = tuple(self._device if a == _META else a for a in args)
            kwargs = {k: self._device if v == _META else v for k, v in kwargs.items()}
        unit = self._exit_unit.get(node)
        if unit is not None and unit in maps and self.units[unit].residual_add is node:
            position = self._branch[unit]
            args = list(args)
            args[position] = args[position] @ maps[unit].to(args[position]).T  # its dtype and device
        if node.op == "call_function":
            if self._streamed and node.target is _HISTC:
                return _histogram(*args, **kwargs)
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return self.graph.get_submodule(node.target)(*args, **kwargs)

    def _plan(self, removed: frozenset[int], start: int | None, stop: int | None) -> _Plan:
        key = (removed, start, stop)
        if key not in self._plans:
            if len(self._plans) > 512:
                self._plans.clear()
            self._plans[key] = self._make_plan(removed, start, stop)
        return self._plans[key]

    def state_node(self, unit: int) -> Node:
        """The node holding the state entering `unit` (len(units): the final state)."""
        return self.units[-1].exit if unit == len(self.units) else self.units[unit].entry

    def _make_plan(self, removed: frozenset[int], start: int | None, stop: int | None) -> _Plan:
        """The nodes the target needs, in graph order, with the step after which each dies."""
        leaf = self.state_node(start) if start is not None else None
        aliased = {self.units[u].exit: self.units[u].entry for u in removed}
        target = self.output if stop is None else self.state_node(stop)
        needed, stack = set(), [target]
        while stack:
            node = stack.pop()
            if node in needed:
                continue
            needed.add(node)
            if node is leaf:
                continue
            if node in aliased:
                stack.append(aliased[node])
                continue
            stack.extend(node.all_input_nodes)
        order = sorted(needed, key=self.position.__getitem__)
        steps = []
        for node in order:
            kind = "resume" if node is leaf else "alias" if node in aliased else "compute"
            steps.append((node, kind))
        last_use: dict[Node, int] = {}
        for index, (node, kind) in enumerate(steps):
            inputs = () if kind == "resume" else (aliased[node],) if kind == "alias" else node.all_input_nodes
            for parent in inputs:
                last_use[parent] = index
        free_after: dict[int, list[Node]] = {}
        for node, index in last_use.items():
            if node.op != "get_attr" or self._streamed:
                free_after.setdefault(index, []).append(node)
        return _Plan(tuple(steps), free_after)


def _branch_operand(unit: ResidualBlock) -> int | None:
    """Position (0 or 1) of the branch output among the residual add's operands, or None.

    The skip operand reaches the unit's entry through value-preserving ops only.
    """
    operands = [a for a in unit.residual_add.args[:2]]
    if len(operands) != 2 or not all(isinstance(a, Node) for a in operands):
        return None
    for position, operand in enumerate(operands):
        node = operand
        while node is not unit.entry and node.op == "call_function" and _op(node) in _SKIP_OPS:
            inputs = [p for p in node.all_input_nodes if p.op != "get_attr"]
            if len(inputs) != 1:
                break
            node = inputs[0]
        if node is unit.entry:
            return 1 - position
    return None


def _op(node: Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def _fetch(module: torch.nn.Module, target: str):
    value = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _load(value, env: dict):
    if isinstance(value, Node):
        return env[value]
    if isinstance(value, (list, tuple)):
        loaded = [_load(v, env) for v in value]
        return type(value)(loaded) if isinstance(value, list) else tuple(loaded)
    if isinstance(value, dict):
        return {k: _load(v, env) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_load(value.start, env), _load(value.stop, env), _load(value.step, env))
    return value


def _histogram(values: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`aten.histc` of a skeleton's graph. Code that picks kernels by device type traced a histogram of integers
    on the meta device (transformers' MoE routing: integers on "other" devices, floats on the CPU), a kernel the CPU
    lacks. Counted as floats, as the model's own forward does there, in the integer dtype the graph expects: exact,
    since the values are small integers (expert indices) and counts stay far below 2**24."""
    if values.is_floating_point():
        return torch.histc(values, *args, **kwargs)
    return torch.histc(values.float(), *args, **kwargs).to(values.dtype)
