"""The image and compose file, as far as they can be tried without a Docker engine: the
compose file parses and names only files that exist, the Dockerfile copies only what is
there and bakes in no secret, and the image's entry command and healthcheck work when
run directly."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sys
from pathlib import Path

import yaml

from tests.integration.conftest import eventually

ROOT = Path(__file__).parent.parent.parent


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_compose_parses_and_names_only_what_exists() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "publisher", "publisher-standby", "simulator"} <= set(services)
    for name in ("publisher", "publisher-standby", "simulator"):
        build = services[name]["build"]
        context = ROOT / (build if isinstance(build, str) else build["context"])
        assert (context / "Dockerfile").is_file()
    for name in ("publisher", "publisher-standby"):
        service = services[name]
        assert service["restart"] == "unless-stopped" and service["command"] == ["publish"]
        assert all(not entry["required"] for entry in service["env_file"])  # .env is the operator's
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "--appendonly" in services["redis"]["command"]  # claims and requests survive a restart
    assert "redis-data" in compose["volumes"]


def test_the_dockerfile_copies_what_exists_and_bakes_in_no_secret() -> None:
    steps = _instructions()
    for instruction, arguments in steps:
        if instruction == "COPY" and not arguments.startswith("--from"):
            *sources, _ = arguments.split()
            assert all((ROOT / source).exists() for source in sources), arguments
        if instruction in ("ENV", "ARG"):
            assert "KITE_API_KEY" not in arguments and "ACCESS_TOKEN" not in arguments
    assert ("USER", "kitebus") in steps
    assert sum(1 for instruction, _ in steps if instruction == "FROM") == 2  # build stage, runtime
    assert (ROOT / ".dockerignore").read_text().count(".env") >= 1


async def test_the_entry_command_and_healthcheck_work_when_run_directly(simulator, redis_url) -> None:
    steps = dict(_instructions())
    command = json.loads(steps["ENTRYPOINT"]) + json.loads(steps["CMD"])
    health = json.loads(steps["HEALTHCHECK"].split("CMD", 1)[1])
    assert command == ["kitebus", "publish"] and health[0] == "kitebus"
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ, "KITE_WS_URL": simulator.url, "REDIS_URL": redis_url, "KITE_API_KEY": "kitebus",
        "KITE_ACCESS_TOKEN": "simulator", "KITEBUS_NAMESPACE": "kite",
    }  # fmt: skip

    async def healthy() -> bool:
        check = await asyncio.create_subprocess_exec(
            str(bin_dir / health[0]), *health[1:], env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        return await check.wait() == 0

    assert not await healthy()  # nothing runs yet
    publisher = await asyncio.create_subprocess_exec(
        str(bin_dir / command[0]), *command[1:], env=env, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        await eventually(healthy, timeout=20)
        assert len(simulator.sessions) == 3
    finally:
        publisher.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(publisher.wait(), 15) == 0, shlex.join(command)
    assert not await healthy()  # stopped: the healthcheck says so
