"""TLS of the API port: the replica's server context (mutual TLS when a client CA is given), its
reload when the files are renewed, and the context of the commands that call replicas.

The roles issue each node one certificate from the cluster CA (serverAuth and clientAuth) and
renew it in place before it expires; a running replica picks the new files up on its next check
(``CertificateReloader``), so renewal needs no restart. The metrics port stays plain HTTP: it
serves the metrics alone.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


def server_context(certfile: Path, keyfile: Path, client_ca: Path | None) -> ssl.SSLContext:
    """TLS 1.2 or later; with ``client_ca``, a client without a certificate from it is refused
    during the handshake, before any HTTP."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    ca: Path | None, certfile: Path | None = None, keyfile: Path | None = None
) -> ssl.SSLContext:
    """A client's context: the server checked against ``ca`` (the system's CAs without it),
    and the client's own certificate presented when given."""
    context = ssl.create_default_context(cafile=ca)
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile)
    return context


def _mtimes(paths: tuple[Path, ...]) -> tuple[int, ...]:
    return tuple(p.stat().st_mtime_ns for p in paths)


@dataclass
class CertificateReloader:
    """Loads renewed certificate, key and CA files into a live context.

    New connections get them; those open keep theirs. A check that finds the files changed but
    unusable (the certificate renewed, its key not yet) keeps the old ones and tries again at the
    next check.
    """

    context: ssl.SSLContext
    certfile: Path
    keyfile: Path
    client_ca: Path | None = None
    _loaded: tuple[int, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        self._loaded = self._current()

    @property
    def paths(self) -> tuple[Path, ...]:
        extra = (self.client_ca,) if self.client_ca is not None else ()
        return (self.certfile, self.keyfile, *extra)

    def _current(self) -> tuple[int, ...]:
        try:
            return _mtimes(self.paths)
        except OSError:
            return ()

    def check(self) -> bool:
        """Reload if any file changed since the last load; True when it did."""
        now = self._current()
        if not now or now == self._loaded:
            return False
        try:
            # Tried on a scratch context first: a failed load can leave a context's key cleared.
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.certfile, self.keyfile)
            self.context.load_cert_chain(self.certfile, self.keyfile)
            if self.client_ca is not None:
                # Adds to the trusted set: a CA rotation trusts old and new until a restart.
                self.context.load_verify_locations(cafile=self.client_ca)
        except (OSError, ssl.SSLError) as exc:
            log.warning("renewed TLS files not loaded (kept the current ones): %s", exc)
            return False
        self._loaded = now
        log.info("reloaded the TLS certificate %s", self.certfile)
        return True
