"""The texts `mailtresor setup` writes and prints.

Pure functions of the answers and the layout: the configuration files,
the control host admin's enrolment steps, the MTA settings and the next
commands.  Nothing here holds or prints a secret: the only key material
setup touches goes straight from certs.py/control.py into files.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path

from mailtresor import RUNTIME_DIRECTORY

from .answers import Answers

# Exchange Online's sending networks and the name on the certificate every
# one of its servers presents (conf/exchange-journaling.md says why).
EXO_NETWORKS = ["40.92.0.0/15", "40.107.0.0/16", "52.100.0.0/14", "104.47.0.0/17"]
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
POSTFIX_MILTER = "/var/spool/postfix/mailtresor/milter.sock"

TRIAL_WARNING = """\
TRIAL: the control endpoint runs on this same machine.  That defeats its
purpose: the keys that decrypt the archive are on the same disk as the
archive, so a stolen disk or backup of this machine carries both.  Use it
to try mailtresor, never for mail that matters.  To move to a real control
endpoint on another host: set it up there (mailtresor-control), run
`mailtresor setup --force --control-url https://HOST:PORT --control-ca FILE`
here and follow the enrolment steps it prints (the keys must be moved with
the key store, not re-created, or the archive made so far cannot be read),
then stop mailtresor-control here and delete /etc/mailtresor/control and
/var/lib/mailtresor-control."""


@dataclass
class Layout:
    """Where setup writes, under `root` ("/" on an appliance; a scratch
    directory in tests and --dry-run demonstrations)."""
    root: Path
    config: Path
    spool: Path
    state: Path

    @classmethod
    def under(cls, root: Path, config: Path | None = None, spool: Path | None = None,
              state: Path | None = None) -> "Layout":
        root = Path(root).absolute()
        return cls(root, Path(config) if config else root / "etc/mailtresor/mailtresor.toml",
                   Path(spool) if spool else root / "var/spool/mailtresor",
                   Path(state) if state else root / "var/lib/mailtresor")

    def at(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    @property
    def tls(self) -> Path:
        return self.config.parent / "tls"

    def tls_file(self, name: str) -> Path:
        return self.tls / name

    @property
    def runtime(self) -> Path:
        return self.at(RUNTIME_DIRECTORY)

    @property
    def control_config(self) -> Path:
        return self.config.parent / "control.toml"

    @property
    def control_dir(self) -> Path:
        return self.config.parent / "control"

    @property
    def master_key(self) -> Path:
        return self.control_dir / "credentials" / "master-key"

    @property
    def control_state(self) -> Path:
        return self.at("/var/lib/mailtresor-control")

    @property
    def dropin(self) -> Path:
        return self.at("/etc/systemd/system/mailtresor-control.service.d/trial.conf")

    def milter_socket(self, mta: str) -> Path:
        return self.at(POSTFIX_MILTER) if mta == "postfix" else self.runtime / "milter.sock"


def q(value) -> str:
    """A TOML value (strings, numbers, booleans, lists of them)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(q(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        value = str(value)
    return json.dumps(value, ensure_ascii=False)


def key_names(tenants: list[str], volumes: list[str]) -> list[str]:
    """Every key an appliance with these tenants and volumes fetches from
    the control endpoint: what enrolment creates and --check fetches."""
    return ["spool", "seal", "access"] + [f"tenant.{t}" for t in tenants] + [f"volume.{v}" for v in volumes]


def control_url(a: Answers) -> str:
    return a.control_url or f"https://127.0.0.1:{a.control_port}"


def journal_connector(a: Answers) -> str:
    tenant = a.tenants[0].name
    if a.exchange_tenant_id:
        return (f'[[relay.connector]]\n'
                f'# Exchange Online journaling: its networks, the certificate all its servers present,\n'
                f'# and -- what tells this organisation from the others -- its tenant id and the\n'
                f'# unguessable journal address (conf/exchange-journaling.md).\n'
                f'name = "exchange-online"\nnetworks = {q(EXO_NETWORKS)}\nclient_cert = "required"\n'
                f'client_cert_names = ["mail.protection.outlook.com"]\ntenant = {q(tenant)}\njournal = true\n'
                f'exchange_tenant_id = {q(a.exchange_tenant_id)}\nrecipients = {q([a.journal_address])}\n')
    return (f'[[relay.connector]]\n'
            f'# Exchange Server journaling: the transport servers\' networks and the CN of the\n'
            f'# client certificate they present (conf/exchange-journaling.md).\n'
            f'name = "exchange"\nnetworks = {q(a.mta_networks)}\nclient_cert = "required"\n'
            f'client_cert_names = {q([a.exchange_cert_name])}\ntenant = {q(tenant)}\njournal = true\n'
            f'recipients = {q([a.journal_address])}\n')


def config_text(a: Answers, lay: Layout, *, volumes: dict[str, list[Path]] | None = None,
                now: datetime.datetime | None = None) -> str:
    """mailtresor.toml from the answers."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    out = [f"# {lay.config}: written by `mailtresor setup` on {now:%Y-%m-%d %H:%M} UTC.",
           "# Check it after any edit:  mailtresord --config " + str(lay.config) + " --check-config",
           "# Every setting: mailtresor.toml(5) and /usr/share/doc/mailtresor/examples/mailtresor.toml.",
           "#"]
    if a.trial:
        out += ["# " + line if line else "#" for line in TRIAL_WARNING.splitlines()]
        out.append("#")
    out += ["", "[appliance]", f"name = {q(a.name)}                # as the control endpoint knows it",
            f"hostname = {q(a.hostname)}", f"runtime_directory = {q(lay.runtime)}",
            f"state_directory = {q(lay.state)}", "",
            "[control]",
            "# The key custody service: every key is fetched from it over mutual TLS, never stored here."
            + (" (TRIAL: on this machine.)" if a.trial else ""),
            f"url = {q(control_url(a))}", f"ca_file = {q(lay.tls_file('control-ca.pem'))}",
            f"cert_file = {q(lay.tls_file('appliance.pem'))}", f"key_file = {q(lay.tls_file('appliance.key'))}",
            "", "[spool]", f"directory = {q(lay.spool)}", "",
            "[tls]", "# The relay's certificate (STARTTLS on port 25, implicit TLS on 465).",
            f"cert_file = {q(lay.tls_file('relay.pem'))}", f"key_file = {q(lay.tls_file('relay.key'))}"]
    if a.mta == "exchange":
        out += ["# Who signs the journaling senders' client certificates (Exchange Online: public CAs;",
                "# Exchange Server: put your internal CA's certificate here instead).",
                f"client_ca_file = {q(SYSTEM_CA_BUNDLE)}"]
    out += ["", "[relay]"]
    if a.smtp_port:
        out += ["[[relay.listener]]", 'name = "smtp"', f'endpoint = "tcp:{a.smtp_port}:interface={a.listen_address}"',
                'tls = "starttls"']
    if a.smtps_port:
        out += ["[[relay.listener]]", 'name = "smtps"',
                f'endpoint = "tcp:{a.smtps_port}:interface={a.listen_address}"', 'tls = "implicit"']
    out += ["", "[[relay.connector]]", "# The mail servers allowed to hand mail to the relay (over TLS).",
            'name = "mta"', f"networks = {q(a.mta_networks)}"]
    if a.mta == "exchange":
        out += ["", journal_connector(a).rstrip("\n")]
    if a.milter and a.mta in ("postfix", "sendmail"):
        out += ["", "[milter]", f"# {a.mta.capitalize()} hands every message to this socket before accepting it.",
                f"listen = {q('unix:' + str(lay.milter_socket(a.mta)))}", "socket_mode = 0o660",
                'on_failure = "tempfail"']
    host, _, port = a.api_listen.rpartition(":")
    out += ["", "[archive]", f"directory = {q(lay.state / 'store')}", "",
            "[api]", "# The HTTPS API and web UI (the relay's certificate).",
            f'listen = "ssl:{port}:interface={host}"']
    for t in a.tenants:
        out += ["", "[[tenant]]", f"name = {q(t.name)}", f"domains = {q(t.domains)}"]
    for name, dirs in (volumes or {}).items():
        out += ["", "[[volume]]", f"# Encrypted with the control endpoint's key volume.{name} "
                "(mailtresor volume init/unlock).",
                f"name = {q(name)}", 'kind = "fscrypt"', f"directories = {q([str(d) for d in dirs])}"]
    return "\n".join(out) + "\n"


def control_text(a: Answers, lay: Layout, appliance_cn: str) -> str:
    """The trial control endpoint's control.toml."""
    lines = ["# " + line if line else "#" for line in TRIAL_WARNING.splitlines()]
    return "\n".join([
        f"# {lay.control_config}: the TRIAL control endpoint, written by `mailtresor setup --trial`.",
        "#", *lines, "",
        "# mailtresor-control reads only [control_server]; today's loader also wants the",
        "# three sections below, which it does not use.",
        "[appliance]", f"name = {q(a.name)}", "",
        "[control]", f"url = {q(control_url(a))}", f"ca_file = {q(lay.tls_file('control-ca.pem'))}",
        f"cert_file = {q(lay.tls_file('appliance.pem'))}", f"key_file = {q(lay.tls_file('appliance.key'))}", "",
        "[spool]", f"directory = {q(lay.spool)}", "",
        "[control_server]", f'listen = "tcp:{a.control_port}:interface=127.0.0.1"',
        f"cert_file = {q(lay.control_dir / 'control.pem')}", f"key_file = {q(lay.control_dir / 'control.key')}",
        "# The CA of the appliances' client certificates (this appliance's own CA; a copy",
        "# here, where the service's user can read it: tls/ is the daemon's group's).",
        f"client_ca_file = {q(lay.control_dir / 'clients-ca.pem')}",
        f"keystore = {q(lay.control_state / 'keystore.json')}",
        f"audit_log = {q(lay.control_state / 'audit.log')}",
        "# systemd hands the master secret over as a credential (the drop-in",
        f"# {lay.dropin} loads it from {lay.master_key}).",
        'master_key = "credential:master-key"', "",
        "[[control_server.appliance]]", f"name = {q(a.name)}", f"cert_names = {q([appliance_cn])}", ""])


def dropin_text(lay: Layout) -> str:
    real = "/" + str(lay.master_key.relative_to(lay.root))
    return ("# Written by `mailtresor setup --trial`: the trial control endpoint's master secret\n"
            "# is a plain file on this machine (no TPM-sealed credential).  Delete this drop-in\n"
            "# when the control endpoint moves to its own host.\n"
            "[Service]\nLoadCredentialEncrypted=\n"
            f"LoadCredential=master-key:{real}\n")


def enrolment_text(a: Answers, lay: Layout, appliance_cn: str, fingerprint: str, volumes: list[str],
                   own_ca: bool) -> str:
    """What the control host's admin runs to enrol this appliance."""
    cfg = "/etc/mailtresor/control.toml"
    out = [f"Enrol this appliance at the control endpoint {a.control_url}.",
           "On the control host, as its admin:", ""]
    step = 1
    if own_ca:
        out += [f"  {step}. Trust this appliance's CA for client certificates: append the certificate",
                f"     {lay.tls_file('ca.pem')} (copy it over; it is public) to the file named by",
                "     [control_server] client_ca_file.", ""]
        step += 1
    out += [f"  {step}. Add the appliance to [control_server] in {cfg}:", "",
            "       [[control_server.appliance]]", f"       name = {q(a.name)}",
            f"       cert_names = {q([appliance_cn])}",
            f"     (the certificate's SHA-256 fingerprint, to compare: {fingerprint})", ""]
    step += 1
    out += [f"  {step}. Create its keys (the same identity and credential as the service,",
            "     see mailtresor-control.service):", ""]
    for k in key_names([t.name for t in a.tenants], volumes):
        out.append(f"       mailtresor-control --config {cfg} keys create --if-missing {a.name} {k}")
    out += ["", f"  {step + 1}. Restart mailtresor-control (it reads [control_server] at start).", "",
            "Then, here:  mailtresor setup --check   (fetches the keys over mutual TLS)"]
    return "\n".join(out)


def mta_text(a: Answers, lay: Layout, relay_fingerprint: str) -> str:
    """The settings to add on the mail server side."""
    host = a.hostname
    port = a.smtp_port or a.smtps_port
    if a.mta == "postfix" and a.milter:
        real = "/" + str(lay.milter_socket("postfix").relative_to(lay.root)) if lay.root != Path("/") else ""
        lines = ["Postfix on this host: add to /etc/postfix/main.cf",
                 "  (the socket is named relative to /var/spool/postfix, inside smtpd's chroot):", "",
                 "    smtpd_milters = unix:mailtresor/milter.sock",
                 "    non_smtpd_milters = unix:mailtresor/milter.sock",
                 "    milter_default_action = tempfail",
                 "    milter_protocol = 6",
                 "    milter_connect_timeout = 30s", "",
                 "  then, once:  usermod -a -G mailtresor-milter postfix && systemctl restart postfix"]
        if real and real != POSTFIX_MILTER:
            lines.append(f"  (this setup's socket: {lay.milter_socket('postfix')})")
        lines += ["", "Postfix on another host (section B of /usr/share/doc/mailtresor/examples/postfix-main.cf):",
                  "  a copy of each message to a journal address routed to the relay over verified TLS:", "",
                  f"    always_bcc = journal@{host}",
                  "    transport_maps = hash:/etc/postfix/transport",
                  f"    # /etc/postfix/transport:  journal@{host}   mailtresor-journal:[{host}]:{port}",
                  "  plus a [[relay.connector]] for that host (client_cert = \"required\", tenant = ...)."]
        return "\n".join(lines)
    if a.mta == "sendmail" and a.milter:
        return "\n".join([
            "Sendmail: add before the MAILER() lines of /etc/mail/sendmail.mc, then sendmailconfig:", "",
            f"    INPUT_MAIL_FILTER(`mailtresor', `S=unix:{lay.milter_socket('sendmail')}, F=T, "
            "T=C:30s;S:60s;R:90s;E:5m')"])
    if a.mta == "exchange":
        addr = a.journal_address
        if a.exchange_tenant_id:
            return "\n".join([
                "Exchange Online (PowerShell; conf/exchange-journaling.md explains each step):", "",
                "    New-OutboundConnector -Name \"mailtresor journal\" -ConnectorType Partner `",
                f"      -RecipientDomains {host} -UseMXRecord $false -SmartHosts {host} `",
                f"      -TlsSettings DomainValidation -TlsDomain {host}",
                "    Set-TransportConfig -JournalingReportNdrTo journal-ndr@<your domain>",
                f"    New-JournalRule -Name \"mailtresor\" -JournalEmailAddress {addr} -Scope Global -Enabled $true",
                "",
                f"  The appliance's address: {host}, port {port} (STARTTLS).  Its certificate must come from a",
                "  public CA Exchange Online trusts and name this host; the one setup made is signed by the",
                "  appliance's own CA: replace tls/relay.pem and relay.key with a public one.",
                f"  Current relay certificate SHA-256: {relay_fingerprint}"])
        return "\n".join([
            "Exchange Server (PowerShell on a transport server; conf/exchange-journaling.md):", "",
            "    New-SendConnector -Name \"mailtresor journal\" -Usage Custom `",
            f"      -AddressSpaces \"SMTP:{host};1\" -DNSRoutingEnabled $false -SmartHosts {host} -Port {port} `",
            f"      -RequireTLS $true -TlsAuthLevel DomainValidation -TlsDomain {host} `",
            f"      -TlsCertificateName \"<I>CN=<your CA><S>CN={a.exchange_cert_name}\"",
            "    Set-TransportConfig -JournalingReportNdrTo journal-ndr@<your domain>",
            f"    New-JournalRule -Name \"mailtresor\" -JournalEmailAddress {addr} -Scope Global -Enabled $true",
            "",
            f"  Exchange must trust the CA of the relay's certificate ({lay.tls_file('ca.pem')} if setup made it:",
            "  import it into the transport servers' Trusted Root store), which names "
            f"{host};", f"  its SHA-256: {relay_fingerprint}.  The transport servers present a client "
            f"certificate with CN={a.exchange_cert_name},",
            "  signed by a CA in tls.client_ca_file."])
    return (f"No MTA settings: point your mail servers at the relay, {host} port {port} "
            "(STARTTLS required).")


def next_text(a: Answers, lay: Layout, cli: str) -> str:
    """The commands that lead to the first archived message."""
    t = a.tenants[0]
    port = a.smtp_port or a.smtps_port
    tls = "-tls" if a.smtp_port else "-tlsc"
    units = "mailtresor-control mailtresor" if a.trial else "mailtresor"
    out = ["Next:"]
    if not a.trial:
        out.append(f"  {cli} setup --check                       # once the control host's admin is done")
    out += [f"  systemctl enable --now {units}",
            f"  {cli} user add --tenant {t.name} --role auditor auditor    # asks for a password",
            "      (an auditor searches all of the tenant's mail; add --role admin to manage users too)",
            f"  swaks --server {a.hostname}:{port} {tls} --tls-verify --tls-ca-path {lay.tls_file('ca.pem')} \\",
            f"        --from setup-test@{t.domains[0]} --to postmaster@{t.domains[0]} "
            "--header 'Subject: first archived message'",
            f"  {cli} search --tenant {t.name} 'subject:first'",
            f"  the web UI: https://{a.api_listen}/ (log in as auditor, organisation {t.name})"]
    return "\n".join(out)
