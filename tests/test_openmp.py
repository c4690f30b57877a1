"""Request threads run torch on one OpenMP thread; the model threads (and the rest of the process) keep torch's."""

from __future__ import annotations

import threading

import sklearn  # noqa: F401  # maps an OpenMP runtime of its own beside torch's, as sentence-transformers does
import torch

from loom_kernel.config import Settings
from loom_kernel.models import ModelManager
from loom_kernel.openmp import one_torch_thread
from loom_kernel.plugins import create_plugin_manager


def test_one_torch_thread_sets_only_the_calling_thread():
    before = torch.get_num_threads()
    seen: list[int] = []

    def request_thread() -> None:
        one_torch_thread()
        seen.append(torch.get_num_threads())
        torch.ones(512, 512).sum(0)  # a parallel-sized op runs (on one thread) after it
        seen.append(torch.get_num_threads())

    t = threading.Thread(target=request_thread)
    t.start()
    t.join()
    assert seen == [1, 1]
    assert torch.get_num_threads() == before
    other: list[int] = []
    t = threading.Thread(target=lambda: other.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert other == [before]  # a thread that did not ask keeps torch's count


def test_the_managers_request_threads_run_torch_on_one_thread():
    manager = ModelManager(create_plugin_manager(), Settings(default_device="cpu"))
    try:
        assert manager.admission.threads.submit(torch.get_num_threads).result() == 1
    finally:
        manager.admission.threads.shutdown()
