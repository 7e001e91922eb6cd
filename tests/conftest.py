import gc
import os
import sys

import pytest
from hypothesis import HealthCheck, settings

# CI: reproducible examples and no per-example deadline (2 shared cores are slow and noisy).
settings.register_profile("ci", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# pytest-xdist runs one worker per core (tox: -n auto): each worker computes with one thread, so two workers
# do not fight over the cores (torch's default is a thread per core in every process). Subprocesses the tests
# start inherit OMP_NUM_THREADS. A plain `pytest` run keeps torch's default.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def pytest_report_header(config):
    """The CPU kernels torch runs (tests/numeric_kernels.py runs the numeric tests under each)."""
    import torch

    return f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}"


@pytest.fixture(scope="session", autouse=True)
def memoised_export():
    """One torch.export per distinct module and inputs in each test process (tests/export_cache.py: the suite exports
    the same tiny models over a hundred times, 2 to 3 s each). Off with LORP_FX_TEST_EXPORT_CACHE=0."""
    import torch.export

    import export_cache

    original = torch.export.export
    torch.export.export = export_cache.memoised(original)
    yield export_cache.counts
    torch.export.export = original
    if os.environ.get("LORP_FX_TEST_EXPORT_CACHE_LOG"):  # how often the memo answered, one line a process
        with open(os.environ["LORP_FX_TEST_EXPORT_CACHE_LOG"], "a", encoding="utf-8") as log:
            log.write(f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')} {export_cache.counts}\n")


@pytest.fixture(scope="session", autouse=True)
def requested_cpu_capability():
    """Under ATEN_CPU_CAPABILITY (tests/numeric_kernels.py), fail loudly if torch ignored it: an unknown or unsupported
    value falls back to the best kernels silently, and the check would test nothing new."""
    import torch

    wanted = os.environ.get("ATEN_CPU_CAPABILITY")
    if wanted:
        actual = torch.backends.cpu.get_cpu_capability()
        assert actual.lower() == wanted.lower(), f"ATEN_CPU_CAPABILITY={wanted} asked, torch runs {actual}"
    return wanted


# xdist groups (tox runs `--dist loadgroup`): each group runs on one worker, in order, while the other workers
# take the rest. Tests that start processes of their own (DDP launches, `--devices 2` runs) use both cores
# already; the SmolLM2 tests share one load of the model (`smollm2`, about 30 s of parsing the GGUF file).
GROUPS = {"distributed": "processes"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = next((GROUPS[m.name] for m in item.iter_markers() if m.name in GROUPS), None)
        if "smollm2" in getattr(item, "fixturenames", ()):
            group = "smollm2"
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct and its tokenizer (the embedded GGUF), loaded once; tests must not change them."""
    from lorp_fx.io.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(autouse=True)
def no_heatmap_unless_read(request, monkeypatch):
    """Saving a result renders the similarity heatmap with matplotlib (about 0.2 s a run, the import more); a test
    that does not read similarity.png gets an output without it. Tests marked `heatmap` get the real one."""
    if request.node.get_closest_marker("heatmap"):
        return
    from lorp_fx.pipeline import analyze, result

    monkeypatch.setattr(result, "heatmap_file", lambda plan: {})
    monkeypatch.setattr(analyze, "heatmap_file", lambda plan: {})


_FROZEN_AT = {"modules": 0}


@pytest.fixture(autouse=True)
def cheap_garbage_collection():
    """lorp-fx collects garbage between steps (`core.model.release_memory`: dozens of gc.collect() a pruning run),
    and a test process holds half a million objects from its imports (torch, transformers, Lightning, torch.export)
    that every collection walks: 0.4 s each, most of a tiny model's run. Whenever new modules were imported,
    collect once and move what survives into the permanent generation (gc.freeze), which collections skip:
    they then walk only the objects tests made. The library runs unchanged."""
    if len(sys.modules) != _FROZEN_AT["modules"]:
        gc.collect()
        gc.freeze()
        _FROZEN_AT["modules"] = len(sys.modules)
