"""Search across appliances: tenants are the unit of distribution, and a
search of a tenant whose shards are spread over several appliances of one
region runs as one Xapian query over the local shards and the peers', with
Xapian's own remote backend (docs/SCALING.md).

    fed = Federation(cfg, reactor)   # in the daemon's main process
    fed.start()                      # tcpsrv per served tenant, TLS listener, local tunnel ends
    fed.remotes("acme")              # [index.Remote] for Core.search (thread-safe)
    fed.stop()                       # a Deferred

Nothing else crosses: a peer receives a query (its terms: the words and
addresses searched for, and a user's scope filter) and answers with
document ids, values and the encrypted listing blobs, which only an
appliance holding the tenant key opens.  Message bodies never travel: a
row from a peer names the appliance that holds the message.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("mailtresor.federation")


class Federation:
    """The [federation] section at work in the daemon: the serving side
    (one xapian-tcpsrv per tenant served to some peer, behind the TLS
    listener) and the searching side (one 127.0.0.1 tunnel end per peer and
    tenant it holds)."""

    def __init__(self, cfg, reactor):
        self.full = cfg
        self.cfg = cfg.federation
        self.reactor = reactor
        self.servers = {}                  # tenant -> tcpsrv.TcpServer
        self._local: dict[tuple[str, str], int] = {}   # (peer, tenant) -> port on 127.0.0.1
        self.ports = []
        self.refused = 0
        self.served = 0
        fed = self.cfg
        c = cfg.control
        self._cert = fed.cert_file or c.cert_file
        self._key = fed.key_file or c.key_file
        self._ca = fed.ca_file or c.ca_file
        self._client_options = {}

    # --- TLS ---

    def _mine(self):
        from twisted.internet import ssl
        return ssl.PrivateCertificate.loadPEM(Path(self._cert).read_bytes() + Path(self._key).read_bytes())

    def _ca_cert(self):
        from twisted.internet import ssl
        return ssl.Certificate.loadPEM(Path(self._ca).read_bytes())

    def server_options(self):
        from twisted.internet import ssl
        me = self._mine()
        return ssl.CertificateOptions(privateKey=me.privateKey.original, certificate=me.original, verify=True,
                                      caCerts=[self._ca_cert().original], requireCertificate=True,
                                      raiseMinimumTo=ssl.TLSVersion.TLSv1_2)

    def client_options(self, peer):
        """TLS to `peer`: our certificate, the CA, and the peer's name checked
        against its certificate's DNS name."""
        from twisted.internet import ssl
        opts = self._client_options.get(peer.name)
        if opts is None:
            opts = self._client_options[peer.name] = ssl.optionsForClientTLS(
                cert_names(peer)[0], trustRoot=self._ca_cert(), clientCertificate=self._mine())
        return opts

    def certificate_problem(self) -> str | None:
        """Why this appliance's certificate cannot serve the tunnel both
        ways (None if it can): it needs the serverAuth and clientAuth
        usages and its common name as a DNS name, which peers check."""
        from cryptography import x509
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
        try:
            cert = x509.load_pem_x509_certificate(Path(self._cert).read_bytes())
        except (OSError, ValueError) as e:
            return f"cannot read {self._cert}: {e}"
        cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        try:
            usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        except x509.ExtensionNotFound:
            usages = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        try:
            dns = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.DNSName)
        except x509.ExtensionNotFound:
            dns = []
        missing = [n for n, oid in (("serverAuth", ExtendedKeyUsageOID.SERVER_AUTH),
                                    ("clientAuth", ExtendedKeyUsageOID.CLIENT_AUTH)) if oid not in usages]
        if missing:
            return f"{self._cert} lacks the extended key usage {' and '.join(missing)}"
        if not set(cns) & set(dns):
            return f"{self._cert}: its common name {cns} is not among its DNS names {dns}"
        return None

    def peer_by_cert(self, names: list[str]):
        """The configured peer one of these certificate names identifies, or None."""
        for p in self.cfg.peer:
            if set(names) & set(cert_names(p)):
                return p
        return None

    # --- life ---

    def start(self):
        """Start serving and the tunnel ends; a Deferred that fires when
        every listener listens (errors are logged: the appliance archives
        and searches locally without its peers)."""
        from twisted.internet import defer, endpoints
        from mailtresor.federation.tcpsrv import TcpServer

        served = sorted({t for p in self.cfg.peer for t in p.serve})
        waits = []
        why = self.certificate_problem()
        if why is not None:
            # Not fatal (mail is archived, local search works), but said plainly:
            # peers will refuse this appliance and it cannot serve them.
            log.error("federation: %s; set [federation] cert_file/key_file to a certificate with both "
                      "usages (docs/SCALING.md)", why)
        if served and self.full.archive is not None:
            rundir = Path(self.full.appliance.runtime_directory) / "federation"
            rundir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(rundir, 0o700)
            for t in served:
                srv = TcpServer(self.reactor, program=self.cfg.tcpsrv, tenant=t,
                                store_root=self.full.archive.directory, stub=rundir / f"{t}.stub",
                                timeout_ms=int(max(self.cfg.timeout * 6, 60) * 1000))
                srv.start()
                self.servers[t] = srv
            from mailtresor.federation.tunnel import serve_factory
            ep = endpoints.serverFromString(self.reactor, self.cfg.serve)
            d = ep.listen(serve_factory(self, self.server_options()))

            def listening(port):
                self.ports.append(port)
                log.info("federation: serving %s to %s on %s (mutual TLS)", ", ".join(served),
                         ", ".join(p.name for p in self.cfg.peer if p.serve), self.cfg.serve)
            d.addCallbacks(listening, lambda f: log.error("federation: cannot listen on %s: %s", self.cfg.serve,
                                                           f.getErrorMessage()))
            waits.append(d)
        from mailtresor.federation.tunnel import local_factory
        for p in self.cfg.peer:
            for t in p.tenants:
                port = self.reactor.listenTCP(0, local_factory(self, p, t), interface="127.0.0.1")
                self.ports.append(port)
                self._local[(p.name, t)] = port.getHost().port
        if self._local:
            log.info("federation: searching %s", ", ".join(f"{t} on {p} (via 127.0.0.1:{port})"
                                                           for (p, t), port in sorted(self._local.items())))
        return defer.gatherResults(waits, consumeErrors=True)

    def remotes(self, tenant: str) -> list:
        """The peers' shards of `tenant` as index.Remote databases, for one
        search (each opens its own connection: a search sees the shards the
        peer has when it begins)."""
        from mailtresor.archive.index import Remote
        return [Remote(appliance=p, host="127.0.0.1", port=port, timeout=self.cfg.timeout,
                       connect_timeout=self.cfg.connect_timeout)
                for (p, t), port in sorted(self._local.items()) if t == tenant]

    def status(self) -> dict:
        return {"serving": sorted(self.servers), "peers": sorted({p for p, _ in self._local}),
                "served": self.served, "refused": self.refused}

    def stop(self):
        from twisted.internet import defer
        waits = []
        for port in self.ports:
            r = port.stopListening()
            if r is not None:
                waits.append(r)
        self.ports = []
        waits += [s.stop() for s in self.servers.values()]
        return defer.gatherResults(waits, consumeErrors=True)


def cert_names(peer) -> tuple[str, ...]:
    """The certificate names that identify a peer (default "appliance-NAME")."""
    return peer.cert_names or (f"appliance-{peer.name}",)
