"""The one table of tiny random-weight models every test uses, and the eager reference of pruning.

Each entry builds a config of a given depth; initializer_range 0.2 (not 0.02) so that
every layer visibly changes the logits. `REMOVALS` are layers a test may remove that
exercise the family's index-dependent details (sliding-window patterns, MoE kinds,
T5's two stacks).
"""

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import transformers as T

VOCAB = 97
SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

# The families the brief names (a test parametrised over FAMILIES covers each once).
FAMILIES = ["llama", "qwen3", "gemma3", "gpt2", "bert", "t5", "mixtral", "qwen2_moe"]
CAUSAL = [f for f in FAMILIES if f not in ("bert", "t5")]


def _alternating(n: int, period: int = 2, odd: str = "sliding_attention", even: str = "full_attention") -> list[str]:
    return [odd if i % period != period - 1 else even for i in range(n)]


def _decoder(cls, layers: int, **extra):
    base = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=layers, max_position_embeddings=64, initializer_range=0.2, **SPECIAL_IDS,
    )
    return cls(**{**base, **extra})


@dataclass(frozen=True)
class Tiny:
    config: Callable[[int], object]  # depth -> config
    auto: type
    depth: int = 5


TINY = {
    "llama": Tiny(lambda n: _decoder(T.LlamaConfig, n), T.AutoModelForCausalLM),
    "mistral": Tiny(lambda n: _decoder(T.MistralConfig, n, head_dim=8), T.AutoModelForCausalLM),
    "qwen2": Tiny(lambda n: _decoder(T.Qwen2Config, n), T.AutoModelForCausalLM),
    "qwen3": Tiny(
        lambda n: _decoder(T.Qwen3Config, n, head_dim=8, use_sliding_window=True, sliding_window=3,
                           layer_types=_alternating(n, odd="full_attention", even="sliding_attention")),
        T.AutoModelForCausalLM,
    ),
    "gemma3": Tiny(
        lambda n: _decoder(T.Gemma3TextConfig, n, head_dim=8, sliding_window=3, query_pre_attn_scalar=8,
                           layer_types=_alternating(n, period=3)),
        T.AutoModelForCausalLM,
    ),
    "gpt2": Tiny(lambda n: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=n, n_head=4, n_positions=64, initializer_range=0.2, **SPECIAL_IDS), T.AutoModelForCausalLM),
    # Attention scores scaled by 1/(layer_idx+1): renumbering must not change them.
    "gpt2-scaled": Tiny(
        lambda n: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=n, n_head=4, n_positions=64, initializer_range=0.2,
                               scale_attn_by_inverse_layer_idx=True, **SPECIAL_IDS),
        T.AutoModelForCausalLM,
    ),
    "mixtral": Tiny(lambda n: _decoder(T.MixtralConfig, n, num_local_experts=4, num_experts_per_tok=2), T.AutoModelForCausalLM),
    # Layers 1 and 5 are sparse MoE (step 2, layer 3 forced dense); removing layer 0
    # moves every later layer to an index where the old rule picks the other kind.
    "qwen2_moe": Tiny(
        lambda n: _decoder(T.Qwen2MoeConfig, n, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                           num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[3]),
        T.AutoModelForCausalLM, depth=6,
    ),
    "t5": Tiny(
        lambda n: T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=n, num_decoder_layers=n - 1,
                             num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2, initializer_factor=2.0),
        T.AutoModelForSeq2SeqLM,
    ),
    "bert": Tiny(
        lambda n: T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=n, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64, pad_token_id=0),
        T.AutoModelForMaskedLM, depth=4,
    ),
}

# Layers whose removal exercises each family's details.
REMOVALS = {
    "llama": ["model.layers.1", "model.layers.2"],
    "mistral": ["model.layers.2"],
    "qwen2": ["model.layers.1", "model.layers.3"],
    "qwen3": ["model.layers.0", "model.layers.3"],
    "gemma3": ["model.layers.1", "model.layers.2"],
    "gpt2": ["transformer.h.2"],
    "gpt2-scaled": ["transformer.h.0", "transformer.h.2"],
    "mixtral": ["model.layers.2"],
    "qwen2_moe": ["model.layers.0", "model.layers.4"],
    "t5": ["encoder.block.2", "decoder.block.1"],
    "bert": ["bert.encoder.layer.1", "bert.encoder.layer.3"],
}


def tiny_model(family: str, layers: int | None = None, seed: int = 0, **options):
    """A tiny random-weight model of `family` (a key of TINY) with `layers` layers (the family's default depth);
    `options` go to `from_config` (e.g. experts_implementation="eager")."""
    tiny = TINY[family]
    torch.manual_seed(seed)
    return tiny.auto.from_config(tiny.config(layers or tiny.depth), **options).eval()


def example_inputs(family: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(4, VOCAB, (batch, seq), generator=generator)}
    if family == "t5":
        inputs["decoder_input_ids"] = torch.randint(4, VOCAB, (batch, max(seq - 2, 2)), generator=generator)
    return inputs


def trace_inputs(family: str, **kwargs) -> dict:
    inputs = example_inputs(family, **kwargs)
    if family != "bert":
        inputs["use_cache"] = False
    return inputs


def layer_lists(model) -> dict[str, torch.nn.ModuleList]:
    """Path -> residual layer list, written out per family (independent of the library's discovery)."""
    for path in ("model.layers", "transformer.h", "bert.encoder.layer"):
        try:
            return {path: model.get_submodule(path)}
        except AttributeError:
            continue
    return {"encoder.block": model.get_submodule("encoder.block"), "decoder.block": model.get_submodule("decoder.block")}


def layer_names(model) -> list[str]:
    return [f"{path}.{i}" for path, layers in layer_lists(model).items() for i in range(len(layers))]


def eager_without(model, remove: list[str]):
    """The eager reference: a copy of `model` with the named layers deleted from their lists.

    Nothing is renumbered: without a KV cache forward() does not read layer_idx, and
    each kept module keeps exactly the computation it had. What forward() reads by
    position (layer_types, the layer count) follows the deletion.
    """
    pruned = copy.deepcopy(model)
    for path, layers in layer_lists(pruned).items():
        kept = [i for i in range(len(layers)) if f"{path}.{i}" not in remove]
        parent, _, attr = path.rpartition(".")
        owner = pruned.get_submodule(parent)
        setattr(owner, attr, torch.nn.ModuleList([layers[i] for i in kept]))
        config = getattr(owner, "config", pruned.config)
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = [config.layer_types[i] for i in kept]
        config.num_hidden_layers = len(kept)
    return pruned


def logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def tiny_tokenizer(size: int = VOCAB, pad: bool = True):
    """A word-level tokenizer over w0, w1, ... plus 4 specials (`size` tokens in all), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(size - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return T.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>" if pad else None, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
