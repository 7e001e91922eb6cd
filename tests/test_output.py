"""Atomic output directories: complete or absent, never half written."""

from __future__ import annotations

import json
import os

import pytest

from lorp_fx.errors import OutputDirError
from lorp_fx.output import save_pretrained_atomic
from lorp_fx.surgery import remove_layers
from tiny_models import REMOVALS, tiny_model, tiny_tokenizer


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
    assert json.loads((out / "report.json").read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_save_refuses_a_non_empty_directory_unless_overwrite(tmp_path):
    model, _, _ = build("llama")
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(OutputDirError, match="not empty"):
        save_pretrained_atomic(model, None, out)
    assert (out / "old.txt").read_text() == "keep me"

    save_pretrained_atomic(model, None, out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_save_into_an_existing_empty_directory(tmp_path):
    model, _, _ = build("gpt2")
    (tmp_path / "run").mkdir()
    save_pretrained_atomic(model, None, tmp_path / "run")
    assert (tmp_path / "run" / "config.json").exists()


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
    with pytest.raises(OutputDirError, match="cannot write"):
        save_pretrained_atomic(model, None, blocker / "run")


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


