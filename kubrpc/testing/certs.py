"""TLS material for tests: a self-signed CA and certificates it issues, made with the openssl CLI."""

from __future__ import annotations

import ipaddress
import shutil
import ssl
import subprocess
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

__all__ = ("issue_certificate", "self_signed_certificate", "server_ssl_context")


def self_signed_certificate(
    directory: str | PathLike[str],
    *,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    name: str = "tls",
    common_name: str = "fake-kube-apiserver",
) -> tuple[Path, Path]:
    """Make a self-signed certificate (its own CA) and key for `hosts` with the openssl CLI: (cert, key).

    The files are DIRECTORY/NAME.crt and DIRECTORY/NAME.key. The certificate can also sign others: see
    `issue_certificate()`.
    """
    openssl = _openssl()
    cert, key = Path(directory) / f"{name}.crt", Path(directory) / f"{name}.key"
    # fmt: off
    command = [
        openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-days", "2", "-subj", f"/CN={common_name}", "-keyout", str(key), "-out", str(cert),
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,digitalSignature,keyCertSign",
    ]
    # fmt: on
    if hosts:
        command += ["-addext", f"subjectAltName={_subject_alt_names(hosts)}"]
    subprocess.run(command, check=True, capture_output=True)
    return cert, key


def issue_certificate(
    directory: str | PathLike[str],
    ca: tuple[str | PathLike[str], str | PathLike[str]],
    *,
    name: str,
    hosts: Sequence[str] = (),
    common_name: str | None = None,
) -> tuple[Path, Path]:
    """Make a key and a certificate signed by `ca` (cert, key), for servers (`hosts`) and clients: (cert, key).

    The files are DIRECTORY/NAME.crt and DIRECTORY/NAME.key; the subject is CN=`common_name` (default `name`).
    """
    openssl = _openssl()
    folder = Path(directory)
    cert, key, request, extensions = (folder / f"{name}{ext}" for ext in (".crt", ".key", ".csr", ".ext"))
    lines = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature",
        "extendedKeyUsage=serverAuth,clientAuth",
    ]
    if hosts:
        lines.append(f"subjectAltName={_subject_alt_names(hosts)}")
    extensions.write_text("\n".join(lines) + "\n")
    # fmt: off
    subprocess.run([
        openssl, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", f"/CN={common_name or name}", "-keyout", str(key), "-out", str(request),
    ], check=True, capture_output=True)
    subprocess.run([
        openssl, "x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
        "-days", "2", "-extfile", str(extensions), "-out", str(cert),
    ], check=True, capture_output=True, cwd=folder)
    # fmt: on
    return cert, key


def _openssl() -> str:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("making test certificates needs the openssl command")
    return openssl


def _subject_alt_names(hosts: Sequence[str]) -> str:
    names = []
    for host in hosts:
        try:
            names.append(f"IP:{ipaddress.ip_address(host)}")
        except ValueError:
            names.append(f"DNS:{host}")
    return ",".join(names)


def server_ssl_context(cert: str | PathLike[str], key: str | PathLike[str]) -> ssl.SSLContext:
    """A server-side TLS context for `FakeKubeAPI(ssl_context=...)`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
