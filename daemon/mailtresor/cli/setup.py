"""`mailtresor setup`: from `apt install` to the first archived message.

Interactive by default: one question at a time, the default in brackets
(Enter takes it), a bad answer re-asked with the reason.  Every question is
also a flag; `--yes` takes the defaults for the questions no flag answers;
`--dry-run` shows what would be written and writes nothing.  Then:

- the appliance's certificates, made (a CA of its own) or given (checked);
- enrolment with a control endpoint: the steps its admin runs are printed,
  `mailtresor setup --check` fetches the keys over mutual TLS;
  or `--trial`: a control endpoint on this machine, with the warning that
  this defeats its purpose;
- mailtresor.toml (never overwritten without --force, which keeps a copy),
  checked by the daemon's own configuration check;
- the Postfix, Sendmail or Exchange settings, and the next commands.

No secret is ever printed: private keys and the trial master secret go
straight into files of mode 0600.  The package mailtresor.setup holds the
parts; this module asks and writes.
"""

from __future__ import annotations

import datetime
import grp
import os
import pwd
import secrets
import shutil
import socket
import sys
import tomllib
from pathlib import Path

from mailtresor import CONFIG_PATH
from mailtresor.cli.common import EXIT_FAIL, EXIT_USAGE, UserError
from mailtresor.setup import answers as A
# certs, control and render (cryptography, the control client) are imported
# where they are used: `mailtresor search` builds this parser too, and must
# stay light (tests/test_read.py::test_the_client_path_imports_no_archive_code).

VOLUME_NAME = "state"          # the one volume setup makes: key volume.state


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "setup", help="guided first setup: certificates, control endpoint, configuration, MTA settings",
        description="Guided setup.  Asks one question at a time (Enter takes the default in brackets); "
                    "each question is also a flag.  Writes nothing with --dry-run.")
    g = p.add_argument_group("what to do")
    g.add_argument("--yes", "-y", action="store_true", help="take the default of every question no flag answers")
    g.add_argument("--dry-run", action="store_true", help="show what would be written; write nothing")
    g.add_argument("--force", action="store_true",
                   help="overwrite existing files (each old one is kept as FILE.bak-TIMESTAMP)")
    g.add_argument("--check", action="store_true",
                   help="check the enrolment: fetch every key the configuration needs over mutual TLS")
    g.add_argument("--config", dest="setup_config", metavar="PATH",
                   help=f"the configuration to write or check (default {CONFIG_PATH})")
    g.add_argument("--root", metavar="DIR", default="/",
                   help="write every file under DIR instead of / (tests, image builds); the paths in the "
                        "configuration point there too")
    q = p.add_argument_group("answers")
    q.add_argument("--trial", action="store_true",
                   help="a control endpoint on this machine (for a trial only: a stolen disk carries the keys)")
    q.add_argument("--control-url", metavar="URL", help="the control endpoint, https://HOST:PORT")
    q.add_argument("--control-ca", metavar="FILE",
                   help="the CA certificate that signed the control endpoint's certificate")
    q.add_argument("--control-port", metavar="PORT", help="--trial: the local control endpoint's port (8444)")
    q.add_argument("--name", help="the appliance's name at the control endpoint")
    q.add_argument("--hostname", help="the appliance's fully qualified host name")
    q.add_argument("--tenant", action="append", metavar="NAME=DOMAIN[,DOMAIN]",
                   help="a tenant and its mail domains (repeat for more)")
    q.add_argument("--mta", help=f"the mail server to set up for: {', '.join(A.MTAS)}")
    q.add_argument("--no-milter", action="store_true", help="Postfix/Sendmail: no milter, the relay only")
    q.add_argument("--listen-address", metavar="ADDR", help="the relay's address (0.0.0.0: all)")
    q.add_argument("--smtp-port", metavar="PORT", help="the relay's STARTTLS port (25; 0: none)")
    q.add_argument("--smtps-port", metavar="PORT", help="the relay's implicit-TLS port (465; 0: none)")
    q.add_argument("--mta-networks", metavar="NETS", help="networks allowed to deliver to the relay")
    q.add_argument("--api-listen", metavar="ADDR:PORT", help="the HTTPS API and web UI (127.0.0.1:8443)")
    q.add_argument("--exchange-tenant-id", metavar="GUID", help="Exchange Online's tenant id (empty: on premises)")
    q.add_argument("--exchange-cert-name", metavar="CN", help="Exchange Server: its client certificate's CN")
    q.add_argument("--journal-address", metavar="ADDR", help="Exchange: the journal rule's address")
    q.add_argument("--make-certs", choices=("yes", "no"), help="make the certificates (no: give files)")
    q.add_argument("--relay-cert", metavar="FILE", help="the relay's certificate (with --make-certs no)")
    q.add_argument("--relay-key", metavar="FILE", help="the relay certificate's private key")
    q.add_argument("--appliance-cert", metavar="FILE", help="the client certificate for the control endpoint")
    q.add_argument("--appliance-key", metavar="FILE", help="the client certificate's private key")
    q.add_argument("--spool-dir", metavar="DIR", help="the spool (default /var/spool/mailtresor)")
    q.add_argument("--state-dir", metavar="DIR", help="store, index, users (default /var/lib/mailtresor)")
    q.add_argument("--volume-dir", nargs="+", metavar="DIR", default=[],
                   help="encrypt these empty directories (fscrypt, ext4 -O encrypt) with `mailtresor volume init`")
    p.set_defaults(func=run_setup, without_config=True)


# --- asking -------------------------------------------------------------------------------

class Asker:
    """One question at a time.  A flag's value is checked and kept (a bad
    one stops with the flag named); --yes takes the default; otherwise the
    question is asked on stdout and the answer read from stdin."""

    def __init__(self, args, stdin=None, out=None):
        self.yes = args.yes
        self.stdin = stdin or sys.stdin
        self.out = out or sys.stdout

    def __call__(self, label: str, flag: str, given, default, check):
        if given is not None:
            try:
                return check(given)
            except ValueError as e:
                raise UserError(f"{flag.split(' or ')[0]}: {e}", EXIT_USAGE) from None
        if self.yes:
            if default is None:
                raise UserError(f"{label}: no default; give {flag}", EXIT_USAGE)
            return check(default)
        while True:
            self.out.write(f"{label}" + (f" [{default}]" if default not in (None, "") else "") + ": ")
            self.out.flush()
            line = self.stdin.readline()
            if not line:
                raise UserError(f"{label}: no answer (standard input ended); give {flag} or --yes", EXIT_USAGE)
            text = line.strip()
            if not _isatty(self.stdin):
                # Answers from a pipe are not echoed by a terminal: keep the transcript readable.
                self.out.write(text + "\n")
            if not text:
                if default is None:
                    self.out.write("  an answer is needed\n")
                    continue
                text = default
            try:
                return check(text)
            except ValueError as e:
                self.out.write(f"  {e}\n")


def _isatty(f) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):
        return False


def _ask_all(args, ask: Asker) -> A.Answers:
    if args.trial:
        if args.control_url:
            raise UserError("--trial and --control-url: choose one", EXIT_USAGE)
        url = ""
    else:
        def url_or_trial(t):
            return "" if t.strip().lower() == "trial" else A.control_url(t)
        url = ask("Control endpoint URL (https://HOST:PORT), or 'trial' for one on this machine "
                  "(a trial only)", "--control-url or --trial", args.control_url, None, url_or_trial)
    trial = url == ""
    fqdn = socket.getfqdn()
    try:
        host_default = A.hostname(fqdn)
    except ValueError:
        host_default = "archive1.example.org"
    name = ask("Appliance name (its name at the control endpoint)", "--name", args.name,
               A.default_name(host_default), A.appliance_name)
    host = ask("Host name of this appliance (SMTP greeting, certificate)", "--hostname", args.hostname,
               host_default, A.hostname)
    if args.tenant:
        try:
            tenants = [A.tenant_spec(t) for t in args.tenant]
        except ValueError as e:
            raise UserError(f"--tenant: {e}", EXIT_USAGE) from None
    else:
        tenants = []
        dom = A.default_domain(host)
        while len(tenants) < 100:
            tname = ask("Tenant name (an organisation whose mail is archived)", "--tenant",
                        None, A.default_name(dom) if not tenants else None, A.tenant_name)
            doms = ask(f"Mail domains of tenant {tname} (comma-separated)", "--tenant", None,
                       dom if not tenants else None, A.domains)
            tenants.append(A.Tenant(tname, doms))
            if ask.yes or not ask("Another tenant?", "--tenant", None, "no", A.yes_no):
                break
    seen = set()
    for t in tenants:
        if t.name in seen:
            raise UserError(f"--tenant: tenant {t.name!r} given twice", EXIT_USAGE)
        seen.add(t.name)
    mta = ask(f"Mail server to set up for ({', '.join(A.MTAS)})", "--mta", args.mta, "postfix", A.mta)
    a = A.Answers(name=name, hostname=host, control_url=url, trial=trial, tenants=tenants, mta=mta,
                  milter=not args.no_milter and mta in ("postfix", "sendmail"))
    a.listen_address = ask("Relay listen address (0.0.0.0: all)", "--listen-address", args.listen_address,
                           "0.0.0.0", A.ip_address)
    a.smtp_port = A.port(args.smtp_port, allow_zero=True) if args.smtp_port is not None else 25
    a.smtps_port = A.port(args.smtps_port, allow_zero=True) if args.smtps_port is not None else 465
    if not (a.smtp_port or a.smtps_port):
        raise UserError("--smtp-port and --smtps-port are both 0: the relay needs a listener", EXIT_USAGE)
    a.mta_networks = ask("Networks of the mail servers that deliver to the relay", "--mta-networks",
                         args.mta_networks, "127.0.0.0/8", A.networks)
    a.api_listen = ask("HTTPS API and web UI address:port", "--api-listen", args.api_listen,
                       "127.0.0.1:8443", A.host_port)
    if trial:
        a.control_port = A.port(args.control_port) if args.control_port else 8444
    if mta == "exchange":
        a.exchange_tenant_id = ask("Exchange Online tenant id (empty: Exchange Server on premises)",
                                   "--exchange-tenant-id", args.exchange_tenant_id, "", A.guid)
        if not a.exchange_tenant_id:
            a.exchange_cert_name = ask("CN of the client certificate Exchange's transport servers present",
                                       "--exchange-cert-name", args.exchange_cert_name,
                                       f"exchange-journal.{tenants[0].domains[0]}", A.hostname)
        default_journal = (f"journal-{secrets.token_hex(3)}@{host}" if a.exchange_tenant_id else f"journal@{host}")
        a.journal_address = ask("Journal address (the journal rule's recipient)", "--journal-address",
                                args.journal_address, default_journal, _address)
    a.volume_dirs = [Path(d).absolute() for d in args.volume_dir]
    return a


def _address(text: str) -> str:
    local, at, dom = text.strip().rpartition("@")
    if not at or not local or any(c.isspace() or c in "<>," for c in local):
        raise ValueError(f"{text.strip()!r} is not an address (local@domain)")
    return f"{local}@{A.domain(dom)}"


# --- files --------------------------------------------------------------------------------

class Plan:
    """The files setup will write, in order, and who owns each."""

    def __init__(self):
        self.files: list[tuple[Path, bytes, int, str]] = []     # path, data, mode, owner

    def add(self, path: Path, data: bytes, *, private: bool = False, owner: str = "root") -> None:
        self.files.append((Path(path), data, 0o600 if private else 0o644, owner))


def _ids(owner: str) -> tuple[int, int] | None:
    """uid, gid of a system user, if we are root and it exists (the package's sysusers)."""
    if os.geteuid() != 0 or owner == "root":
        return None
    try:
        pw = pwd.getpwnam(owner)
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def _backup_name(path: Path, stamp: str) -> Path:
    return path.with_name(f"{path.name}.bak-{stamp}")


def _write(path: Path, data: bytes, mode: int, owner: str, stamp: str) -> Path | None:
    """Write atomically (a temporary file renamed); an existing file is
    first copied to FILE.bak-STAMP (same mode).  The backup's path, if any."""
    path.parent.mkdir(parents=True, exist_ok=True)
    backup = None
    if path.exists():
        backup = _backup_name(path, stamp)
        shutil.copy2(path, backup)
    tmp = path.with_name(f".{path.name}.setup-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        ids = _ids(owner)
        if ids:
            os.chown(tmp, *ids)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return backup


def _mkdir(path: Path, mode: int, owner: str = "root", group: str | None = None) -> None:
    if path.is_dir():
        return
    path.mkdir(parents=True, mode=mode)
    os.chmod(path, mode)
    if os.geteuid() == 0:
        uid = _ids(owner)
        gid = None
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                gid = None
        if uid or gid is not None:
            os.chown(path, uid[0] if uid else 0, gid if gid is not None else (uid[1] if uid else 0))


# --- the command ----------------------------------------------------------------------------

def _cli(lay: render.Layout) -> str:
    return "mailtresor" if str(lay.config) == CONFIG_PATH else f"mailtresor --config {lay.config}"


def run_check(target: Path) -> int:
    from mailtresor.setup import certs, control, render
    from mailtresor import config as configmod
    try:
        cfg = configmod.load(target)
    except configmod.ConfigError as e:
        raise UserError(str(e), EXIT_USAGE) from None
    try:
        cn = certs.common_name(Path(cfg.control.cert_file).read_bytes())
    except (OSError, ValueError) as e:
        raise UserError(f"[control] cert_file {cfg.control.cert_file}: {getattr(e, 'strerror', None) or e}") from None
    print(f"checking the enrolment of {cfg.appliance.name!r} (certificate name {cn!r}) at {cfg.control.url}")
    result = control.check_enrolment(
        cfg, render.key_names([t.name for t in cfg.tenant], [v.name for v in getattr(cfg, "volume", ()) or ()]), cn)
    for line in result.lines:
        print(f"  {line}")
    if not result.ok:
        print("enrolment: NOT complete", file=sys.stderr)
        print(f"mailtresor: {result.lines[-1]}", file=sys.stderr)
        return EXIT_FAIL
    print("enrolment: OK (every key released; each release is in the control endpoint's audit log)")
    return 0


def run_setup(cfg, args) -> int:
    from mailtresor.setup import certs, control, render
    root = Path(args.root)
    target = Path(args.setup_config or args.config or (root / CONFIG_PATH.lstrip("/")))
    if args.check:
        return run_check(target)
    lay = render.Layout.under(root, target, args.spool_dir and Path(args.spool_dir).absolute(),
                              args.state_dir and Path(args.state_dir).absolute())
    if lay.config.exists() and not args.force and not args.dry_run and not _shipped_example(lay.config):
        raise UserError(f"{lay.config} exists: not overwritten (add --force to replace it; the old file is "
                        "kept as a .bak-TIMESTAMP copy)", EXIT_USAGE)
    if args.trial and (args.relay_cert or args.appliance_cert or args.make_certs == "no"):
        raise UserError("--trial makes its own certificates (its control endpoint trusts only its own CA)",
                        EXIT_USAGE)
    if args.volume_dir:
        why = control.volumes_supported()
        if why:
            raise UserError(f"--volume-dir: {why}", EXIT_USAGE)
    ask = Asker(args)
    a = _ask_all(args, ask)
    volumes = {VOLUME_NAME: a.volume_dirs} if a.volume_dirs else {}
    sock = lay.milter_socket(a.mta)
    if a.milter and len(os.fsencode(sock)) > 107:
        # sun_path holds 108 bytes: the milter could not listen there.
        raise UserError(f"the milter socket {sock} is longer than a unix socket path may be (107 bytes): "
                        "use a shorter --root, or --no-milter", EXIT_USAGE)
    plan = Plan()
    tls = lay.tls_file

    # Certificates.
    given = bool(args.relay_cert or args.appliance_cert)
    make = not a.trial and not given and ask("Make the appliance's certificates (no: give your own files)",
                                             "--make-certs", args.make_certs, "yes", A.yes_no)
    make = make or a.trial
    own_ca = make
    if make:
        ca = certs.make_ca(a.name)
        ca_cert, ca_key = certs.ca_pem(ca)
        plan.add(tls("ca.pem"), ca_cert)
        plan.add(tls("ca.key"), ca_key, private=True)
        names = tuple(dict.fromkeys([a.hostname, "localhost", "127.0.0.1"]
                                    + ([a.listen_address] if a.listen_address not in ("0.0.0.0", "::") else [])))
        relay = certs.issue(ca, a.hostname, server_names=names)
        appliance = certs.issue(ca, f"appliance-{a.name}", client=True)
    else:
        def given_pair(label, cflag, kflag, cval, kval, **kw):
            cpath = ask(f"{label} certificate (PEM file)", cflag, cval, None, _existing)
            kpath = ask(f"{label} private key (PEM file)", kflag, kval, None, _existing)
            try:
                issued = certs.check_pair(cpath, kpath, label, **kw)
            except ValueError as e:
                raise UserError(str(e), EXIT_USAGE) from None
            return issued, kpath
        relay, relay_key_path = given_pair("relay", "--relay-cert", "--relay-key", args.relay_cert,
                                           args.relay_key, host=a.hostname)
        appliance, app_key_path = given_pair("appliance (client)", "--appliance-cert", "--appliance-key",
                                             args.appliance_cert, args.appliance_key, client=True)
        relay.key_pem = relay_key_path.read_bytes()
        appliance.key_pem = app_key_path.read_bytes()
    plan.add(tls("relay.pem"), relay.cert_pem)
    plan.add(tls("relay.key"), relay.key_pem, private=True, owner="mailtresor")
    plan.add(tls("appliance.pem"), appliance.cert_pem)
    plan.add(tls("appliance.key"), appliance.key_pem, private=True, owner="mailtresor")
    appliance_cn = certs.common_name(appliance.cert_pem)
    if a.trial:
        plan.add(tls("control-ca.pem"), ca_cert)
        ctl = certs.issue(ca, "mailtresor-control", server_names=("127.0.0.1", "localhost"))
        plan.add(lay.control_dir / "clients-ca.pem", ca_cert)
        plan.add(lay.control_dir / "control.pem", ctl.cert_pem)
        plan.add(lay.control_dir / "control.key", ctl.key_pem, private=True, owner="mailtresor-control")
        plan.add(lay.control_config, render.control_text(a, lay, appliance_cn).encode())
        plan.add(lay.dropin, render.dropin_text(lay).encode())
    else:
        def ca_file(t):
            try:
                return certs.check_ca(Path(t.strip()), "control endpoint CA")
            except ValueError as e:
                raise ValueError(str(e)) from None
        plan.add(tls("control-ca.pem"), ask("The control endpoint's CA certificate (PEM file)", "--control-ca",
                                            args.control_ca, None, ca_file))

    # The configuration, checked before anything is written.
    text = render.config_text(a, lay, volumes=volumes)
    from mailtresor import config as configmod
    try:
        configmod.parse(tomllib.loads(text), lay.config)
    except (configmod.ConfigError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"the configuration made from these answers does not pass the check: {e}") from None
    plan.add(lay.config, text.encode())
    if not args.force and not args.dry_run:
        clash = [p for p, *_ in plan.files if p.exists() and not (p == lay.config and _shipped_example(p))]
        if clash:
            raise UserError(f"{clash[0]} exists: not overwritten (add --force; old files are kept as "
                            ".bak-TIMESTAMP copies)", EXIT_USAGE)

    if args.dry_run:
        return _show_dry_run(a, lay, plan, text, appliance, relay, own_ca, volumes)

    stamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
    # Directories first, with the modes the services need to traverse them
    # (the command runs under umask 077: parents made on the way would be
    # root's only).
    _mkdir(lay.config.parent, 0o755)
    _mkdir(lay.tls, 0o750, "root", "mailtresor")
    if a.trial:
        _mkdir(lay.control_dir, 0o750, "root", "mailtresor-control")
        _mkdir(lay.dropin.parent, 0o755)
    backups = []
    for path, data, mode, owner in plan.files:
        b = _write(path, data, mode, owner, stamp)
        if b:
            backups.append(b)
    # The directories the daemon writes (systemd and tmpfiles.d make them
    # on an appliance; under --root nobody else will).
    _mkdir(lay.spool, 0o700, "mailtresor")
    _mkdir(lay.state, 0o700, "mailtresor")
    _mkdir(lay.runtime, 0o750, "mailtresor")
    if a.milter and a.mta == "postfix":
        _mkdir(lay.milter_socket("postfix").parent, 0o2750, "mailtresor", "mailtresor-milter")
    # The daemon's own check (mailtresord --check-config) on the written file.
    try:
        configmod.load(lay.config)
    except configmod.ConfigError as e:
        raise UserError(f"the written configuration fails the check: {e}") from None

    print(f"Wrote (private keys mode 0600, never shown):")
    for path, _data, mode, owner in plan.files:
        print(f"  {path}  {mode:04o}" + (f" {owner}" if owner != "root" else ""))
    for b in backups:
        print(f"  (kept the old file as {b})")
    print(f"  configuration check: {lay.config}: configuration OK")

    vol_problems = []
    if a.trial:
        _mkdir(lay.control_state, 0o700, "mailtresor-control")
        _mkdir(lay.master_key.parent, 0o700)
        if not lay.master_key.exists():
            control.new_master_secret(lay.master_key, lambda p, d, private: _write(p, d, 0o600, "root", stamp))
        made = control.make_trial_keys(lay.control_state / "keystore.json", lay.control_state / "audit.log",
                                       lay.master_key, a.name, render.key_names([t.name for t in a.tenants], list(volumes)))
        ids = _ids("mailtresor-control")
        if ids:
            for p in lay.control_state.iterdir():
                os.chown(p, *ids)
        print(f"  trial control endpoint: {lay.control_config}, key store {lay.control_state} "
              f"({len(made)} keys made: {', '.join(made) or 'none new'})")
        if volumes:
            vol_problems = _volume_step_trial(lay, a, list(volumes))
    _give_to_daemon(lay.spool, lay.state)
    print()
    if a.trial:
        print("WARNING " + render.TRIAL_WARNING)
        print()
    else:
        print(render.enrolment_text(a, lay, appliance_cn, certs.fingerprint(appliance.cert_pem), list(volumes),
                                    own_ca))
        if volumes:
            print(f"  Then encrypt the volume:  {_cli(lay)} volume init {VOLUME_NAME}")
        print()
    print(render.mta_text(a, lay, certs.fingerprint(relay.cert_pem)))
    print()
    print(render.next_text(a, lay, _cli(lay)))
    for p in vol_problems:
        print(f"mailtresor: {p}", file=sys.stderr)
    return EXIT_FAIL if vol_problems else 0


def _give_to_daemon(*dirs: Path) -> None:
    """The spool and state directories belong to the daemon's user, mode
    0700, as tmpfiles.d and StateDirectory= make the default ones: a
    directory given with --spool-dir/--state-dir (often the empty root of a
    volume, made by root) would otherwise stop mailtresord at its first
    write.  Only as root, and only if the package's user exists."""
    ids = _ids("mailtresor")
    for d in dirs:
        if ids is None or not d.is_dir():
            continue
        st = d.stat()
        if (st.st_uid, st.st_gid) != ids:
            os.chown(d, *ids)
        os.chmod(d, 0o700)


def _volume_step_trial(lay: render.Layout, a: A.Answers, names: list[str]) -> list[str]:
    """`mailtresor volume init` for the volumes, with the trial control
    endpoint started for the step (the key comes from it, as at boot)."""
    from mailtresor.setup import control
    try:
        proc = control.start_trial_control(lay.control_config, lay.master_key.parent, a.control_port)
    except RuntimeError as e:
        return [str(e)]
    try:
        problems = control.init_volumes(lay.config, names)
    finally:
        control.stop_trial_control(proc)
    if not problems:
        print(f"  volumes encrypted: {', '.join(names)}")
    return problems


def _shipped_example(path: Path) -> bool:
    """Is PATH the package's conffile, unchanged?  `apt install` leaves the
    example in /etc/mailtresor/mailtresor.toml; setup replaces it without
    --force (keeping a copy), but never a file the admin has edited."""
    if str(path) != CONFIG_PATH:
        return False
    import hashlib
    import subprocess
    try:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Conffiles}", "mailtresor"], capture_output=True, text=True,
                           timeout=30)
    except OSError:
        return False
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == CONFIG_PATH:
            return hashlib.md5(path.read_bytes()).hexdigest() == parts[1]
    return False


def _existing(text: str) -> Path:
    p = Path(text.strip())
    if not p.is_file():
        raise ValueError(f"{p}: no such file")
    return p


def _show_dry_run(a, lay, plan, text, appliance, relay, own_ca, volumes) -> int:
    from mailtresor.setup import certs, render
    print("Dry run: nothing is written.  Would write:")
    for path, _data, mode, owner in plan.files:
        exists = " (exists: replaced with --force, old copy kept)" if path.exists() else ""
        print(f"  {path}  {mode:04o}" + (f" {owner}" if owner != "root" else "") + exists)
    if a.trial:
        print(f"  {lay.master_key}  0600 (a new random master secret)")
        print(f"  {lay.control_state}/keystore.json, audit.log (keys: "
              f"{', '.join(render.key_names([t.name for t in a.tenants], list(volumes)))})")
    print(f"\n--- {lay.config} ---")
    print(text, end="")
    print("---\n")
    if a.trial:
        print("WARNING " + render.TRIAL_WARNING + "\n")
    else:
        print(render.enrolment_text(a, lay, certs.common_name(appliance.cert_pem),
                                    certs.fingerprint(appliance.cert_pem), list(volumes), own_ca) + "\n")
    print(render.mta_text(a, lay, certs.fingerprint(relay.cert_pem)))
    return 0
