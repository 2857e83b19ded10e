"""HTTPS for the server, as a real kube-apiserver serves only HTTPS: a cluster CA made at start and a serving
certificate it signs for the server's addresses. kubectl sends a kubeconfig's credentials only over TLS, so without
this no bearer token (and so no RBAC) could be tried with it. Keys are ECDSA P-256, made fresh for every server.

The private key is on disk (0600, in a 0700 directory) only while the server's TLS context loads it, so a SIGKILLed
server leaves no key behind. The CA certificate stays in the directory for clients: in the directory the owner gives
(the lab puts it under its lab dir, which teardown removes) or in a temporary directory named after the process,
removed when the certificates go away, at exit, and by the next server on this host once that process is dead."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import ssl
import tempfile
import weakref
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


TEMPORARY_PREFIX = "wgcni-apiserver-tls-"
_TEMPORARY_NAME = re.compile(re.escape(TEMPORARY_PREFIX) + r"(\d+)-")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: it exists, as another user's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale_temporary_directories(parent: Path | None = None) -> list[Path]:
    """Remove the temporary certificate directories (in `parent`, the system's temporary directory by default) whose
    process no longer exists, as after a SIGKILL; returns the directories removed."""
    removed = []
    for entry in Path(parent or tempfile.gettempdir()).glob(TEMPORARY_PREFIX + "*"):
        match = _TEMPORARY_NAME.match(entry.name)
        if match and entry.is_dir() and not _process_exists(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class ServingCertificates:
    """The CA and the serving certificate for `hosts` (IP addresses or DNS names); `context()` is the server's TLS
    context. The CA certificate is `ca_file`, in `directory` (made 0700 if missing; the caller removes it)
    or else in a temporary directory removed when this object goes away or the process exits."""

    def __init__(self, hosts: list[str], directory: Path | None = None):
        now = datetime.datetime.now(datetime.UTC)
        valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=365))
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (x509.CertificateBuilder().subject_name(_name("wgcni-lab-ca")).issuer_name(_name("wgcni-lab-ca"))
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(valid[0]).not_valid_after(valid[1])
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False, encipher_only=False,
                                           decipher_only=False), critical=True)
              .sign(ca_key, hashes.SHA256()))
        names: list[x509.GeneralName] = []
        for host in dict.fromkeys(hosts):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        key = ec.generate_private_key(ec.SECP256R1())
        serving = (x509.CertificateBuilder().subject_name(_name("kube-apiserver")).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(valid[0]).not_valid_after(valid[1])
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .sign(ca_key, hashes.SHA256()))
        self.ca_pem = ca.public_bytes(serialization.Encoding.PEM)
        if directory is None:
            remove_stale_temporary_directories()
            self.directory = Path(tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{os.getpid()}-"))
            weakref.finalize(self, shutil.rmtree, self.directory, True)  # also runs at interpreter exit
        else:
            directory.mkdir(mode=0o700, exist_ok=True)  # a server restarted on the same lab replaces its files
            directory.chmod(0o700)
            self.directory = directory
        self.ca_file = self._write("ca.crt", self.ca_pem)
        self.cert_file = self._write("apiserver.crt", serving.public_bytes(serialization.Encoding.PEM))
        key_file = self._write("apiserver.key", _pem_key(key))
        try:
            self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._context.minimum_version = ssl.TLSVersion.TLSv1_2
            self._context.load_cert_chain(self.cert_file, key_file)
        finally:
            key_file.unlink()

    def _write(self, name: str, data: bytes) -> Path:
        path = self.directory / name
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        return path

    def context(self) -> ssl.SSLContext:
        """The server's TLS context (one for all connections; the key lives only in it)."""
        return self._context

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting this CA (for urllib in tests and the lab's own checks)."""
        return ssl.create_default_context(cafile=str(self.ca_file))
