"""Atomic output directories: complete or absent, never half written."""

from __future__ import annotations

import json
import os

import pytest
from tiny_models import REMOVALS, tiny_model, tiny_tokenizer

from lorp_fx.arch.surgery import remove_layers
from lorp_fx.core.errors import OutputDirError
from lorp_fx.io.checkpoint import save_pretrained_atomic
from lorp_fx.io.output_dir import MARKER, check_output_location, is_lorp_fx_output


def build(name: str):
    return tiny_model(name), None, REMOVALS[name]


def prune(model, removals):
    return remove_layers(model, removals).model


# --------------------------------------------------------------------------- saving


def test_save_writes_everything_and_leaves_no_temporary(tmp_path):
    model, _, removals = build("llama")
    out = save_pretrained_atomic(
        prune(model, removals), tiny_tokenizer(), tmp_path / "run",
        extra_files={"report.json": json.dumps({"ok": True}), "plots/similarity.png": b"\x89PNG"},
    )
    names = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    assert {"config.json", "model.safetensors", "tokenizer.json", "report.json", "plots/similarity.png"} <= names
    assert (out / "plots" / "similarity.png").read_bytes() == b"\x89PNG"
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is True and set(report) == {"ok", MARKER}  # the marker: lorp-fx wrote this
    assert is_lorp_fx_output(out)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_save_refuses_a_non_empty_directory_unless_overwrite(tmp_path):
    model, _, _ = build("llama")
    out = save_pretrained_atomic(model, None, tmp_path / "run")
    (out / "old.txt").write_text("written later")
    with pytest.raises(OutputDirError, match="not empty"):
        save_pretrained_atomic(model, None, out)
    assert (out / "old.txt").read_text() == "written later"

    save_pretrained_atomic(model, None, out, overwrite=True)  # lorp-fx wrote it: replaced whole
    assert not (out / "old.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_overwrite_never_replaces_a_directory_lorp_fx_did_not_write(tmp_path):
    model, _, _ = build("llama")
    for report in (None, "{}", '{"method": "shortgpt"}', "not json", '["lorp_fx"]'):
        out = tmp_path / "theirs"
        out.mkdir(exist_ok=True)
        (out / "data.csv").write_text("keep me")
        if report is not None:
            (out / "report.json").write_text(report)
        with pytest.raises(OutputDirError, match="not written by lorp-fx"):
            save_pretrained_atomic(model, None, out, overwrite=True)
        assert (out / "data.csv").read_text() == "keep me"


def test_a_report_json_that_is_not_an_object_cannot_mark_an_output(tmp_path):
    with pytest.raises(OutputDirError, match="JSON object"):
        save_pretrained_atomic(None, None, tmp_path / "run", extra_files={"report.json": "[1, 2]"})
    assert list(tmp_path.iterdir()) == []


def test_a_save_without_a_report_is_marked_too(tmp_path):
    out = save_pretrained_atomic(build("gpt2")[0], None, tmp_path / "run")
    assert is_lorp_fx_output(out) and set(json.loads((out / "report.json").read_text())) == {MARKER}


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("rename", ["renameat2", "portable"])
def test_save_into_an_existing_empty_directory(tmp_path, monkeypatch, overwrite, rename):
    if rename == "portable":
        monkeypatch.setenv("LORP_FX_PORTABLE_RENAME", "1")
    model, _, _ = build("gpt2")
    (tmp_path / "run").mkdir()
    save_pretrained_atomic(model, None, tmp_path / "run", overwrite=overwrite)
    assert (tmp_path / "run" / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model, _, _ = build("llama")

    def broken_save(directory, **kwargs):
        (directory / "config.json").write_text("{half")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained_atomic(model, None, tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_parent_is_a_clear_error(tmp_path):
    model, _, _ = build("llama")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OutputDirError, match="is a file, not a directory"):
        save_pretrained_atomic(model, None, blocker / "deeper" / "run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only directory")
def test_read_only_parent_is_a_clear_error(tmp_path):
    model, _, _ = build("llama")
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o500)
    with pytest.raises(OutputDirError, match="cannot write"):
        save_pretrained_atomic(model, None, parent / "run")


def test_output_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(OutputDirError, match="not a directory"):
        save_pretrained_atomic(build("llama")[0], None, tmp_path / "run", overwrite=True)


def test_extra_files_must_stay_inside(tmp_path):
    with pytest.raises(OutputDirError, match="inside the output directory"):
        save_pretrained_atomic(build("llama")[0], None, tmp_path / "run", extra_files={"../escape.txt": "x"})
    assert list(tmp_path.iterdir()) == []




# --------------------------------------------------------------------------- where output may go


@pytest.mark.parametrize("empty", ["", "   ", None])
def test_an_empty_output_name_is_refused(empty):
    with pytest.raises(OutputDirError, match="empty"):
        check_output_location(empty, overwrite=True)


def test_the_current_directory_and_its_ancestors_are_refused(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", work, tmp_path, "./"):
        with pytest.raises(OutputDirError, match="current directory"):
            check_output_location(out, overwrite=True)
    assert check_output_location("sub", overwrite=False) == work / "sub"


def test_an_output_that_is_or_contains_an_input_is_refused_even_with_overwrite(tmp_path):
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    text = tmp_path / "data" / "valid.txt"
    text.parent.mkdir()
    text.write_text("x")
    for out in (model, model.parent, tmp_path, text, text.parent):
        for overwrite in (False, True):
            with pytest.raises(OutputDirError, match="refused even with overwrite"):
                check_output_location(out, overwrite, protect=[model, text])
    # inside a model's folder (a checkpoint: config.json): refused too, as --offload-dir there is (one rule for
    # both, issue 26); beside an input, or in a folder that merely holds one (a .gguf file, a text), allowed
    assert check_output_location(model / "pruned", True, protect=[model, text]) == model / "pruned"
    assert check_output_location(text.parent / "pruned", True, protect=[model, text]) == text.parent / "pruned"
    (model / "config.json").write_text("{}")
    with pytest.raises(OutputDirError, match="lies inside the input"):
        check_output_location(model / "pruned", True, protect=[model, text])
    assert check_output_location(tmp_path / "out", True, protect=[model, text]) == tmp_path / "out"


def test_a_symbolic_link_is_resolved_before_the_checks(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    link = tmp_path / "link"
    link.symlink_to(model)
    with pytest.raises(OutputDirError, match="is the input"):
        check_output_location(link, True, protect=[model])
    protected_link = tmp_path / "model-link"
    protected_link.symlink_to(model)
    with pytest.raises(OutputDirError, match="is the input"):
        check_output_location(model, True, protect=[protected_link])
    target = tmp_path / "real-out"
    target.mkdir()
    (tmp_path / "out-link").symlink_to(target)
    assert check_output_location(tmp_path / "out-link", False) == target


def test_dangling_and_looping_links_are_one_line_errors(tmp_path):
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputDirError, match="does not exist"):
        check_output_location(dangling, True)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(OutputDirError):
        check_output_location(loop, True)


def test_over_long_names_are_refused_before_any_work(tmp_path):
    with pytest.raises(OutputDirError, match="bytes"):
        check_output_location(tmp_path / ("x" * 300), False)
    with pytest.raises(OutputDirError, match="temporary name"):  # fits the file system, not with lorp-fx's suffix
        check_output_location(tmp_path / ("x" * 240), False)
    with pytest.raises(OutputDirError, match="bytes"):
        check_output_location(tmp_path / ("y" * 300) / "run", False)
    assert check_output_location(tmp_path / ("x" * 150), False).name == "x" * 150


def test_a_model_is_never_saved_over_the_directory_it_was_loaded_from(tmp_path):
    from lorp_fx.io.models import load_model

    source = save_pretrained_atomic(build("llama")[0], tiny_tokenizer(), tmp_path / "model")
    model, tokenizer = load_model(source)
    pruned = prune(model, ["model.layers.1"])
    for out in (source, tmp_path):
        with pytest.raises(OutputDirError, match="refused even with overwrite"):
            save_pretrained_atomic(pruned, tokenizer, out, overwrite=True)
    assert len(load_model(source)[0].model.layers) == 5
