"""The 30-second soak: every fault at once with requests flowing, every invariant checked
(bench/soak.py; its 5-minute run is the benchmark)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

SOAK = Path(__file__).parent.parent.parent / "bench" / "soak.py"


async def soak(*args: str) -> dict[str, Any]:
    """Run bench/soak.py for 30 s with three clients; its report, once every check held."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SOAK), "--duration", "30", "--clients", "3", "--json", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    assert out, err.decode()[-3000:]
    report: dict[str, Any] = json.loads(out)
    assert report["failures"] == [] and proc.returncode == 0, json.dumps(report, indent=1)[:4000]
    assert report["requests"]["requests"] > 100 and report["ticks"]["received_by_consumer"] > 50_000
    assert report["peak_tokens_per_connection"] <= 3000
    return report


async def test_thirty_seconds_of_chaos_keep_every_invariant(redis_server) -> None:
    # redis_server: the session's Redis is not used, but its fixture proves redis-server is installed
    report = await soak("--seed", "7")
    assert sum(report["faults"].values()) >= 3


async def test_thirty_seconds_of_chaos_on_a_redis_cluster(redis_server) -> None:
    """The same on a 3-master cluster, with the cluster's own fault: slots resharded (tick
    channels, the control stream, the hashes) under load. A master lost is tested on its
    own (test_cluster.py) and in the 5-minute run of bench/soak.py --cluster."""
    faults = "reshard,drop,reshard"
    report = await soak("--cluster", "--seed", "11", "--faults", faults)
    assert report["faults"].get("reshard", 0) >= 1 and sum(report["faults"].values()) >= 3


async def test_forty_seconds_of_redis_frozen_full_and_read_only(redis_server) -> None:
    """Redis's own faults in the rotation: SIGSTOP past the lease, OOM and READONLY, each
    once (the three are shuffled and drawn before any repeats), with requests and ticks
    flowing and a standby beside the leader."""
    faults = "redis_pause,redis_oom,redis_readonly"
    report = await soak("--duration", "40", "--seed", "14", "--faults", faults)
    assert set(report["faults"]) == {"redis_pause", "redis_oom", "redis_readonly"}
    assert report["ticks"]["seq_gaps_outside_faults"] == 0


async def test_thirty_seconds_of_chaos_through_sentinel(redis_server) -> None:
    """On a primary, a replica and a sentinel, everything through redis+sentinel://: a
    manual SENTINEL FAILOVER and a primary killed, in turn, under load (50 s: room for both)."""
    faults = "sentinel_failover,primary_killed"
    report = await soak("--sentinel", "--seed", "5", "--faults", faults, "--duration", "50")
    seen = report["faults"]
    assert seen.get("sentinel_failover", 0) >= 1 and seen.get("primary_killed", 0) >= 1
