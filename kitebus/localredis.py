"""A private redis-server on a free loopback port (for the demo and the tests)."""

from __future__ import annotations

import ctypes
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def _die_with_parent() -> None:
    """In the child: have Linux stop this redis-server if its parent dies without cleanup."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class RedisServerError(RuntimeError):
    """redis-server is missing or did not come up."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalRedis:
    """Starts ``redis-server`` without persistence in its own directory; ``stop`` removes it."""

    def __init__(
        self, workdir: Path | None = None, port: int | None = None, extra: tuple[str, ...] = ()
    ) -> None:
        """``extra``: more redis-server arguments (cluster mode, for one)."""
        self._own_dir = workdir is None
        self.extra = extra
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kitebus-redis-"))
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "yes", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent,
            start_new_session=True,  # Ctrl-C goes to the demo, which stops Redis last, in order
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RedisServerError(f"redis-server did not start on port {self.port}") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def flush(self) -> None:
        client = redis.Redis(port=self.port)
        try:
            client.flushall()
        finally:
            client.close()


def free_cluster_port(attempts: int = 200) -> int:
    """A loopback port that is free, and whose cluster bus port (+10000) is valid and free."""
    for _ in range(attempts):
        port = random.randint(20000, 45000)
        if all(_is_free(p) for p in (port, port + 10000)):
            return port
    raise RedisServerError("found no free port pair for a cluster node")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class LocalCluster:
    """A Redis Cluster of ``masters`` nodes (no replicas) on loopback, each a ``LocalRedis``
    with cluster mode on, joined with ``redis-cli --cluster create``."""

    def __init__(self, masters: int = 3) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="kitebus-cluster-"))
        self.nodes: list[LocalRedis] = []
        self._masters = masters

    @property
    def url(self) -> str:
        """Any node will do as the entry point: the first one."""
        return self.nodes[0].url

    def start(self, timeout: float = 20.0) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RedisServerError("redis-cli is not installed (Debian: apt-get install redis-tools)")
        try:
            for index in range(self._masters):
                node = LocalRedis(self.workdir / f"node{index}", port=self._unused_port(),
                                  extra=("--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
                                         "--cluster-config-file", "nodes.conf"))  # fmt: skip
                node.workdir.mkdir()
                self.nodes.append(node)
                node.start(timeout)
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                timeout=timeout,
            )  # fmt: skip
            self.wait_ok(timeout)
        except (subprocess.SubprocessError, RedisServerError) as exc:
            self.stop()
            raise RedisServerError(f"the local cluster did not come up: {exc}") from exc

    def _unused_port(self) -> int:
        taken = {node.port for node in self.nodes}
        while (port := free_cluster_port()) in taken:
            pass
        return port

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Until every node says ``cluster_state:ok`` and knows every other."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            client = redis.Redis(port=node.port, socket_connect_timeout=0.5)
            try:
                while True:
                    info = client.execute_command("CLUSTER", "INFO").decode()
                    if "cluster_state:ok" in info and f"cluster_known_nodes:{len(self.nodes)}" in info:
                        break
                    if time.monotonic() > deadline:
                        raise RedisServerError(f"node {node.port} is not ok: {info.splitlines()[0]}")
                    time.sleep(0.05)
            finally:
                client.close()

    def owner(self, slot: int) -> int:
        """The index of the node that serves ``slot``."""
        client = redis.Redis(port=self.nodes[0].port)
        try:
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS", NEVER_DECODE=True):
                if start <= slot <= end:
                    return next(i for i, node in enumerate(self.nodes) if node.port == int(master[1]))
        finally:
            client.close()
        raise RedisServerError(f"no node serves slot {slot}")

    def move_slot(self, slot: int, to: int) -> None:
        """Reshard one slot to node ``to``, keys and all, as ``redis-cli --cluster reshard`` does:
        IMPORTING/MIGRATING, MIGRATE the keys, then SETSLOT NODE on every node."""
        source = self.owner(slot)
        clients = [redis.Redis(port=node.port) for node in self.nodes]
        try:
            ids = [c.execute_command("CLUSTER", "MYID").decode() for c in clients]
            src, dst = clients[source], clients[to]
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[to])
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", "127.0.0.1", self.nodes[to].port, "", 0, 5000, "KEYS", *keys)
            for client in clients:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[to])
        finally:
            for client in clients:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class LocalSentinel:
    """A ``redis-server --sentinel`` on a free loopback port watching the primary at
    ``primary_port`` as ``service`` (quorum 1, quick to judge it down), for the demo and
    the tests. Several may watch the same primary; each needs its own ``workdir``."""

    def __init__(
        self,
        primary_port: int,
        service: str = "mymaster",
        workdir: Path | None = None,
        *,
        quorum: int = 1,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kitebus-sentinel-"))
        self.primary_port = primary_port
        self.service = service
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, *others: LocalSentinel, db: int = 0) -> str:
        """``redis+sentinel://`` naming this sentinel (and ``others``) and the service."""
        hosts = ",".join(s.address for s in (self, *others))
        return f"redis+sentinel://{hosts}/{self.service}/{db}"

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("redis-server") or shutil.which("redis-sentinel")
        if binary is None:
            raise RedisServerError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "sentinel.conf"  # sentinel rewrites its config: it must be writable
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.workdir}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary_port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {self.service} 1\n"
        )
        self.process = subprocess.Popen(
            [binary, str(config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent, start_new_session=True,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service):
                        return
                except redis.ConnectionError:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RedisServerError(f"redis sentinel did not start on port {self.port}")
                time.sleep(0.02)
        finally:
            client.close()

    def primary(self) -> tuple[str, int] | None:
        """The primary's address as this sentinel names it now (None: it names none)."""
        client = redis.Redis(port=self.port, socket_timeout=2, decode_responses=True)
        try:
            reply = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        finally:
            client.close()
        return (reply[0], int(reply[1])) if reply else None

    def failover(self) -> None:
        """``SENTINEL FAILOVER``: promote a replica without asking other sentinels."""
        client = redis.Redis(port=self.port, socket_timeout=5)
        try:
            client.execute_command("SENTINEL", "FAILOVER", self.service)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class LocalSentinelSet:
    """A primary, a replica of it and ``sentinels`` sentinels watching them, on loopback:
    ``url`` is the ``redis+sentinel://`` URL of the lot."""

    def __init__(self, sentinels: int = 1, service: str = "mymaster") -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="kitebus-sentinel-set-"))
        self.service = service
        self.servers = [LocalRedis(self.workdir / "a"), LocalRedis(self.workdir / "b")]
        quorum = sentinels // 2 + 1
        self.sentinels = [
            LocalSentinel(self.servers[0].port, service, self.workdir / f"sentinel{i}", quorum=quorum)
            for i in range(sentinels)
        ]

    @property
    def url(self) -> str:
        return self.sentinels[0].url(*self.sentinels[1:])

    def start(self, timeout: float = 20.0) -> None:
        try:
            for server in self.servers:
                server.workdir.mkdir(parents=True, exist_ok=True)
                server.start(timeout)
            replica = redis.Redis(port=self.servers[1].port)
            try:
                replica.replicaof("127.0.0.1", self.servers[0].port)
                deadline = time.monotonic() + timeout
                while replica.info("replication").get("master_link_status") != "up":
                    if time.monotonic() > deadline:
                        raise RedisServerError("the replica did not sync with the primary")
                    time.sleep(0.02)
            finally:
                replica.close()
            for sentinel in self.sentinels:
                sentinel.start(timeout)
            self.wait_replica_known(timeout)
        except RedisServerError:
            self.stop()
            raise

    def wait_replica_known(self, timeout: float = 20.0) -> None:
        """Until every sentinel knows a replica it could promote (found by INFO, ~10 s at most)."""
        deadline = time.monotonic() + timeout
        for sentinel in self.sentinels:
            client = redis.Redis(port=sentinel.port, socket_timeout=2, decode_responses=True)
            try:
                while not [r for r in client.sentinel_slaves(self.service) if "s_down" not in r["flags"]
                           and r.get("master-link-status") == "ok"]:  # fmt: skip
                    if time.monotonic() > deadline:
                        raise RedisServerError("the sentinels found no replica to promote")
                    time.sleep(0.05)
            finally:
                client.close()

    def primary_port(self) -> int:
        address = self.sentinels[0].primary()
        assert address is not None
        return address[1]

    def server(self, port: int) -> LocalRedis:
        return next(s for s in self.servers if s.port == port)

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
