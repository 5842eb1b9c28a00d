"""torchchat.cli.quiet and the ExecuTorch start-up capture: the libraries' noise reaches logging or a
switch the CLI turns off, and nothing else of theirs is lost."""
from __future__ import annotations

import logging
import os
import sys
import types
import warnings

import pytest

from torchchat.cli.quiet import NOISY_LOGGERS, hide_library_noise


@pytest.fixture
def restore_logging():
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_hide_library_noise_quiets_exactly_the_listed_sources(restore_logging, monkeypatch):
    # Inductor takes seconds to import: a stand-in module holds the switch.
    select_algorithm = types.ModuleType("torch._inductor.select_algorithm")
    select_algorithm.PRINT_AUTOTUNE = True
    config = types.ModuleType("torch._inductor.config")
    config.max_autotune_report_choices_stats = True
    inductor = types.ModuleType("torch._inductor")
    inductor.select_algorithm, inductor.config = select_algorithm, config
    monkeypatch.setitem(sys.modules, "torch._inductor.config", config)
    monkeypatch.setitem(sys.modules, "torch._inductor", inductor)
    monkeypatch.setitem(sys.modules, "torch._inductor.select_algorithm", select_algorithm)
    monkeypatch.delenv("TORCH_LOGS", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        hide_library_noise(max_autotune=True)
        warnings.warn("deprecated", FutureWarning)
        warnings.warn("kept", UserWarning)
        warnings.warn_explicit("TypedStorage is deprecated", UserWarning, "select_algorithm.py", 4799,
                               module="torch._inductor.select_algorithm")
    assert [str(w.message) for w in seen] == ["kept"]
    assert select_algorithm.PRINT_AUTOTUNE is False and config.max_autotune_report_choices_stats is False
    for name in NOISY_LOGGERS:
        assert not logging.getLogger(name).isEnabledFor(logging.WARNING), name
        assert logging.getLogger(name).isEnabledFor(logging.ERROR), name
    assert not logging.getLogger("torch._inductor.select_algorithm").isEnabledFor(logging.WARNING)


def test_executorch_threadpool_lines_go_to_logging_not_to_fd2(capfd, caplog):
    """What ExecuTorch's C++ writes to file descriptor 2 while its threadpool starts becomes log records."""
    from torchchat.runtime.executorch import _start_threadpool

    class FakeBindings:
        @staticmethod
        def _threadpool_get_thread_count() -> int:
            os.write(2, b"[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version\n"
                        b"[cpuinfo_utils.cpp:125] CPU info and manual query on # of cpus dont match.\n")
            return 2

    with caplog.at_level(logging.WARNING, logger="torchchat.runtime.executorch"):
        _start_threadpool(FakeBindings)
    assert capfd.readouterr().err == ""
    assert [r.getMessage() for r in caplog.records] == [
        "[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version",
        "[cpuinfo_utils.cpp:125] CPU info and manual query on # of cpus dont match.",
    ]
    os.write(2, b"after\n")  # file descriptor 2 is the terminal's again
    assert capfd.readouterr().err == "after\n"
