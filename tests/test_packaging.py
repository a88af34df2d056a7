"""The wheel holds exactly kubrpc and its plugin folders, and runs from a directory without the sources."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import kubrpc

ROOT = Path(__file__).resolve().parent.parent


def test_only_kubrpc_is_importable() -> None:
    # No __path__ tricks: the repository's other folders are not part of the kubrpc namespace, and no bare
    # `transports` or `balancers` package exists.
    for name in ("kubrpc.tests", "kubrpc.benchmarks", "kubrpc.examples", "transports", "balancers"):
        assert importlib.util.find_spec(name) is None, name
    assert importlib.util.find_spec("kubrpc.transports.tcp") is not None
    assert importlib.util.find_spec("kubrpc.balancers.p2c") is not None


def test_version_has_one_source() -> None:
    from importlib.metadata import version

    from kubrpc._version import __version__

    assert kubrpc.__version__ == __version__ == version("kubrpc")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    for part in ("pyproject.toml", "README.md", "LICENSE", "kubrpc", "transports", "balancers"):
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, build / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, build / part)
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), "."]
    subprocess.run(command, cwd=build, check=True, capture_output=True, timeout=120)
    [found] = out.glob("kubrpc-*.whl")
    return found


def test_wheel_contents(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"kubrpc", f"kubrpc-{kubrpc.__version__}.dist-info"}, tops
    for needed in ("kubrpc/py.typed", "kubrpc/transports/tcp.py", "kubrpc/balancers/p2c.py", "kubrpc/_version.py"):
        assert needed in names
    metadata = zipfile.ZipFile(wheel).read(f"kubrpc-{kubrpc.__version__}.dist-info/METADATA").decode()
    assert "Requires-Dist: aiohttp" in metadata
    assert not any(line.startswith("Requires-Dist: httpx") and "extra" not in line for line in metadata.splitlines())
    assert "License-File: LICENSE" in metadata


def test_wheel_runs_from_a_directory_without_sources(wheel: Path, tmp_path: Path) -> None:
    # What deploy/Dockerfile does: the wheel installed, the example service copied to a work directory.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"
    shutil.copytree(ROOT / "examples", work / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    probe = (
        "import kubrpc, kubrpc.transports.tcp, kubrpc.balancers.p2c, examples.arith.service as s;"
        f"assert kubrpc.__file__.startswith({str(site)!r}), kubrpc.__file__;"
        "print(sorted(s.server.services))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=work,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Arith" in result.stdout


def test_builtin_plugin_tables_agree_with_the_entry_points() -> None:
    # Each registry lists its built-ins for an uninstalled tree; pyproject.toml declares the same as entry points.
    import tomllib

    from kubrpc import balancers, resolvers, transports

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    for registry in (balancers.registry, resolvers.registry, transports.registry):
        assert declared[registry.group] == registry._builtins, registry.group


async def test_a_third_party_resolver_scheme() -> None:
    # A `dns://`-style scheme needs no core edit: register a factory and connect() uses it.
    from typing import Protocol

    from kubrpc import resolvers
    from kubrpc.resolvers import ManualResolver

    class Echo(Protocol):
        async def echo(self, text: str) -> str: ...

    class EchoImpl:
        async def echo(self, text: str) -> str:
            return text

    server = kubrpc.Server()
    server.register(Echo, EchoImpl())
    async with server.serve("tcp://127.0.0.1:0") as listener:
        port = int(listener.url.rsplit(":", 1)[1])
        seen: list[str] = []

        def factory(target: str) -> ManualResolver:
            seen.append(target)
            return ManualResolver([kubrpc.Endpoint("127.0.0.1", port)])

        resolvers.registry.register("testdns", factory)
        try:
            assert "testdns" in resolvers.names()
            async with kubrpc.connect("testdns://anything") as channel:
                assert await channel.stub(Echo, timeout=5).echo("hi") == "hi"
        finally:
            resolvers.registry.unregister("testdns")
        assert seen == ["testdns://anything"]
