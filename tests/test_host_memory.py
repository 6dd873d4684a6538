"""Host memory on the CPU (server/host_memory.py): a step's freed activations are reused by the next step
instead of faulting fresh pages in, and they go back to the system when the engine idles."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loraplex.server import host_memory

# A fresh interpreter: malloc's thresholds are per process and cannot be set back.
STEADY_FAULTS = r"""
import json, resource, sys, threading, torch
from loraplex.server import host_memory

def burst():  # a CPU prefill step as the heap sees it: MiB-sized activations alive together, then freed
    live = [torch.empty(768 * 1024).fill_(1.0) for _ in range(8)]  # 8 x 3 MiB

def steady_faults():
    # minor page faults of 4 bursts on a new thread (as the engine's), after 6 that warm its heap
    out = []
    def run():
        for _ in range(6):
            burst()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(4):
            burst()
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return out[0]

retained = sys.argv[1] == "retain" and host_memory.retain_freed_memory()
print(json.dumps({"retained": retained, "faults": steady_faults()}))
"""


def steady_faults(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in host_memory.USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", STEADY_FAULTS, mode], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None or not os.path.exists("/proc/self/statm"), reason="glibc on Linux")
def test_retained_memory_serves_the_next_steps_without_page_faults():
    one_tensor = 768  # pages of one 3 MiB activation; the 4 bursts allocate 32 of them
    retained = steady_faults("retain")
    # 0 on the CI machine; one activation's pages on an H100 host's glibc (Firecracker VM): either way the bursts
    # reuse the heap instead of faulting their activations in again
    assert retained["retained"] and retained["faults"] <= one_tensor, retained
    default = steady_faults("default")
    if default["faults"] < one_tensor:
        pytest.skip(f"this C library's defaults do not fault either ({default}): nothing was at stake")


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def test_the_users_own_malloc_settings_are_left_alone(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(host_memory, "_glibc", lambda: libc)
    monkeypatch.setattr(host_memory, "_retaining", False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert not host_memory.retain_freed_memory()
    host_memory.release_free_memory()
    assert libc.calls == []

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    assert host_memory.retain_freed_memory()
    host_memory.release_free_memory()
    assert libc.calls == [("mallopt", host_memory.M_MMAP_THRESHOLD, host_memory.MMAP_THRESHOLD),
                          ("mallopt", host_memory.M_TRIM_THRESHOLD, host_memory.TRIM_THRESHOLD), ("malloc_trim", 0)]
