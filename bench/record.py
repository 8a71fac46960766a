"""What ``kitebus record`` keeps up with: full ticks/s recorded with nothing missing, its CPU
per 10k ticks, and bytes on disk per million ticks.

    .venv/bin/python bench/record.py [--tokens 1000] [--rates 5000,10000,20000] [--seconds 5]

A private redis-server; ``{ns}:token_conn`` names ``--tokens`` instruments, so the recorder
(a process of its own, following the carried tokens as it does live) listens to them all;
a feeder PUBLISHes real full-mode payloads (the simulator's market through the publisher's
encoder, with seq) at each rate for ``--seconds``. Then SIGTERM, and the recording is read back.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import hiredis
import redis

from bench.consumer import NS
from bench.stack import cpu_seconds, measured_on
from config import Keys
from consumers.recorder import read_events, read_recording
from kitebus.localredis import LocalRedis
from kitewire import codec
from kitewire.encoder import frame_encoder
from rediswire import resp
from simulator.market import Market


def feed(port: int, ticks: int, tokens: int, rate: int) -> float:
    """PUBLISH ``ticks`` full payloads, 500 a batch, at ``rate`` ticks/s, and write each
    batch's newest to ``{ns}:last`` as the publisher does (a recorder cut off by Redis reads
    it when it reconnects, and that is how it learns the hole's size); every tick a new
    trade of the simulator's market (bench/consumer.py repeats its frames: too kind to zstd).
    Returns the rate reached."""
    market = Market(1)
    frames = []
    for start in range(0, ticks, 500):  # made before sending, so the feeder keeps the rate
        now = int(time.time())
        count = min(500, ticks - start)
        packets = [market.tick(((start + i) % tokens + 1) << 8 | 1, "full", now) for i in range(count)]
        frames.append(codec.encode_frame([codec.encode_packet(p) for p in packets]))
    keys = Keys(NS)
    encoder = frame_encoder(keys.ticks("").encode())
    sock = socket.create_connection(("127.0.0.1", port))
    reader = hiredis.Reader()
    sent, started = 0, time.perf_counter()
    for frame in frames:
        publishes, fields, count, _ = encoder.encode(frame, time.time_ns(), {})
        sock.sendall(publishes + resp.command_head(2 + 2 * count, b"HSET", keys.last) + fields)
        replies = 0
        while replies < count + 1:
            reader.feed(sock.recv(1 << 16))
            while reader.gets() is not False:
                replies += 1
        sent += count
        ahead = sent / rate - (time.perf_counter() - started)
        if ahead > 0:
            time.sleep(ahead)
    sock.close()
    return sent / (time.perf_counter() - started)


def run_once(port: int, tokens: int, rate: int, seconds: float) -> dict[str, float]:
    keys = Keys(NS)
    client = redis.Redis(port=port)
    client.delete(keys.token_conn)
    client.hset(keys.token_conn, mapping={str((n << 8) | 1): "0" for n in range(1, tokens + 1)})
    directory = Path(tempfile.mkdtemp(prefix="kitebus-bench-record-"))
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{port}/0", "KITEBUS_NAMESPACE": NS}
    recorder = subprocess.Popen(
        [sys.executable, "-m", "kitebus", "record", str(directory)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        last_channel = keys.ticks((tokens << 8) | 1)
        deadline = time.monotonic() + 30
        while client.pubsub_numsub(last_channel)[0][1] < 1:  # it follows {ns}:token_conn
            if time.monotonic() > deadline:
                raise RuntimeError("the recorder did not subscribe")
            time.sleep(0.05)
        sent = int(rate * seconds)
        idle_cpu = cpu_seconds(recorder.pid)  # start-up (imports, subscribing) is not counted
        reached = feed(port, sent, tokens, rate)
        time.sleep(3.0)  # two flush intervals and a margin: what it buffered is on disk
        recorder.send_signal(signal.SIGTERM)
        _, status, usage = os.wait4(recorder.pid, 0)
        recorder.returncode = os.waitstatus_to_exitcode(status)
        cpu = usage.ru_utime + usage.ru_stime - idle_cpu
        recorded = len(read_recording(directory))
        events = read_events(directory)
        gaps = sum(e["to_seq"] - e["from_seq"] + 1 for e in events if e["kind"] == "gap")
        cuts = sum(e["kind"] == "cut" for e in events)
        size = sum(p.stat().st_size for p in directory.rglob("*.parquet"))
        return {"reached": reached, "sent": sent, "recorded": recorded, "gap": gaps, "cuts": cuts, "cpu": cpu,
                "bytes": size, "code": recorder.returncode}  # fmt: skip
    finally:
        if recorder.poll() is None:
            recorder.kill()
        shutil.rmtree(directory, ignore_errors=True)
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--rates", default="5000,10000,20000", help="full ticks per second to send")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to send at each rate")
    args = parser.parse_args()
    server = LocalRedis()
    server.start()
    try:
        print(f"# {measured_on()}; {os.cpu_count()} cpus; full ticks over {args.tokens:,} tokens, "
              f"{args.seconds:g} s per rate; the recorder a process of its own")  # fmt: skip
        print(f"{'ticks/s asked':>13} {'reached':>8} {'sent':>9} {'recorded':>9} {'missing':>8} "
              f"{'in gaps':>8} {'cuts':>4} {'cpu ms/10k':>10} {'bytes/1M ticks':>15}")  # fmt: skip
        for rate in map(int, args.rates.split(",")):
            r = run_once(server.port, args.tokens, rate, args.seconds)
            per_10k = r["cpu"] / max(r["recorded"], 1) * 10_000 * 1000
            per_m = r["bytes"] / max(r["recorded"], 1) * 1_000_000
            missing = r["sent"] - r["recorded"]
            print(f"{rate:>13,} {r['reached']:>8,.0f} {r['sent']:>9,} {r['recorded']:>9,} {missing:>8,} "
                  f"{r['gap']:>8,} {r['cuts']:>4} {per_10k:>10.0f} {per_m:>15,.0f}", flush=True)  # fmt: skip
    finally:
        server.stop()


if __name__ == "__main__":
    main()
