"""The benchmark registry as `make bench` walks it: every module it discovers has what bench.run reads (a `run`
module the TITLE the table prints, otherwise a `measure`)."""

from __future__ import annotations

import bench


def test_every_discovered_benchmark_has_what_bench_run_reads() -> None:
    missing = []
    for key, module_name in bench.discover().items():
        module = bench.load(module_name)
        if hasattr(module, "run"):
            if not isinstance(getattr(module, "TITLE", None), str):
                missing.append(f"{key} ({module_name}): run() without TITLE")
        elif not hasattr(module, "measure"):
            missing.append(f"{key} ({module_name}): neither run() nor measure()")
    assert not missing, missing
