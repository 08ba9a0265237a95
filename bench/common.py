"""Shared pieces of the benchmarks: machine description, the machine's own matmul limit
measured in the same process, timing, and writing bench/results/<name>.json."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import lightning

    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # Other processes' load when the figures were written (1, 5, 15 min): on a shared
        # machine, absolute times shift with it; ratios measured in one run hold better.
        "load_average": [round(v, 2) for v in os.getloadavg()],
        # libgomp spin-waits at every parallel region by default; on a machine shared with other
        # busy processes PASSIVE keeps a descheduled thread from stalling the other one.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    return info


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1, sync: bool = False) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_flops(dtype: torch.dtype = torch.float32, size: int = 2048, device: str = "cpu", repeats: int = 5) -> float:
    """The machine's own dense matmul throughput (FLOP/s) for ``dtype``, measured now.

    Measured in the same process as the workload, so that a ratio of the two holds on a
    machine whose speed varies (turbo, neighbours, thermal limits).
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, repeats=repeats, warmup=2, sync=device != "cpu")
    return 2 * size**3 / seconds


def write_result(name: str, payload: dict[str, Any], echo: bool = True) -> Path:
    """bench/results/<name>.json with the machine description and a timestamp (printed too with ``echo``)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    body = {"benchmark": name, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), **payload}
    path.write_text(json.dumps(body, indent=2) + "\n")
    if echo:
        print(json.dumps(body, indent=2))
    return path
