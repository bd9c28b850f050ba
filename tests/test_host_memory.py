"""Freed large tensors go back to the system once loading has set glibc's threshold (see host_memory.py)."""

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
import torch
from multimodal_lora.core.host_memory import keep_large_blocks_off_the_heap

def anonymous():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

fixed = sys.argv[1] == "fixed" and keep_large_blocks_off_the_heap()
# Loading's pattern: large temporaries freed again, with long-lived smaller tensors allocated between them.
# The first one freed is what raises glibc's own threshold to its size.
first = torch.ones(2**21)
del first
large, kept = [], []
for _ in range(60):
    large.append(torch.ones(2**21))      # 8 MB, freed below
    kept.append(torch.ones(2**16))       # 256 KB, kept
before = anonymous()
del large
print(json.dumps({"fixed": fixed, "returned": before - anonymous()}))
"""


def run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_freed_large_tensors_return_to_the_system():
    fixed, default = run("fixed"), run("default")
    assert fixed["fixed"] is True
    # 60 × 8 MB freed: with the threshold fixed nearly all of it leaves the process ...
    assert fixed["returned"] > 400 * 2**20, fixed
    # ... while glibc's own (dynamic) threshold keeps most of it in the heap.
    assert default["returned"] < fixed["returned"] - 200 * 2**20, (default, fixed)


PEAK = r"""
import json
import torch
from multimodal_lora.core.host_memory import keep_large_blocks_off_the_heap
from multimodal_lora.training.logs import peak_memory_mb, reset_peak_memory

keep_large_blocks_off_the_heap()
loading = torch.ones(100 * 2**20)  # 400 MB, as loading a base briefly holds
del loading
before = peak_memory_mb(torch.device("cpu"))
reset_peak_memory(torch.device("cpu"))  # what the trainer does as its loop begins
print(json.dumps({"before": before, "after": peak_memory_mb(torch.device("cpu"))}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs")
def test_the_loops_peak_memory_leaves_out_what_loading_held():
    out = subprocess.run([sys.executable, "-c", PEAK], capture_output=True, text=True, check=True)
    peak = json.loads(out.stdout.strip().splitlines()[-1])
    assert peak["before"] > 400  # MB: the load's peak is in the process's high-water mark ...
    assert peak["after"] < peak["before"] - 300  # ... and gone from the loop's
