"""A private OpenLDAP slapd for tests and the LDAP login benchmark.

    with Slapd(tmp_path) as ldap:      # LDAPS on 127.0.0.1:<free port>
        ldap.url, ldap.ca_file, ldap.base, ldap.users["alice"]

Its own slapd.conf and mdb database in a temporary directory, a certificate
from a CA made for it (mailtresor.keys.pki), data loaded with slapadd before it
starts, and a tiny schema for Exchange's proxyAddresses.  Groups are
groupOfNames; the login code finds a user's groups with (member=<DN>).
"""

from __future__ import annotations

import base64
import grp
import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from mailtresor.keys.pki import CA

from .devstack import wait_port
from .stack import free_port

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
BASE = "dc=acme,dc=example"
SERVICE_DN = f"cn=svc,ou=system,{BASE}"
SERVICE_PASSWORD = "service-secret-1"

SCHEMA = """\
attributetype ( 1.3.6.1.4.1.99999.77.1.1 NAME 'proxyAddresses'
    EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )
objectclass ( 1.3.6.1.4.1.99999.77.2.1 NAME 'mailtresorMailUser' SUP top AUXILIARY
    MAY proxyAddresses )
"""

# name -> (password, mail, proxyAddresses)
USERS = {
    "alice": ("alice-password", "Alice@Acme.Example", ()),
    "bob": ("bob-password", "bob@acme.example", ("SMTP:Bob.Builder@Acme.Example", "smtp:bob@old.acme.example",
                                                 "X500:/o=Acme/cn=bob", "sip:bob@acme.example")),
    "carol": ("carol-password", "carol@acme.example", ()),
}
# group cn -> members
GROUPS = {"auditors": ["carol"], "admins": ["bob"], "staff": ["alice", "bob", "carol"]}


def _service_user():
    """Debian's openldap account when we are root (slapd then drops to it), else None."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("openldap")
    except KeyError:
        return None


def _reachable(path: Path, pw) -> bool:
    """Whether every directory above `path` lets the account `pw` through."""
    for d in list(path.resolve().parents):
        st = os.stat(d)
        if not (st.st_mode & 0o001 or (st.st_uid == pw.pw_uid and st.st_mode & 0o100)
                or (st.st_gid == pw.pw_gid and st.st_mode & 0o010)):
            return False
    return True


def ssha(password: str) -> str:
    salt = os.urandom(8)
    return "{SSHA}" + base64.b64encode(hashlib.sha1(password.encode() + salt).digest() + salt).decode()


def user_dn(name: str) -> str:
    return f"uid={name},ou=people,{BASE}"


def group_dn(name: str) -> str:
    return f"cn={name},ou=groups,{BASE}"


def ldif(users=USERS, groups=GROUPS) -> str:
    out = [f"dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: acme\no: Acme\n",
           f"dn: ou=people,{BASE}\nobjectClass: organizationalUnit\nou: people\n",
           f"dn: ou=groups,{BASE}\nobjectClass: organizationalUnit\nou: groups\n",
           f"dn: ou=system,{BASE}\nobjectClass: organizationalUnit\nou: system\n",
           f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
           f"cn: svc\nuserPassword: {ssha(SERVICE_PASSWORD)}\n"]
    for name, (pw, mail, proxies) in users.items():
        e = (f"dn: {user_dn(name)}\nobjectClass: inetOrgPerson\nobjectClass: mailtresorMailUser\n"
             f"uid: {name}\ncn: {name.title()}\nsn: {name.title()}\nmail: {mail}\nuserPassword: {ssha(pw)}\n")
        e += "".join(f"proxyAddresses: {p}\n" for p in proxies)
        out.append(e)
    for g, members in groups.items():
        out.append(f"dn: {group_dn(g)}\nobjectClass: groupOfNames\ncn: {g}\n"
                   + "".join(f"member: {user_dn(m)}\n" for m in members))
    return "\n".join(out)


class Slapd:
    def __init__(self, directory: Path, *, users=USERS, groups=GROUPS):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._owned_dir = None
        self._run_as = _service_user()
        if self._run_as is not None and not _reachable(self.dir, self._run_as):
            # pytest's tmp_path sits under a 0700 root directory that the
            # openldap user cannot traverse: a directory of its own in /tmp.
            self.dir = self._owned_dir = Path(tempfile.mkdtemp(prefix="mailtresor-slapd-"))
        self.port = free_port()
        self.url = f"ldaps://127.0.0.1:{self.port}"
        self.plain_port = free_port()
        self.plain_url = f"ldap://127.0.0.1:{self.plain_port}"      # for StartTLS
        self.base = BASE
        self.users = {n: u[0] for n, u in users.items()}
        self.proc: subprocess.Popen | None = None
        pki = self.dir / "pki"
        ca = CA.create("slapd test CA")
        ca.save(pki / "ca.pem", pki / "ca.key")
        ca.issue_to(pki / "slapd.pem", pki / "slapd.key", "slapd", server_names=("127.0.0.1", "localhost"))
        # A CA that did not sign the directory's certificate.
        CA.create("another CA").save(pki / "other-ca.pem", pki / "other-ca.key")
        self.ca_file, self.other_ca_file = pki / "ca.pem", pki / "other-ca.pem"
        self.service_password_file = self.dir / "svc.password"
        self.service_password_file.write_text(SERVICE_PASSWORD + "\n")
        os.chmod(self.service_password_file, 0o600)
        (self.dir / "db").mkdir(exist_ok=True)
        (self.dir / "mailtresor.schema").write_text(SCHEMA)
        self.conf = self.dir / "slapd.conf"
        self.conf.write_text(f"""\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include {self.dir / 'mailtresor.schema'}
pidfile {self.dir / 'slapd.pid'}
argsfile {self.dir / 'slapd.args'}
modulepath /usr/lib/ldap
moduleload back_mdb
TLSCACertificateFile {pki / 'ca.pem'}
TLSCertificateFile {pki / 'slapd.pem'}
TLSCertificateKeyFile {pki / 'slapd.key'}
loglevel none

database mdb
maxsize 10485760
suffix "{BASE}"
rootdn "cn=admin,{BASE}"
directory {self.dir / 'db'}
index objectClass,uid,member eq
access to attrs=userPassword
    by anonymous auth
    by * none
access to *
    by * read
""")
        (self.dir / "data.ldif").write_text(ldif(users, groups))
        r = subprocess.run([SLAPADD, "-f", str(self.conf), "-l", str(self.dir / "data.ldif")],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"slapadd failed: {r.stderr.strip()}")

    def start(self) -> "Slapd":
        # -d 0: stay in the foreground (the test owns the process), log nothing.
        argv = [SLAPD, "-f", str(self.conf), "-h", f"{self.url}/ {self.plain_url}/", "-d", "0"]
        if self._run_as is not None:
            # As root (CI), slapd drops to Debian's openldap user once its port is bound.
            pw = self._run_as
            for root, dirs, files in os.walk(self.dir):
                for n in dirs + files:
                    os.chown(os.path.join(root, n), pw.pw_uid, pw.pw_gid)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            argv += ["-u", pw.pw_name, "-g", grp.getgrgid(pw.pw_gid).gr_name]
        self.proc = subprocess.Popen(argv,
                                     stdout=subprocess.DEVNULL, stderr=open(self.dir / "slapd.log", "wb"))
        wait_port("127.0.0.1", self.port, timeout=20, proc=self.proc)
        wait_port("127.0.0.1", self.plain_port, timeout=20, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self):
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None

    def __exit__(self, *exc):
        self.close()

    def ldap_config(self, **over) -> dict:
        """A [tenant.ldap] table for this directory (a dict for config.parse)."""
        cfg = {"url": self.url, "ca_file": str(self.ca_file), "base": BASE,
               "bind_dn": SERVICE_DN, "bind_password_file": str(self.service_password_file),
               "address_attributes": ["mail", "proxyAddresses"],
               "roles": {group_dn("auditors"): "auditor", group_dn("admins"): "admin"}}
        cfg.update(over)
        return {k: v for k, v in cfg.items() if v is not None}


if __name__ == "__main__":                      # a directory to poke at by hand
    import tempfile
    with tempfile.TemporaryDirectory() as d, Slapd(Path(d)) as s:
        print(s.url, s.ca_file)
        time.sleep(3600)
