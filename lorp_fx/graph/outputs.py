"""A graph's outputs by name (`logits`, `hidden_states[2]`, `aux_loss`), for rewrites and messages.

An exported graph returns a flat list that its output spec (a pytree) turns back
into the model's output object; a symbolically traced graph returns the nested
structure itself. Either way every node the output reads gets a readable path,
and the fixed `output_*` argument that made an output appear can be named.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from torch.fx import GraphModule, Node


def output_node(gm: GraphModule) -> Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def output_names(gm: GraphModule) -> dict[Node, list[str]]:
    """Node -> the output paths where the graph returns it (a node can appear more than once)."""
    output = output_node(gm)
    if not output.args:
        return {}
    names: dict[Node, list[str]] = {}
    for path, leaf in _leaves(gm, output.args[0]):
        if isinstance(leaf, Node):
            names.setdefault(leaf, []).append(path or "output")
    return names


def producing_options(gm: GraphModule, names: list[str]) -> dict[str, Any]:
    """The fixed `output_*` arguments the graph was traced with that produce the outputs `names`.

    `output_hidden_states` produces `hidden_states` and `encoder_hidden_states`,
    `output_router_logits` produces `router_logits`. Outputs without a key of their
    own (a tuple returned with return_dict=False) are put down to every `output_*`
    option that was switched on.
    """
    fixed = gm.meta.get("lorp_fx_fixed_arguments", {})
    switched_on = {k: v for k, v in fixed.items() if k.startswith("output_") and v}
    keys = {_top_key(n) for n in names}
    found = {}
    for option, value in switched_on.items():
        produced = option[len("output_"):]
        if any(key == produced or key.endswith("_" + produced) for key in keys):
            found[option] = value
    return found or (switched_on if any(key.startswith("output[") or key == "output" for key in keys) else {})


def _top_key(name: str) -> str:
    return name.split("[", 1)[0].split(".", 1)[0]


def _leaves(gm: GraphModule, flat: Any) -> Iterator[tuple[str, Any]]:
    spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "out_spec", None)
    if spec is None or not isinstance(flat, (list, tuple)):
        yield from _structure_leaves(flat, "")
        return
    for path, index in zip(_spec_paths(spec, ""), range(len(flat))):
        yield _tidy(path), flat[index]


def _spec_paths(spec: Any, path: str) -> Iterator[str]:
    if spec.is_leaf():
        yield path
        return
    context = spec.context
    keys = getattr(context, "_fields", context)
    named = isinstance(keys, (list, tuple)) and len(keys) == spec.num_children and all(isinstance(k, str) for k in keys)
    for i in range(spec.num_children):
        yield from _spec_paths(spec.child(i), f"{path}.{keys[i]}" if named else f"{path}[{i}]")


def _structure_leaves(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _structure_leaves(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _structure_leaves(item, f"{path}[{i}]")
    else:
        yield _tidy(path), value


def _tidy(path: str) -> str:
    if path.startswith("."):
        return path[1:]
    return f"output{path}" if path else "output"
