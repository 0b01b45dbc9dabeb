"""The command's allocator tuning: a batch's large tensors reuse freed heap memory instead of
fresh pages that the kernel must fault in and zero on every forward pass."""

from __future__ import annotations

import subprocess
import sys

import pytest

FORWARDS = r"""
import resource, sys
import torch
from camcli.allocator import keep_heap_memory
tuned = keep_heap_memory() if sys.argv[1] == "tuned" else False
net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1)).eval()
x = torch.randn(4, 3, 256, 256)  # activations of 33.5 MB, over glibc's largest mmap threshold (32 MB)
with torch.inference_mode():
    net(x)  # the first forward always faults its pages in
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        net(x)
print(tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def _faults_per_forward(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", FORWARDS, mode], capture_output=True, text=True, check=True)
    tuned, faults = out.stdout.split()
    return tuned == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_freed_batches_are_reused_without_page_faults() -> None:
    tuned, faults_tuned = _faults_per_forward("tuned")
    assert tuned
    _, faults_plain = _faults_per_forward("plain")
    fresh = 2 * 33_554_432 // 4096  # the pages of the two activations, were they new each time
    assert faults_plain > fresh  # glibc's default: every activation is a fresh mapping, faulted in
    assert faults_tuned < faults_plain / 10  # tuned: the same heap memory again


def test_the_command_tunes_its_process_and_importing_camcli_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    import camcli.allocator
    from camcli.cli import main

    calls: list[int] = []
    monkeypatch.setattr(camcli.allocator, "keep_heap_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(sys, "argv", ["camcli", "--version"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0 and calls == [1]
    probe = "import camcli, camcli.pipeline, camcli.session, sys; print('camcli.allocator' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
