"""Tiny random-weight configurations of every supported family, and the eager reference of pruning."""

import copy

import torch
import transformers as T

VOCAB = 97

FAMILIES = ["llama", "qwen3", "gemma3", "gpt2", "bert", "t5", "mixtral", "qwen2_moe"]


def tiny_model(family: str, layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    decoder = dict(common, num_hidden_layers=layers, num_key_value_heads=2)
    if family == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(**decoder))
    elif family == "qwen3":
        model = T.Qwen3ForCausalLM(T.Qwen3Config(**decoder, head_dim=8))
    elif family == "gemma3":
        types = ["sliding_attention", "full_attention"] * layers
        config = T.Gemma3TextConfig(**decoder, head_dim=8, sliding_window=3, layer_types=types[:layers])
        model = T.Gemma3ForCausalLM(config)
    elif family == "gpt2":
        config = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64)
        config.bos_token_id = config.eos_token_id = 1
        model = T.GPT2LMHeadModel(config)
    elif family == "bert":
        model = T.BertForMaskedLM(T.BertConfig(**common, num_hidden_layers=layers))
    elif family == "t5":
        config = T.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=layers, num_decoder_layers=3, num_heads=4,
            decoder_start_token_id=0,
        )
        model = T.T5ForConditionalGeneration(config)
    elif family == "mixtral":
        model = T.MixtralForCausalLM(T.MixtralConfig(**decoder, num_local_experts=4, num_experts_per_tok=2))
    elif family == "qwen2_moe":
        config = T.Qwen2MoeConfig(
            **decoder, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2
        )
        model = T.Qwen2MoeForCausalLM(config)
    else:
        raise ValueError(family)
    return model.eval()


def example_inputs(family: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(2, VOCAB, (batch, seq), generator=generator)}
    if family == "t5":
        inputs["decoder_input_ids"] = torch.randint(2, VOCAB, (batch, max(seq - 2, 2)), generator=generator)
    return inputs


def trace_inputs(family: str, **kwargs) -> dict:
    inputs = example_inputs(family, **kwargs)
    if family != "bert":
        inputs["use_cache"] = False
    return inputs


def layer_lists(model) -> dict[str, torch.nn.ModuleList]:
    """Path -> residual layer list, by family."""
    for path in ("model.layers", "transformer.h", "bert.encoder.layer"):
        try:
            return {path: model.get_submodule(path)}
        except AttributeError:
            continue
    return {"encoder.block": model.get_submodule("encoder.block"), "decoder.block": model.get_submodule("decoder.block")}


def layer_names(model) -> list[str]:
    return [f"{path}.{i}" for path, layers in layer_lists(model).items() for i in range(len(layers))]


def eager_without(model, remove: list[str]):
    """The eager reference: a copy of `model` with the named layers deleted from their lists."""
    pruned = copy.deepcopy(model)
    for path, layers in layer_lists(pruned).items():
        kept = [i for i in range(len(layers)) if f"{path}.{i}" not in remove]
        parent, _, attr = path.rpartition(".")
        setattr(pruned.get_submodule(parent), attr, torch.nn.ModuleList([layers[i] for i in kept]))
        config = pruned.config
        if getattr(config, "layer_types", None) is not None and path == "model.layers":
            config.layer_types = [config.layer_types[i] for i in kept]
        if path == "model.layers":
            config.num_hidden_layers = len(kept)
        for new_index, layer in enumerate(pruned.get_submodule(path)):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_index
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
