"""The kubrpc command, run as a user runs it."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import anyio
import pytest
from services import make_server

import kubrpc

pytestmark = pytest.mark.anyio


@kubrpc.interface(name="arith.Arith")
class Arith(Protocol):
    """The wire contract of examples/arith/service.py, as a client outside the repository declares it."""

    async def add(self, a: int, b: int) -> int: ...


#: The installed console script, as a user runs it (`python -m kubrpc` from the repository root would import the
#: source folder kubrpc/, which lacks the plugin folders that an install maps into it).
KUBRPC = [str(Path(sys.executable).parent / "kubrpc")]


async def test_demo_balances_by_weight(tmp_path: Path) -> None:
    result = await anyio.run_process([*KUBRPC, "demo", "--calls", "800"], check=False, cwd=tmp_path)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    rr = out[out.index("round_robin:") : out.index("weighted_random:")]
    assert [line.split()[2] for line in rr.splitlines()[2:5]] in (
        ["267", "267", "266"],
        ["267", "266", "267"],
        ["266", "267", "267"],
    )
    sw = out[out.index("smooth_weighted:") : out.index("p2c:")]
    assert [line.split()[2] for line in sw.splitlines()[2:5]] == ["100", "200", "500"]
    # 12.4: every built-in balancer, each drawn as bars whose length follows its share (30 blocks = 100 %)
    for name in ("round_robin", "weighted_random", "smooth_weighted", "p2c", "ring_hash", "zone_aware", "outlier"):
        assert f"\n{name}: 800 calls" in out
    rows = sw.splitlines()[2:5]
    assert [row.count("█") for row in rows] == [3, 7, 18]  # 12.5 %, 25 %, 62.5 % of 30, in whole blocks
    za = out[out.index("zone_aware:") : out.index("outlier:")].splitlines()[2:5]
    assert [row.split()[2] for row in za] == ["400", "400", "0"]  # zone-1 only


async def test_demo_runs_in_process(tmp_path: Path) -> None:
    result = await anyio.run_process([*KUBRPC, "demo", "--calls", "300", "--transport", "inproc"], cwd=tmp_path)
    out = result.stdout.decode()
    assert out.startswith("3 inproc servers")
    assert "smooth_weighted: 300 calls" in out and "█" in out


async def test_call_prints_json_and_fails_with_the_status(start_server: Callable[..., object]) -> None:
    for scheme in ("tcp", "http"):
        url, _, _ = await start_server(scheme)  # type: ignore[operator]
        ok = await anyio.run_process([*KUBRPC, "call", url, "Arith.add", '{"a": 2, "b": 40}'], check=False)
        assert (ok.returncode, ok.stdout.decode().strip()) == (0, "42")
        bad = await anyio.run_process([*KUBRPC, "call", url, "Arith.add", '{"a": "2"}'], check=False)
        assert bad.returncode == 1
        assert b'"code":"invalid_argument"' in bad.stderr


def test_resolve_prints_a_static_target() -> None:
    out = subprocess.run(
        [*KUBRPC, "resolve", "static://127.0.0.1:9000;weight=2,127.0.0.2:9000", "--count", "1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "2 endpoints, 2 ready" in out and "Endpoint('127.0.0.1', 9000, weight=2)" in out


async def test_serve_until_sigterm_then_exit_cleanly() -> None:
    args = [
        *KUBRPC,
        "serve",
        "examples.arith.service:server",
        "--bind",
        "tcp://127.0.0.1:0",
        "--bind",
        "http://127.0.0.1:0",
    ]
    root = str(Path(__file__).parent.parent)
    async with await anyio.open_process(args, cwd=root) as process:
        assert process.stdout is not None
        with anyio.fail_after(30):
            line = (await process.stdout.receive()).decode()
        assert line.startswith("serving on tcp://127.0.0.1:")
        tcp_url, http_url = line.split()[2:4]
        for url in (tcp_url, http_url):
            async with kubrpc.connect(url) as channel:
                assert await channel.stub(Arith, timeout=5).add(1, 2) == 3
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            assert await process.wait() == 0


async def test_sigterm_drains_running_calls_before_exiting() -> None:
    from services import Control

    args = [*KUBRPC, "serve", "services:server", "--bind", "tcp://127.0.0.1:0"]
    async with await anyio.open_process(args, cwd=str(Path(__file__).parent)) as process:
        assert process.stdout is not None
        with anyio.fail_after(30):
            url = (await process.stdout.receive()).decode().split()[2]
        async with kubrpc.connect(url) as channel:
            control = channel.stub(Control, timeout=20)
            results: list[str] = []

            async def slow() -> None:
                results.append(await control.sleep(1.0))

            async with anyio.create_task_group() as tg:
                tg.start_soon(slow)
                await anyio.sleep(0.3)  # the call is running on the server
                process.send_signal(signal.SIGTERM)
            assert results == ["slept"]  # answered during the drain
        with anyio.fail_after(30):
            assert await process.wait() == 0


async def test_shutdown_delay_keeps_serving_with_readyz_503() -> None:
    import httpx

    args = [*KUBRPC, "serve", "services:delayed_server", "--bind", "http://127.0.0.1:0"]
    async with await anyio.open_process(args, cwd=str(Path(__file__).parent)) as process:
        assert process.stdout is not None
        with anyio.fail_after(30):
            url = (await process.stdout.receive()).decode().split()[2]
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            assert (await client.get("/readyz")).status_code == 200
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(5):
                while (await client.get("/readyz")).status_code != 503:
                    await anyio.sleep(0.02)
            response = await client.post("/Arith/add", json={"a": 1, "b": 2})  # still serving calls
            assert (response.status_code, response.json()) == (200, 3)
        with anyio.fail_after(30):
            assert await process.wait() == 0


# --- 12.2: a CLI at grpcurl's level -------------------------------------------------------------------------------

SERVICE_MODULE = """
import dataclasses
from typing import Protocol

import kubrpc
from kubrpc.auth import BearerAuth


@dataclasses.dataclass
class Loan:
    book: str
    days: int


@kubrpc.interface(name="lib.Loans")
class Loans(Protocol):
    async def lend(self, book: str, days: int = 14) -> Loan: ...


class Arith(Protocol):
    async def add(self, a: int, b: int) -> int: ...


class Impl:
    async def add(self, a: int, b: int) -> int:
        return a + b

    async def lend(self, book: str, days: int = 14) -> Loan:
        return Loan(book, days)


server = kubrpc.Server(drain_timeout=1)
server.register(Arith, Impl())
server.register(Loans, Impl())
secured = kubrpc.Server(drain_timeout=1, interceptors=[BearerAuth({"s3cret": ["*"]})])
secured.register(Arith, Impl())
quiet = kubrpc.Server(drain_timeout=1, reflection=False)
quiet.register(Arith, Impl())
not_a_server = 42
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """A directory holding a user's service module, `app.py`, to run `kubrpc serve app:...` from."""
    (tmp_path / "app.py").write_text(SERVICE_MODULE)
    return tmp_path


async def kubrpc_run(
    *args: str, cwd: Path, env: dict[str, str] | None = None, stdin: bytes | None = None
) -> tuple[int, str, str]:
    """Run the kubrpc command; (exit status, stdout, stderr)."""
    import os

    with anyio.fail_after(60):
        result = await anyio.run_process(
            [*KUBRPC, *args], check=False, cwd=cwd, input=stdin, env={**os.environ, **(env or {})}
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


class Served:
    """`kubrpc serve` in a subprocess, on free loopback ports; SIGTERM and wait on exit."""

    def __init__(self, cwd: Path, spec: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.argv = [*KUBRPC, "serve", spec, *args]
        self.cwd, self.env = cwd, env
        self.urls: list[str] = []
        self.stderr = ""

    async def __aenter__(self) -> Served:
        import os

        self.process = await anyio.open_process(self.argv, cwd=self.cwd, env={**os.environ, **(self.env or {})})
        assert self.process.stdout is not None
        with anyio.fail_after(30):
            line = (await self.process.stdout.receive()).decode()
        assert line.startswith("serving on "), line
        self.urls = line.split()[2:]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            await self.process.wait()
        assert self.process.stderr is not None
        chunks: list[bytes] = []
        with anyio.move_on_after(5):
            chunks += [chunk async for chunk in self.process.stderr]
        self.stderr = b"".join(chunks).decode()
        await self.process.aclose()


async def test_version_and_verbose_anywhere_on_the_line(tmp_path: Path) -> None:
    status, out, _ = await kubrpc_run("--version", cwd=tmp_path)
    assert (status, out.strip()) == (0, f"kubrpc {kubrpc.__version__}")
    for argv in (
        ["-v", "resolve", "static://127.0.0.1:9", "--count", "1"],
        ["resolve", "-v", "static://127.0.0.1:9", "--count", "1"],
    ):
        status, out, err = await kubrpc_run(*argv, cwd=tmp_path)
        assert status == 0, err
        assert "1 endpoints, 1 ready" in out


async def test_call_forms_headers_and_data_sources(app_dir: Path) -> None:
    (app_dir / "args.json").write_text('{"a": 40, "b": 2}')
    async with Served(app_dir, "app:secured", "--bind", "tcp://127.0.0.1:0", "--bind", "http://127.0.0.1:0") as served:
        for url in served.urls:
            bearer = ("-H", "Authorization: Bearer s3cret")
            assert await kubrpc_run("call", url, "Arith/add", '{"a": 1, "b": 2}', *bearer, cwd=app_dir) == (
                0,
                "3\n",
                "",
            )
            assert (await kubrpc_run("call", *bearer, url, "Arith.add", "-d", "@args.json", cwd=app_dir))[:2] == (
                0,
                "42\n",
            )
            piped = await kubrpc_run(
                "call", url, "/Arith/add", "-d", "-", *bearer, cwd=app_dir, stdin=b'{"a": 5, "b": 5}'
            )
            assert piped[:2] == (0, "10\n")
            # without the header the service behind BearerAuth says so
            status, _, err = await kubrpc_run("call", url, "Arith/add", '{"a": 1, "b": 2}', cwd=app_dir)
            assert status == 1 and '"code":"unauthenticated"' in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["Arith", '{"a": 1}'], "bad METHOD 'Arith'"),
        (["Arith/add", "[1]"], "arguments must be a JSON object"),
        (["Arith/add", "{"], "arguments are not valid JSON"),
        (["Arith/add", "{}", "-d", "{}"], "either as JSON or with -d"),
        (["Arith/add", "-d", "@missing.json"], "cannot read 'missing.json'"),
        (["Arith/add", "-H", "no colon"], "bad -H 'no colon'"),
        (["Arith/add", "--cacert", "missing.pem"], "cannot load TLS files"),
        (["Arith/add", "--key", "k.pem"], "--key needs --cert"),
        (["Arith/add", "--balancer", "nope"], "nope"),
    ],
)
async def test_call_usage_errors_are_one_line(tmp_path: Path, argv: list[str], message: str) -> None:
    status, out, err = await kubrpc_run("call", "tcp://127.0.0.1:9", *argv, cwd=tmp_path)
    assert status == 2 and out == ""
    assert err.startswith("kubrpc: ") and message in err and err.count("\n") == 1, err


async def test_call_tls_flags(tmp_path: Path) -> None:
    import ssl

    from kubrpc.testing.certs import issue_certificate, self_signed_certificate

    ca = self_signed_certificate(tmp_path, name="ca", hosts=())
    server_cert = issue_certificate(tmp_path, ca, name="server", hosts=("127.0.0.1",))
    client_cert = issue_certificate(tmp_path, ca, name="client")
    stranger = self_signed_certificate(tmp_path, name="stranger")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca[0]))
    context.load_cert_chain(*server_cert)
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS
    server, _ = make_server("tls")
    async with (
        server.serve("tcp://127.0.0.1:0", ssl=context) as tcp,
        server.serve("https://127.0.0.1:0", ssl=context) as https,
    ):
        mtls = ["--cacert", str(ca[0]), "--cert", str(client_cert[0]), "--key", str(client_cert[1])]
        for url in (tcp.url, https.url):
            ok = await kubrpc_run("call", url, "Arith/add", '{"a": 1, "b": 2}', *mtls, cwd=tmp_path)
            assert ok[:2] == (0, "3\n"), ok
            insecure = await kubrpc_run(
                "call",
                url,
                "Arith/add",
                '{"a": 1, "b": 2}',
                "--insecure",
                "--cert",
                str(client_cert[0]),
                "--key",
                str(client_cert[1]),
                cwd=tmp_path,
            )
            assert insecure[:2] == (0, "3\n"), insecure
            other = ["--cacert", str(stranger[0]), "--cert", str(client_cert[0]), "--key", str(client_cert[1])]
            wrong_ca = await kubrpc_run(
                "call", url, "Arith/add", "{}", *other, cwd=tmp_path, env={"KUBRPC_TIMEOUT": "5"}
            )
            assert wrong_ca[0] == 1 and "CERTIFICATE_VERIFY_FAILED" in wrong_ca[2], wrong_ca
        # https:// verifies against the system's CAs without any flag
        unverified = await kubrpc_run("call", https.url, "Arith/add", "{}", cwd=tmp_path, env={"KUBRPC_TIMEOUT": "5"})
        assert unverified[0] == 1 and "CERTIFICATE_VERIFY_FAILED" in unverified[2], unverified


async def test_list_and_describe_over_both_transports(app_dir: Path) -> None:
    async with Served(app_dir, "app:server", "--bind", "tcp://127.0.0.1:0", "--bind", "http://127.0.0.1:0") as served:
        outputs = []
        for url in served.urls:
            assert await kubrpc_run("list", url, cwd=app_dir) == (0, "Arith\nlib.Loans\n", "")
            assert await kubrpc_run("list", url, "lib.Loans", cwd=app_dir) == (0, "lib.Loans/lend\n", "")
            status, out, err = await kubrpc_run("describe", url, cwd=app_dir)
            assert status == 0, err
            assert "  Arith/add(a: int, b: int) -> int\n" in out
            assert "lib.Loans/lend(book: str, days: int" in out and ") -> Loan\n" in out
            assert "  Loan(book: str, days: int)\n" in out[out.index("schemas:") :]  # the dataclass, and its schema
            assert '"properties":{"book":{"type":"string"}' in out[out.index("schemas:") :]
            status, out, err = await kubrpc_run("describe", url, "lib.Loans/lend", cwd=app_dir)
            assert status == 0 and "    request: {" in out and '"required":["book"]' in out
            assert '    result: {"$ref":"#/components/schemas/Loan"}' in out
            outputs.append(out)
            status, _, err = await kubrpc_run("describe", url, "lib.Loan", cwd=app_dir)
            assert status == 1 and "did you mean 'lib.Loans'?" in err and err.count("\n") == 1
            status, _, err = await kubrpc_run("describe", url, "lib.Loans/lent", cwd=app_dir)
            assert status == 1 and "did you mean 'lend'?" in err
        assert outputs[0] == outputs[1]  # the same from the reflection service and from /openapi.json
        for url in served.urls:  # any target connect() takes: static://, with --transport and --balancer
            scheme, address = url.split("://")
            static = ("static://" + address, "--transport", scheme, "--balancer", "weighted_random")
            assert await kubrpc_run("list", *static, cwd=app_dir) == (0, "Arith\nlib.Loans\n", "")
            assert await kubrpc_run("call", *static, "Arith/add", '{"a": 2, "b": 2}', cwd=app_dir) == (0, "4\n", "")


async def test_list_needs_reflection_over_tcp_and_headers_reach_it(app_dir: Path) -> None:
    async with Served(app_dir, "app:quiet", "--bind", "tcp://127.0.0.1:0") as quiet:
        status, _, err = await kubrpc_run("list", quiet.urls[0], cwd=app_dir)
        assert status == 1 and "does not serve kubrpc.Reflection (Server(reflection=False))" in err
    async with Served(app_dir, "app:secured", "--bind", "tcp://127.0.0.1:0") as secured:
        status, _, err = await kubrpc_run("list", secured.urls[0], cwd=app_dir)
        assert status == 1 and "UNAUTHENTICATED" in err
        bearer = ("-H", "authorization: Bearer s3cret")
        assert await kubrpc_run("list", secured.urls[0], *bearer, cwd=app_dir) == (0, "Arith\n", "")


@pytest.mark.parametrize(
    ("spec", "bind", "message"),
    [
        ("nosuch:server", "tcp://127.0.0.1:0", "cannot import 'nosuch': no module named 'nosuch'"),
        ("app:nope", "tcp://127.0.0.1:0", "module 'app' has no attribute 'nope'"),
        ("app:not_a_server", "tcp://127.0.0.1:0", "app:not_a_server is not a kubrpc.Server (its type is int)"),
        ("app:server", "ftp://127.0.0.1:9000", "bad --bind 'ftp://127.0.0.1:9000'"),
        ("app:server", "tcp://127.0.0.1", "bad --bind 'tcp://127.0.0.1'"),
        ("app:server", "tcp://127.0.0.1:port", "bad --bind 'tcp://127.0.0.1:port'"),
        ("app:server", "https://127.0.0.1:0", "https needs a TLS context"),
        ("app:server", "tcp://host.invalid:0", "cannot listen on tcp://host.invalid:0"),
    ],
)
async def test_serve_errors_are_one_line(app_dir: Path, spec: str, bind: str, message: str) -> None:
    status, out, err = await kubrpc_run("serve", spec, "--bind", bind, cwd=app_dir)
    assert (status, out) == (1, "")
    assert err.startswith("kubrpc: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("scheme", ["tcp", "http"])
async def test_serve_reports_a_port_in_use(app_dir: Path, scheme: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        url = f"{scheme}://127.0.0.1:{taken.getsockname()[1]}"
        status, _, err = await kubrpc_run("serve", "app:server", "--bind", url, cwd=app_dir)
    assert status == 1 and err.startswith(f"kubrpc: cannot listen on {url}: ") and err.count("\n") == 1, err
    assert "in use" in err.lower()


async def test_serve_binds_loopback_by_default_and_says_so(app_dir: Path) -> None:
    status, out, _ = await kubrpc_run("serve", "--help", cwd=app_dir)
    assert status == 0 and "tcp://127.0.0.1:9000" in " ".join(out.split())
    for name in ("KUBRPC_BIND", "--access-log", "--log-level"):
        assert name in out


async def test_serve_from_the_environment_with_an_access_log(app_dir: Path) -> None:
    env = {"KUBRPC_BIND": "tcp://127.0.0.1:0,http://127.0.0.1:0", "KUBRPC_ACCESS_LOG": "1"}
    async with Served(app_dir, "app:server", env=env) as served:
        assert [u.partition(":")[0] for u in served.urls] == ["tcp", "http"]
        for url in served.urls:
            assert url.startswith(("tcp://127.0.0.1:", "http://127.0.0.1:"))
            async with kubrpc.connect(url) as channel:
                assert await channel.call("Arith/add", b'{"a": 1, "b": 2}', timeout=5) == b"3"
            await kubrpc_run("call", url, "Arith/add", '{"a": "x", "b": 1}', cwd=app_dir)
    lines = [line for line in served.stderr.splitlines() if "kubrpc.access" in line]
    assert len(lines) == 4, served.stderr
    assert sum(line.split()[3:5] == ["Arith/add", "OK"] for line in lines) == 2
    assert sum(" Arith/add INVALID_ARGUMENT " in line for line in lines) == 2
    assert all(line.endswith(" ms") and line.split()[2].startswith("127.0.0.1:") for line in lines)


async def test_flags_win_over_the_environment(app_dir: Path) -> None:
    env = {"KUBRPC_BIND": "tcp://127.0.0.1:1", "KUBRPC_LOG_LEVEL": "nonsense"}
    status, _, err = await kubrpc_run("serve", "app:server", cwd=app_dir, env=env)
    assert status == 2 and "bad KUBRPC_LOG_LEVEL 'nonsense'" in err
    env["KUBRPC_LOG_LEVEL"] = "info"
    async with Served(
        app_dir, "app:server", "--bind", "tcp://127.0.0.1:0", "--log-level", "warning", env=env
    ) as served:
        assert served.urls[0].startswith("tcp://127.0.0.1:") and served.urls[0] != "tcp://127.0.0.1:1"
    assert "INFO" not in served.stderr  # --log-level warning beat KUBRPC_LOG_LEVEL=info
