"""Calibration across kinds of text (issue 24): the shipped corpus, the guard of `--compensate auto` on every
calibration source (the model's own text included), and calibration text very unlike the model's own."""

from __future__ import annotations

import torch
from saved_models import report, saved_tiny
from tiny_models import VOCAB, tiny_model, tiny_tokenizer

import lorp_fx
import lorp_fx.io.corpus as corpus
from lorp_fx.cli import main
from lorp_fx.compensation.guard import keep_harmless_maps
from lorp_fx.compensation.solver import choose_ridge
from lorp_fx.core.errors import CalibrationError
from lorp_fx.pipeline.calibrate import interleave
from lorp_fx.pipeline.config import PruneConfig
from lorp_fx.pipeline.mismatch import calibration_mismatch

WINDOWS = torch.randint(4, VOCAB, (12, 16), generator=torch.Generator().manual_seed(3))


# --------------------------------------------------------------------------- the shipped corpus


def test_the_shipped_corpus_is_there_and_unchanged():
    text = corpus.corpus_text()
    assert 250_000 < len(text.encode()) < 400_000 and "State of the Union" not in text[:10]  # prose, not a header


def test_a_missing_or_damaged_corpus_is_one_error(tmp_path):
    missing, damaged = tmp_path / "gone.txt", tmp_path / "damaged.txt"
    damaged.write_bytes(corpus.CORPUS_PATH.read_bytes()[:-10])
    for path, words in ((missing, "cannot be read"), (damaged, "is damaged")):
        try:
            corpus.corpus_text(path)
        except CalibrationError as error:
            assert words in str(error) and "reinstall lorp-fx" in str(error) and "\n" not in str(error)
        else:
            raise AssertionError(f"{path.name} was read")


def test_the_command_line_stops_before_loading_on_a_damaged_corpus(tmp_path, monkeypatch, capsys):
    damaged = tmp_path / "damaged.txt"
    damaged.write_text("not the corpus")
    monkeypatch.setattr(corpus, "CORPUS_PATH", damaged)
    model = saved_tiny(tmp_path)
    capsys.readouterr()
    assert main(["prune", "--model", str(model), "--remove", "1", "--seq-len", "16", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is damaged" in err[0] and not (tmp_path / "out").exists()


def test_the_default_calibration_is_corpus_and_own_text_interleaved(tmp_path):
    tokenizer = tiny_tokenizer()
    result = lorp_fx.prune_model(tiny_model("llama", layers=6), None, PruneConfig(remove=2, calib_samples=8, seq_len=16,
                                 own_windows=2, loss_windows=4), tokenizer=tokenizer, progress=False)
    calibration = result.report["calibration"]
    assert calibration["sources"] == {"corpus": 6, "own": 2} and calibration["held_only"] == []
    assert "corpus" in calibration["source"] and "wrote itself" in calibration["source"]
    assert set(result.report["compensation"]["sources"]) == {"corpus", "own"}  # each has loss windows


def test_interleaving_puts_every_source_among_the_first_windows():
    _, order = interleave({"corpus": torch.zeros(24, 2, dtype=torch.long), "own": torch.ones(8, 2, dtype=torch.long)})
    assert order[:8].count("own") == 2 and order.count("own") == 8 and len(order) == 32


# --------------------------------------------------------------------------- the guard


def test_a_ridge_must_help_every_source():
    ratios = {"file": {0.01: 0.5, 1.0: 0.7}, "own": {0.01: 1.2, 1.0: 0.95}}
    assert choose_ridge(ratios, reject=True) == 1.0  # 0.01 is best on average but hurts own text
    assert choose_ridge({"file": {0.01: 0.5, 1.0: 0.7}, "own": {0.01: 1.2, 1.0: 1.01}}, reject=True) is None
    assert choose_ridge({"file": {0.01: 0.5, 1.0: 0.7}}, reject=True) == 0.01  # one source: plain cross-validation
    # A check-only source constrains the choice but does not steer it: the file's best safe ridge wins.
    assert choose_ridge({"file": {0.01: 0.5, 1.0: 0.7}, "own": {0.01: 0.99, 1.0: 0.2}}, reject=True, check_only={"own"}) == 0.01
    assert choose_ridge({"file": {0.01: 0.5, 1.0: 0.7}, "own": {0.01: 0.99, 1.0: 0.2}}, reject=True) == 1.0


def test_the_guard_drops_the_map_that_hurts_and_keeps_the_other():
    plain = {"file": 3.0, "own": 2.0}
    effect = {"a": {"file": -0.2, "own": -0.1}, "b": {"file": -0.3, "own": +0.5}}

    def measure(gaps):
        return {s: plain[s] + sum(effect[g][s] for g in gaps) for s in plain}

    kept, losses, dropped = keep_harmless_maps(["a", "b"], measure, plain)
    assert kept == ["a"] and dropped == [{"gap": "b", "sources_hurt": ["own"]}]
    assert all(losses[s] <= plain[s] for s in plain)


def test_own_text_beside_given_windows_is_checked_never_fitted_on():
    result = lorp_fx.prune_model(tiny_model("llama", layers=6), WINDOWS, PruneConfig(remove=2, loss_windows=4, own_windows=4),
                                 tokenizer=tiny_tokenizer(), progress=False)
    calibration, compensation = result.report["calibration"], result.report["compensation"]
    assert calibration["sources"] == {"given": 12, "own": 4} and calibration["held_only"] == ["own"]
    assert calibration["windows"] == 12  # statistics and selection read the given windows only
    sources = compensation["sources"]
    assert sources["own"]["windows"] == 4 and sources["given"]["windows"] == 4
    for values in sources.values():  # what is folded hurts no source's held-out loss
        assert values["folded"] <= values["uncompensated"] + 1e-9
    for gap in compensation["gaps"]:
        assert set(gap["held_out_error_ratio"]) == {"given", "own"}
        assert all(ratio < 1 for ratio in gap["held_out_error_ratio"].values())


def test_without_a_tokenizer_the_run_is_as_before():
    result = lorp_fx.prune_model(tiny_model("llama", layers=6), WINDOWS, PruneConfig(remove=2, loss_windows=4),
                                 progress=False)
    assert result.report["calibration"]["sources"] == {"given": 12}
    assert list(result.report["compensation"]["sources"]) == ["given"]


def test_an_encoder_decoder_reports_per_source_too():
    result = lorp_fx.prune_model(tiny_model("t5"), WINDOWS, PruneConfig(remove=2, loss_windows=4), progress=False)
    assert list(result.report["compensation"]["sources"]) == ["given"]


# --------------------------------------------------------------------------- bad input


def _prune_on(tmp_path, text: str, name: str) -> dict:
    model = saved_tiny(tmp_path)
    path = tmp_path / f"{name}.txt"
    path.write_text(text, encoding="utf-8")
    out = tmp_path / name
    assert main(["prune", "--model", str(model), "--remove", "2", "--calib-samples", "12", "--seq-len", "16",
                 "--own-windows", "4", "--loss-windows", "4", "--calib-file", str(path), "--out", str(out)]) == 0
    return report(out)


def _guarded(found: dict) -> None:
    for values in found["compensation"].get("sources", {}).values():
        assert values["folded"] <= values["uncompensated"] + 1e-9


def test_one_repeated_line_is_named_and_guarded(tmp_path):
    found = _prune_on(tmp_path, "w5 w6 w7 w8\n" * 200, "repeated")
    assert any("repeats itself" in w for w in found["calibration"]["mismatch"]["warnings"])
    _guarded(found)


def test_binary_noise_decoded_as_text_is_named_and_guarded(tmp_path):
    # Random bytes read as Latin-1 and saved as UTF-8: enough whitespace among them to make the windows.
    noise = bytes(torch.randint(0, 256, (40000,), generator=torch.Generator().manual_seed(0)).tolist()).decode("latin-1")
    found = _prune_on(tmp_path, noise, "noise")
    assert any("binary data" in w for w in found["calibration"]["mismatch"]["warnings"])
    _guarded(found)


def test_a_text_the_model_finds_unpredictable_is_named():
    windows = torch.randint(0, 10, (4, 16), generator=torch.Generator().manual_seed(1))
    sources = ["file", "file", "own", "own"]
    found = calibration_mismatch(windows, sources, None, {"file": 9.0, "own": 2.5})
    assert any("far less predictable" in w for w in found["warnings"])
    assert calibration_mismatch(windows, sources, None, {"file": 3.4, "own": 2.5})["warnings"] == []


def test_the_default_and_the_guard_text_open_the_models_own_windows_with_the_openings_it_can_spell(monkeypatch):
    """Issue 24: beside the corpus (no calibration given) and beside a user's text (the guard's check windows)
    the model's own windows open with other kinds of text; alone (the paper's self-calibration) they do not."""
    from lorp_fx.calibration import sampling
    from lorp_fx.pipeline.calibrate import calibration_text

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    monkeypatch.setattr(sampling, "OPENINGS", {"first kind": "w5 w6", "second kind": "w7", "unspellable": "{x}"})
    ids = [tokenizer("w5 w6", add_special_tokens=False)["input_ids"], tokenizer("w7", add_special_tokens=False)["input_ids"]]
    config = PruneConfig(remove=1, calib_samples=8, seq_len=16, own_windows=4)
    text = calibration_text(model, None, config, tokenizer, progress=False)
    own = text.windows[[i for i, s in enumerate(text.sources) if s == "own"]]
    assert [w[1 : 1 + len(ids[i % 2])].tolist() for i, w in enumerate(own)] == [ids[i % 2] for i in range(4)]
    assert "opening with first kind or second kind" in text.source
    one = calibration_text(model, None, PruneConfig(remove=1, calib_samples=8, seq_len=16, own_windows=1), tokenizer,
                           progress=False)
    assert "opening with first kind) (1 windows)" in one.source
    given = torch.randint(10, 50, (6, 16))
    checked = calibration_text(model, given, config, tokenizer, progress=False)
    assert checked.held_only == {"own"} and [w[1 : 1 + len(ids[i % 2])].tolist()
                                             for i, w in enumerate(checked.windows[6:])] == [ids[i % 2] for i in range(4)]
    alone = calibration_text(model, None, PruneConfig(remove=1, calib_samples=4, seq_len=16, own_windows=4), tokenizer,
                             progress=False)
    assert torch.equal(alone.windows, sampling.self_calibration(model, tokenizer, 4, 16, progress=False))
    assert "opening" not in alone.source
