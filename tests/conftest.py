"""Suite-wide settings: hypothesis draws the same cases on every run unless asked to explore.

`HYPOTHESIS_PROFILE=explore python -m pytest ...` opts into random search (more examples, a
local example database); the default profile `ci` is derandomized (cases derive from each
test's source), keeps no database and draws 40 examples where a test does not say how many, so
two runs of the suite test the same inputs.

After each test module, JAX's compiled programs and trace caches are dropped: a worker that
kept every module's executables grew to 9.6 GB over the suite, and CI's 24 GiB machine
runs two workers beside torch's own models.

Compiled programs are kept instead in JAX's persistent compilation cache: one fresh directory
per pytest run (made by the process that starts the run, removed at its end) with one
subdirectory per xdist worker, which the worker and every subprocess a test starts (the CLI,
notebooks, scripts, the 8-device child) use. Per worker, because JAX writes an entry in place
without a lock unless a size limit is set, and with a limit every write rescans the whole
directory (quadratic over a suite's thousands of entries). The tiny models' samplers are
compiled again by many modules and subprocesses; reading them back made a group of training
and pipeline tests 21% faster (286 -> 227 s), the suite 15%
(2,310 -> 1,953 s on a 2-core machine). A cached executable is the one XLA compiled for
the same program, so results do not change.
XLA:CPU compiles with its cheap LLVM pipeline (:data:`FAST_COMPILE`; `JQUANT_TEST_FAST_COMPILE=off`
for the default pipeline).
`JQUANT_TEST_JAX_CACHE=DIR` keeps the cache in DIR across runs; `JQUANT_TEST_JAX_CACHE=off`
turns it off; an existing `JAX_COMPILATION_CACHE_DIR` is used as it is.

Under xdist (`-n 2`) a test file is one unit of work, and the heaviest files
(:data:`HEAVY_FIRST`) are collected and handed out first: a file's module fixtures (the demo run, the
tiny models) are built on one worker only, its programs land in one worker's cache, and no
two-minute file starts last while the other worker idles.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Iterator

_BASE = "_JQUANT_TEST_JAX_CACHE_BASE"  # "pid:dir", the pid of the process that made dir


def _compilation_cache_dir() -> str | None:
    """This process's directory of the run's persistent compilation cache, also exported in the
    environment so that child processes use it; None where the user chose otherwise."""
    choice = os.environ.get("JQUANT_TEST_JAX_CACHE", "")
    if choice == "off" or ("JAX_COMPILATION_CACHE_DIR" in os.environ and _BASE not in os.environ):
        return None
    if _BASE not in os.environ:
        os.environ[_BASE] = f"{os.getpid()}:{choice or tempfile.mkdtemp(prefix='jquant-jax-cache-')}"
    path = os.path.join(os.environ[_BASE].partition(":")[2], os.environ.get("PYTEST_XDIST_WORKER", "main"))
    os.makedirs(path, exist_ok=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return path


#: XLA:CPU's cheap LLVM pipeline: the suite's tiny programs are compile-bound, and this halves
#: their compile time (a quantize-family test and the outlier-model training: 123 -> 65 s of CPU).
#: Code generation only (no fast-math), so results stay within float rounding of the default.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _fast_compile() -> None:
    """Adds :data:`FAST_COMPILE` to ``XLA_FLAGS`` (inherited by the tests' subprocesses) unless
    ``JQUANT_TEST_FAST_COMPILE=off`` or the flags already set an optimization level."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("JQUANT_TEST_FAST_COMPILE", "") != "off" and "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE}".strip()


_fast_compile()  # before JAX creates its CPU client, which reads XLA_FLAGS once
_CACHE_DIR = _compilation_cache_dir()  # before jax is imported: its flags read these variables once

import jax  # noqa: E402

if _CACHE_DIR:  # the same again through jax.config, in case a plugin imported jax first
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    max_examples=40,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", derandomize=False, deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


#: Test files started first (longest first, from `--durations` on a 2-core machine): one
#: worker takes the fresh-venv install while the other takes the 8-device child, and the many
#: short files fill in behind them.
HEAVY_FIRST = (
    "test_new_user.py",
    "test_sharding.py",
    "test_pipeline_quality.py",
    "test_producers.py",
    "test_quantize_families.py",
    "test_pallas_kernels.py",
    "test_pipeline_results_script.py",
    "test_demo.py",
    "test_notebook.py",
    "test_training.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Moves the files of :data:`HEAVY_FIRST` to the front, in that order (a stable sort: every
    file keeps its own order, the other files theirs)."""
    del config
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


#: Files that run as one unit of work, on one worker: the demo's fixture and the quickstart
#: notebook (a kernel that uses the worker's cache directory) sample the bundled model with
#: tests/test_pipeline_quality.py's settings, so their programs come from that worker's cache.
SHARED_UNITS = dict.fromkeys(("test_pipeline_quality.py", "test_demo.py", "test_notebook.py"), "tiny-pipeline")


@pytest.hookimpl(optionalhook=True)  # xdist's hook: pytest runs without it too
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """One test file (or :data:`SHARED_UNITS` group) per unit of work, handed out in collection
    order (xdist would sort the units by their number of tests, which is not their duration)."""
    from xdist.scheduler import LoadScopeScheduling  # pylint: disable=import-outside-toplevel

    class _FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return SHARED_UNITS.get(os.path.basename(path), path)

    config.option.loadscopereorder = False
    return _FileScheduling(config, log)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs() -> Iterator[None]:
    """Frees a module's compiled programs once its tests are done (see the module docstring)."""
    yield
    jax.clear_caches()
    gc.collect()


def pytest_unconfigure(config: pytest.Config) -> None:
    """The process that made this run's compilation cache removes it (not its workers or children)."""
    pid, _, path = os.environ.get(_BASE, "").partition(":")
    if path and pid == str(os.getpid()) and not os.environ.get("JQUANT_TEST_JAX_CACHE"):
        shutil.rmtree(path, ignore_errors=True)
