"""Devices, dtypes, process counts and device maps: resolved as documented, refused in one line before any work."""

import os
import re
from pathlib import Path

import pytest
import torch

import lorp_fx
import lorp_fx.cli.commands
import lorp_fx.io.placement as devices
from lorp_fx.cli import main
from lorp_fx.core.errors import DeviceError, LoRPError
from lorp_fx.io.placement import (
    check_process_count,
    parse_max_memory,
    resolve_device,
    resolve_dtype,
    resolve_placement,
)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)


@pytest.fixture
def one_gpu(monkeypatch):
    """A machine with one CUDA GPU, as torch would describe it (no GPU is needed to check the logic)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(devices, "_cuda_bf16", lambda device: True)


def one_line(error: Exception) -> str:
    text = str(error)
    assert "\n" not in text and text
    return text


def test_auto_is_the_cpu_in_float32_without_a_gpu(no_gpu):
    placement = resolve_placement("auto", "auto")
    assert placement.device == torch.device("cpu") and placement.dtype == torch.float32


def test_auto_is_the_gpu_in_bfloat16_where_there_is_one(one_gpu):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16


def test_auto_dtype_is_float16_on_a_gpu_without_bfloat16(one_gpu, monkeypatch):
    monkeypatch.setattr(devices, "_cuda_bf16", lambda device: False)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.float16


@pytest.mark.parametrize("name, words", [
    ("cuda", "not available"), ("cuda:1", "not available"), ("mps", "not available"),
    ("tpu", "unknown device"), ("cpu:1", "does not exist"),
])
def test_a_device_that_is_not_there_is_refused_in_one_line(no_gpu, name, words):
    with pytest.raises(DeviceError) as error:
        resolve_device(name)
    assert words in one_line(error.value)


def test_a_gpu_index_beyond_the_count_is_refused(one_gpu):
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match="cuda:3 does not exist: this machine has 1 CUDA GPU"):
        resolve_device("cuda:3")


def test_bfloat16_on_a_gpu_without_it_is_refused(one_gpu, monkeypatch):
    monkeypatch.setattr(devices, "_cuda_bf16", lambda device: False)
    monkeypatch.setattr(devices, "_cuda_name", lambda device: "a test GPU")
    with pytest.raises(DeviceError, match="bfloat16 does not run on cuda:0"):
        resolve_dtype("bfloat16", torch.device("cuda", 0))


def test_a_dtype_whose_operations_fail_on_the_device_is_refused(monkeypatch):
    monkeypatch.setattr(devices, "_runs", lambda device, dtype: dtype != torch.float16)
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(DeviceError, match="float16 does not run on cpu"):
        resolve_dtype("float16", torch.device("cpu"))


def test_the_dtype_probe_runs_the_operations_on_the_cpu():
    assert devices._runs(torch.device("cpu"), torch.float32)
    assert devices._runs(torch.device("cpu"), torch.bfloat16)


def test_process_counts_are_checked_against_the_machine(one_gpu, monkeypatch):
    check_process_count(1, torch.device("cuda", 0))
    with pytest.raises(DeviceError, match="more GPUs than this machine has"):
        check_process_count(2, torch.device("cuda", 0))
    monkeypatch.setattr(devices, "available_cores", lambda: 2)
    check_process_count(2, torch.device("cpu"))
    with pytest.raises(DeviceError, match="more CPU processes than this machine has cores"):
        check_process_count(3, torch.device("cpu"))
    with pytest.raises(DeviceError, match="whole number"):
        check_process_count(0, torch.device("cpu"))
    with pytest.raises(DeviceError, match="single device"):
        check_process_count(2, torch.device("mps"))


def test_max_memory_is_parsed_to_bytes_and_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert parse_max_memory("0=20GiB, cpu=30GiB") == {0: 20 * 2**30, "cpu": 30 * 2**30}
    assert parse_max_memory("cpu=100KB") == {"cpu": 100_000}
    # every spelling the check accepts reaches accelerate as a number it reads (a bare "10" or "1b" did not)
    assert parse_max_memory("cpu=10") == parse_max_memory("cpu=10b") == parse_max_memory("cpu=10 B") == {"cpu": 10}
    assert parse_max_memory("cpu=1.5GB") == {"cpu": 1_500_000_000}
    for bad, why in [("cpu", "DEVICE=SIZE"), ("cpu=lots", "DEVICE=SIZE"), ("tpu=1GiB", "not a GPU index"),
                     ("disk=1TB", "fits nowhere else"), ("cpu=2GB,cpu=1KB", "twice"), ("1=1GB", "has 1 CUDA GPU"),
                     ("0=1GB,0=2GB", "twice")]:
        with pytest.raises(DeviceError, match=why):
            parse_max_memory(bad)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(DeviceError, match="has 0 CUDA"):
        parse_max_memory("0=1GB,cpu=1GB")


def test_device_map_options_that_do_not_go_together_are_refused(no_gpu):
    with pytest.raises(DeviceError, match="does not combine with --devices"):
        resolve_placement("cpu", "float32", devices=2, device_map="auto")
    with pytest.raises(DeviceError, match="only apply with --device-map"):
        resolve_placement("cpu", "float32", max_memory="cpu=1GiB")
    with pytest.raises(DeviceError, match="only applies with --devices"):
        resolve_placement("cpu", "float32", strategy="fsdp")


# --------------------------------------------------------------------------- the command line


@pytest.fixture
def nothing_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although the arguments were bad")

    monkeypatch.setattr(lorp_fx.cli.commands, "load_placed", refuse)


@pytest.mark.parametrize("arguments, words", [
    (["--device", "cuda"], "not available"),
    (["--device", "cuda:7"], "not available"),
    (["--device", "quantum"], "unknown device"),
    (["--devices", "999"], "more CPU processes than this machine has cores"),
    (["--devices", "0"], "whole number"),
    (["--device-map", "auto", "--devices", "2"], "does not combine"),
    (["--max-memory", "cpu=1GiB"], "only apply with --device-map"),
    (["--devices", "2", "--strategy", "fsdp"], "fsdp runs on CUDA GPUs only"),
])
def test_bad_device_options_exit_2_with_one_line_before_loading(tmp_path, capsys, no_gpu, nothing_loads, arguments, words):
    status = main(["prune", "--model", "smollm2-135m", "--remove", "1", "--out", str(tmp_path / "out"), *arguments])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1 and words in err
    assert not (tmp_path / "out").exists()


def test_a_dtype_the_device_cannot_run_exits_2_before_loading(tmp_path, capsys, monkeypatch, nothing_loads):
    monkeypatch.setattr(devices, "_runs", lambda device, dtype: dtype == torch.float32)
    status = main(["prune", "--remove", "1", "--dtype", "float16", "--device", "cpu", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "float16 does not run on cpu" in err


def test_no_tensor_is_put_on_a_named_device_in_the_package():
    """Devices come from the model or the user: the package names none (io/placement.py parses the names)."""
    package = Path(lorp_fx.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        if path == Path(devices.__file__):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\.cuda\(|device=[\"'](cuda|mps)|\.to\([\"'](cuda|mps)|torch\.device\([\"'](cuda|mps)", line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_device_errors_are_lorp_errors():
    assert issubclass(DeviceError, LoRPError)


def test_a_temporary_offload_folder_is_gone_when_the_process_exits(tmp_path):
    import subprocess
    import sys

    script = "from lorp_fx.io.placement import offload_folder as t; import pathlib; p = pathlib.Path(t(None)); " \
             "(p / 'weights.dat').write_bytes(b'x' * 1000); print(p)"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    folder = Path(done.stdout.strip())
    assert folder.parent == tmp_path and not folder.exists()
