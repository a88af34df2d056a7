"""TLS and mutual TLS on both transports, with certificates made by the openssl CLI in the test."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from services import Arith

import kubrpc
from kubrpc import RpcError, Status
from kubrpc.testing.kube import issue_certificate, self_signed_certificate
from kubrpc.transports.http import HttpTransport
from kubrpc.transports.tcp import TcpTransport

Pair = tuple[Path, Path]


@dataclass(frozen=True)
class Pki:
    """A test CA with a server and a client certificate, and a second CA that signed nothing of ours."""

    ca: Pair
    server: Pair
    client: Pair
    stranger: Pair  # a client certificate from another CA

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*self.server)
        if require_client_cert:
            context.load_verify_locations(self.ca[0])
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self, *, cert: Pair | None = None, ca: Path | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=ca or self.ca[0])
        if cert is not None:
            context.load_cert_chain(*cert)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = self_signed_certificate(folder, name="ca", common_name="kubrpc test CA", hosts=())
    other = self_signed_certificate(folder, name="other-ca", common_name="another CA", hosts=())
    return Pki(
        ca=ca,
        server=issue_certificate(folder, ca, name="server", hosts=("127.0.0.1", "localhost")),
        client=issue_certificate(folder, ca, name="client", common_name="client-a"),
        stranger=issue_certificate(folder, other, name="stranger"),
    )


Start = Callable[..., Any]


async def _add(url: str, **connect: Any) -> int:
    with anyio.fail_after(10):  # a failure must come as an error, never as a hang
        async with kubrpc.connect(url, timeout=5.0, **connect) as channel:
            result: int = await channel.stub(Arith).add(2, 3)
            return result


async def _fails(url: str, **connect: Any) -> RpcError:
    with pytest.raises(RpcError) as caught:
        await _add(url, **connect)
    return caught.value


async def test_calls_over_tls(scheme: str, start_server: Start, pki: Pki) -> None:
    url, _, _ = await start_server(scheme, listen={"ssl": pki.server_context()})
    assert await _add(url, ssl=pki.client_context()) == 5


async def test_https_listener_url(start_server: Start, pki: Pki) -> None:
    url, _, _ = await start_server("https", listen={"ssl": pki.server_context()})
    assert url.startswith("https://127.0.0.1:")
    assert await _add(url, ssl=pki.client_context()) == 5
    # An https:// target without ssl= verifies against the system's CAs, which do not know the test CA.
    assert (await _fails(url)).code is Status.UNAVAILABLE


async def test_https_listener_needs_a_context() -> None:
    server = kubrpc.Server()
    with pytest.raises(ValueError, match="ssl"):
        async with server.serve("https://127.0.0.1:0"):
            pass


async def test_plaintext_client_against_tls_server_is_unavailable(scheme: str, start_server: Start, pki: Pki) -> None:
    url, _, _ = await start_server(scheme, listen={"ssl": pki.server_context()})
    assert (await _fails(url.replace("https://", "http://"))).code is Status.UNAVAILABLE


async def test_tls_client_against_plaintext_server_is_unavailable(scheme: str, start_server: Start, pki: Pki) -> None:
    url, _, _ = await start_server(scheme)
    assert (await _fails(url, ssl=pki.client_context())).code is Status.UNAVAILABLE


async def test_untrusted_server_certificate_is_unavailable(scheme: str, start_server: Start, pki: Pki) -> None:
    url, _, _ = await start_server(scheme, listen={"ssl": pki.server_context()})
    error = await _fails(url, ssl=pki.client_context(ca=pki.stranger[0]))
    assert error.code is Status.UNAVAILABLE
    assert "certificate" in error.message.lower()


async def test_mutual_tls(scheme: str, start_server: Start, pki: Pki) -> None:
    url, _, _ = await start_server(scheme, listen={"ssl": pki.server_context(require_client_cert=True)})
    assert await _add(url, ssl=pki.client_context(cert=pki.client)) == 5
    assert (await _fails(url, ssl=pki.client_context())).code is Status.UNAVAILABLE  # no client certificate
    assert (await _fails(url, ssl=pki.client_context(cert=pki.stranger))).code is Status.UNAVAILABLE
    assert await _add(url, ssl=pki.client_context(cert=pki.client)) == 5  # the server still serves


async def test_server_hostname(scheme: str, start_server: Start, pki: Pki) -> None:
    """The certificate is checked against server_hostname when given (a Service's DNS name under Kubernetes)."""
    url, _, _ = await start_server(scheme, listen={"ssl": pki.server_context()})
    kind = TcpTransport if scheme == "tcp" else HttpTransport
    good = kind(ssl=pki.client_context(), server_hostname="localhost")
    assert await _add(url, transport=good) == 5
    wrong = kind(ssl=pki.client_context(), server_hostname="arith.default.svc")
    error = await _fails(url, transport=wrong)
    assert error.code is Status.UNAVAILABLE
    assert "hostname" in error.message.lower()


async def test_ssl_goes_to_the_transport_object(pki: Pki) -> None:
    with pytest.raises(ValueError, match="ssl"):
        kubrpc.connect("tcp://127.0.0.1:1", transport=TcpTransport(), ssl=pki.client_context())
