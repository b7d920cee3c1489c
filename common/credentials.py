"""TLS certificates and SuperNode keys for a deployment, made with `cryptography`.

For tests and first deployments: a local certificate authority signs the coordinator's
server certificate, and each regional node gets an ECDSA P-384 key in OpenSSH format (the
format Flower's node authentication reads). Production deployments bring their own CA; these
files are what fedsov expects either way:

  <dir>/ca.crt, ca.key              the CA (keep ca.key off the coordinator in production)
  <dir>/server.crt, server.key      the coordinator's (SuperLink's) certificate and key
  <dir>/nodes/<name>, <name>.pub    one SuperNode key pair per regional node
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError

VALID_DAYS = 365


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: Path | str) -> TlsFiles:
        d = Path(directory)
        return cls(d / "ca.crt", d / "server.crt", d / "server.key")

    def check(self, *, server: bool) -> None:
        """Fail with the fix when a file the caller needs is missing."""
        needed = [self.ca_cert, self.server_cert, self.server_key] if server else [self.ca_cert]
        missing = [str(p) for p in needed if not p.is_file()]
        if missing:
            raise ConfigError(
                f"TLS file(s) not found: {', '.join(missing)}. Create them with "
                f"`python scripts/make_certs.py --out {self.ca_cert.parent}` (or point --certs at your own "
                "ca.crt/server.crt/server.key), or pass --insecure to run without TLS (tests only)."
            )


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsov"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certificates(
    out: Path | str, hosts: Iterable[str] = ("localhost", "127.0.0.1"), *, force: bool = False
) -> TlsFiles:
    """A new CA and a server certificate valid for `hosts` (names or IP addresses); never replaces one unasked."""
    hosts = list(dict.fromkeys(hosts))
    if not hosts:
        raise ConfigError("make_certificates needs at least one host name or IP address for the server certificate.")
    files = TlsFiles.in_dir(out)
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"{out} is a file, not a folder: choose a folder for the certificates.")
    existing = [p for p in (Path(out) / "ca.key", files.ca_cert, files.server_key, files.server_cert) if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"{', '.join(map(str, existing))} already exist(s): a new CA would make every node's "
            "ca.crt and the coordinator's certificate useless. Keep them, choose another --out, or "
            "pass --force to replace them deliberately."
        )
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedsov local CA"))
        .issuer_name(_name("fedsov local CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    _write_private(Path(out) / "ca.key", ca_key.private_bytes(pem, pkcs8, none))
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    _write_private(files.server_key, server_key.private_bytes(pem, pkcs8, none))
    files.server_cert.write_bytes(server_cert.public_bytes(pem))
    return files


def make_node_key(path: Path | str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format: `path` (private, 0600) and `path.pub`."""
    private = Path(path)
    if private.exists():
        raise ConfigError(
            f"{private} already exists: a node key is never overwritten (its public half may be "
            "registered with a coordinator). Choose another path or delete it deliberately."
        )
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public = private.with_name(private.name + ".pub")
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )
    return private, public
