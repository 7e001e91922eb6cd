"""Trace a model, list its residual blocks, remove two, and check the result against eager PyTorch.

    python examples/trace_and_prune.py

Uses a small random-weight Llama so it runs in seconds anywhere; any `transformers`
causal LM works the same way.
"""

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorp_fx

torch.manual_seed(0)
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                     num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(0, 256, (2, 16))

gm = lorp_fx.trace(model, {"input_ids": ids, "use_cache": False})
print("layers:")
for block in lorp_fx.find_blocks(gm, granularity="layer"):
    print(f"  {block.index}: {block.name:20s} {block.entry.name} -> {block.exit.name}")
print("sublayers:")
for block in lorp_fx.find_blocks(gm, granularity="sublayer"):
    print(f"  {block.index}: {block.name:28s} {block.kind}")

remove = ["model.layers.2", "model.layers.4"]
pruned = lorp_fx.prune(gm, remove)

# The eager reference: the same model with those layers deleted from its list.
reference = copy.deepcopy(model)
reference.model.layers = torch.nn.ModuleList(
    layer for i, layer in enumerate(reference.model.layers) if f"model.layers.{i}" not in remove
)
for i, layer in enumerate(reference.model.layers):
    layer.self_attn.layer_idx = i
reference.config.num_hidden_layers = len(reference.model.layers)

other = torch.randint(0, 256, (3, 11))  # other batch size and length than traced with
with torch.no_grad():
    difference = (pruned(input_ids=other).logits - reference(input_ids=other, use_cache=False).logits).abs().max()
count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
print(f"removed {remove}: parameters {count(gm):,} -> {count(pruned):,}, max |pruned - eager| = {difference:.2e}")
assert difference < 1e-4
