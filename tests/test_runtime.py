"""pspnet.runtime: the process settings of the command-line tools."""

import ctypes
import platform
import subprocess
import sys

import pytest

# mallinfo2 (glibc >= 2.33) reports the mmapped and the free heap bytes the test compares.
HAS_MALLINFO2 = (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
                 and hasattr(ctypes.CDLL(None), "mallinfo2"))

# Runs in a fresh process (the setting is process-wide): allocates and frees a 64 MiB tensor and prints the
# bytes glibc then holds in mmapped blocks, before and after keep_freed_memory().
_PROBE = """
import ctypes, sys, torch
from pspnet.runtime import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
x = torch.ones(16 * 2**20)            # 64 MiB
mapped = libc.mallinfo2().hblkhd
del x
print(mapped, libc.mallinfo2().fordblks)
"""


@pytest.mark.skipif(not HAS_MALLINFO2, reason="needs glibc >= 2.33 (keep_freed_memory acts on glibc's malloc)")
def test_keep_freed_memory_serves_large_blocks_from_the_heap_and_keeps_them():
    def probe(mode):
        out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
        return [int(v) for v in out.stdout.split()]
    mapped_default, _ = probe("default")
    mapped_kept, free_kept = probe("keep")
    assert mapped_default >= 64 * 2**20          # glibc's default: the block is mmapped (and unmapped when freed)
    assert mapped_kept < 64 * 2**20              # kept: from the heap, nothing mmapped for it ...
    assert free_kept >= 64 * 2**20               # ... and still held by the process after the free


def test_configure_process_sets_threads(threads):
    from pspnet.config import TrainConfig
    from pspnet.runtime import configure_process
    import torch
    configure_process(TrainConfig(threads=1, keep_freed_memory=False))
    assert torch.get_num_threads() == 1
