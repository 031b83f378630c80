"""Search across appliances (mailtresor.federation, docs/SCALING.md), for real.

Three appliances on loopback, one control endpoint (one region), one CA:
  a  holds half of tenant acme's mail and searches b's half through
     xapian-tcpsrv behind b's mutual-TLS tunnel;
  b  holds the other half and serves acme (only acme, only to a);
  c  a single archive holding all of it, the reference.
The same corpus messages go to a+b (split) and to c.  A search from a must
give what c gives: the same total and the same ids in the same order, for
words, from:, date ranges, relevance and date order and every page of a
cursor walk; within a user's scope too.  Then the refusals: a certificate
of another CA, a certificate of the CA that names no allowed peer, a tenant
not served; and b stopped: a's answer is partial and says so.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from mailtresor.access.auth import open_databases
from mailtresor.keys.client import control_fetcher
from mailtresor.keys.pki import CA

from tests.conftest import corpus_files, corpus_message
from tests.harness.stack import Stack, free_port
from tests.harness.web import api_login

N = 300                       # corpus messages, split between a and b
PW = {"alice": "alice-pass-123456", "aud": "aud-pass-1234567"}
QUERIES = ["", "the", "from:spamassassin.taint.org", "date:2002-08-01..2002-08-31", "linux OR razor",
           "subject:re", "body:free -body:linux"]


def _issue(pki, name):
    """A federation certificate: client and server, its DNS name its CN."""
    ca = CA.load(pki / "ca.pem", pki / "ca.key")
    ca.issue_to(pki / f"fed-{name}.pem", pki / f"fed-{name}.key", f"appliance-{name}",
                server_names=(f"appliance-{name}",), client=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("federation")
    pa, pb = free_port(), free_port()
    common = {"archive": {"enabled": True}, "relay": {"processes": 1}, "access": {"session_idle": 3600},
              "api": {"timeout": 30}}

    def fed(name, pki, serve_port, peers):
        return {"federation": {"serve": f"tcp:{serve_port}:interface=127.0.0.1" if serve_port else "",
                               "cert_file": str(pki / f"fed-{name}.pem"), "key_file": str(pki / f"fed-{name}.key"),
                               "region": "eu", "peer": peers}}

    a = Stack(d / "a", {**common, "appliance": {"name": "a"},
                        "control": {"cert_file": str(d / "a/pki/appliance-a.pem"),
                                    "key_file": str(d / "a/pki/appliance-a.key")},
                        "control_server": {"appliance": [{"name": "a", "cert_names": ["appliance-a"]}]},
                        **fed("a", d / "a/pki", pa, [
                            # acme's other half is on b; b is also (wrongly) said to hold globex,
                            # which b does not serve to a: a tenant not allowed.
                            {"name": "b", "address": f"127.0.0.1:{pb}", "tenants": ["acme", "globex"],
                             "serve": ["acme"], "region": "eu"},
                            # "d" is said to be at b's address: b's certificate does not name d,
                            # so a does not talk to it (a server posing as a peer).
                            {"name": "d", "address": f"127.0.0.1:{pb}", "tenants": ["globex"], "region": "eu"}])},
              milter=False)
    pki = a.pki
    for n in ("a", "b", "c"):
        _issue(pki, n)
    # One control endpoint (the region's): b and c get a's tenant keys, so
    # the three compute the same archive ids and open each other's listings.
    appliances = [{"name": n, "cert_names": [f"appliance-{n}"]} for n in ("a", "b", "c")]
    a.reconfigure({"control_server": {"appliance": appliances}})
    for to in ("b", "c"):
        for t in ("acme", "globex"):
            subprocess.run([str(Path(sys.executable).parent / "mailtresor-control"), "--config", str(a.config_path),
                            "keys", "share", "a", f"tenant.{t}", to], check=True, capture_output=True)

    def shared(name, serve_port, peers):
        over = {**common, "appliance": {"name": name},
                "control": {**a.doc["control"], "cert_file": str(pki / f"appliance-{name}.pem"),
                            "key_file": str(pki / f"appliance-{name}.key")},
                "tls": a.doc["tls"], "control_server": a.doc["control_server"]}
        if peers:
            over.update(fed(name, pki, serve_port, peers))
        s = Stack(d / name, over, milter=False)
        s.pki = pki
        return s

    b = shared("b", pb, [{"name": "a", "address": f"127.0.0.1:{pa}", "serve": ["acme"], "region": "eu"}])
    c = shared("c", None, [])
    stacks = [a, b, c]
    try:
        a.start_control()
        for s in stacks:
            users, _ = open_databases(s.cfg, control_fetcher(s.cfg))
            users.add("acme", "alice", PW["alice"], {"user"}, ["alice@acme.example"])
            users.add("acme", "aud", PW["aud"], {"auditor"}, [])
            users.add("globex", "gaud", PW["aud"], {"auditor"}, [])
            s.start_daemon()
        files = [f for f in corpus_files() if "easy-ham-1" in str(f)][:N - 20]
        files += [f for f in corpus_files() if "hard-ham-1" in str(f)][:20]
        msgs = [corpus_message(f) for f in files]
        rcpt = [["alice@acme.example"] if i % 3 == 0 else ["bob@acme.example"] for i in range(len(msgs))]
        with a.smtp() as sa, b.smtp() as sb, c.smtp() as sc:
            for i, m in enumerate(msgs):
                (sa if i % 2 else sb).sendmail("list@example.net", rcpt[i], m)
                sc.sendmail("list@example.net", rcpt[i], m)
        clients = {(s.cfg.appliance.name, u): api_login(s, "acme", u, PW[u]) for s in stacks for u in PW}
        # b's and c's searches are their own shards; a's then takes in b's.
        for name, stack, want in (("b", b, len(msgs) // 2), ("c", c, len(msgs)), ("a", a, len(msgs))):
            _wait_total(clients[(name, "aud")], want, stack)
        yield type("World", (), {"a": a, "b": b, "c": c, "clients": clients, "n": len(msgs), "pki": pki,
                                 "pb": pb})
    finally:
        for s in stacks:
            s.close()


def _wait_total(client, total, stack, timeout=90.0):
    """Until a search of everything finds `total` messages."""
    deadline = time.monotonic() + timeout
    while True:
        doc = _search(client, "", limit=1)
        if doc["total"] == total:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{doc['total']} of {total} archived\n{stack.log()[-3000:]}")
        time.sleep(0.5)


def _search(client, q, *, order="date-desc", limit=50, cursor=None, status=200):
    args = {"q": q, "limit": limit, "order": order}
    if cursor:
        args["cursor"] = cursor
    r = client.request("GET", "/api/v1/search?" + urllib.parse.urlencode(args))
    assert r.status == status, r.data[:500]
    return r.json()


def _walk(client, q, order, limit):
    """Every page of a cursor walk: (total of the first page, ids, rows)."""
    doc = _search(client, q, order=order, limit=limit)
    total, rows = doc["total"], list(doc["results"])
    pages = 1
    while doc["next_cursor"]:
        doc = _search(client, q, order=order, limit=limit, cursor=doc["next_cursor"])
        assert doc["total"] == total
        rows += doc["results"]
        pages += 1
        assert pages < 50
    return total, rows


def _same_order(got, want, key):
    """The same ids in the same order; ids whose sort key ties (same date, or
    same relevance and date) may come in either order, as in one archive
    whose document numbers differ."""
    assert len(got) == len(want)
    groups = lambda rows: [sorted(r["id"] for r in rows if key(r) == k) for k in dict.fromkeys(map(key, rows))]
    assert [key(r) for r in got] == [key(r) for r in want]
    assert groups(got) == groups(want)


def test_fan_out_equals_single_archive(world):
    aud_a, aud_c = world.clients[("a", "aud")], world.clients[("c", "aud")]
    first = _search(aud_a, "", limit=1)
    assert first["total"] == world.n and first["unavailable"] == []
    everything = _walk(aud_a, "", "date-desc", 200)[1]
    by = [r.get("appliance", "a") for r in everything]
    assert by.count("b") == world.n // 2 and by.count("a") == world.n - world.n // 2
    # The rows of b's messages are whole: decrypted here with the shared tenant key.
    single = {r["id"]: r for r in _walk(aud_c, "", "date-desc", 200)[1]}
    assert len(single) == world.n
    for r in everything:
        mine = {k: v for k, v in r.items() if k != "appliance"}
        assert mine == single[r["id"]]
    for q in QUERIES:
        for order, limit in (("date-desc", 17), ("date-asc", 50), ("relevance", 23)):
            total_a, rows_a = _walk(aud_a, q, order, limit)
            total_c, rows_c = _walk(aud_c, q, order, limit)
            assert total_a == total_c, (q, order)
            assert total_a > 0 or q.startswith("body:free"), q
            _same_order(rows_a, rows_c, key=lambda r: r["date"])


def test_relevance_order_is_the_single_archives(world):
    """Global statistics: Xapian ranks the peer's documents with the
    collection's term frequencies, not b's alone; the order of a relevance
    search is c's (ties only among equal dates)."""
    for q in ("razor spam", "linux kernel", "perl"):
        a = _search(world.clients[("a", "aud")], q, order="relevance", limit=40)["results"]
        c = _search(world.clients[("c", "aud")], q, order="relevance", limit=40)["results"]
        assert [r["id"] for r in a] == [r["id"] for r in c], q


def test_user_scope_holds_across_appliances(world):
    alice_a, alice_c = world.clients[("a", "alice")], world.clients[("c", "alice")]
    for q in ("", "the", "date:2002-08-01..2002-09-30"):
        total_a, rows_a = _walk(alice_a, q, "date-desc", 25)
        total_c, rows_c = _walk(alice_c, q, "date-desc", 25)
        assert total_a == total_c
        _same_order(rows_a, rows_c, key=lambda r: r["date"])
    total_all = _search(world.clients[("a", "aud")], "", limit=1)["total"]
    total_alice = _search(alice_a, "", limit=1)["total"]
    assert 0 < total_alice < total_all
    # b's rows among alice's: the address filter ran on b.
    rows = _walk(alice_a, "", "date-desc", 200)[1]
    assert any(r.get("appliance") == "b" for r in rows)
    # bob's mail on b is not alice's: not found from a, even by its id.
    bob = [r for r in _search(world.clients[("a", "aud")], "", limit=200)["results"]
           if r.get("appliance") == "b" and r["id"] not in {x["id"] for x in rows}]
    assert bob
    r = alice_a.request("GET", f"/api/v1/messages/{bob[0]['id']}")
    assert r.status == 404 and "appliance" not in r.json()["error"]


def test_message_of_a_peer_names_the_appliance(world):
    aud = world.clients[("a", "aud")]
    row = next(r for r in _search(aud, "", limit=200)["results"] if r.get("appliance") == "b")
    r = aud.request("GET", f"/api/v1/messages/{row['id']}")
    assert r.status == 404
    assert r.json()["error"] == "this message is held by appliance b: read it there"
    raw = aud.request("GET", f"/api/v1/messages/{row['id']}/raw")
    assert raw.status == 404 and b"appliance b" in raw.data
    # On b itself it reads.
    assert world.clients[("b", "aud")].request("GET", f"/api/v1/messages/{row['id']}").status == 200


def _tunnel(world, cert, tenant="acme"):
    """Speak to b's tunnel as `cert` (a file stem in the PKI); its answer line."""
    ctx = ssl.create_default_context(cafile=str(world.pki / "ca.pem"))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(world.pki / f"{cert}.pem"), str(world.pki / f"{cert}.key"))
    with socket.create_connection(("127.0.0.1", world.pb), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw) as s:
                s.sendall(f"mailtresor-federation/1 {tenant}\n".encode())
                return s.recv(200).decode()
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as e:
            return f"tls: {e}"


def test_refusals(world):
    b = world.b
    # a's own certificate is served acme (the forwarded tcpsrv greeting follows "ok").
    assert _tunnel(world, "fed-a").startswith("ok\n")
    # Same CA, but c is no peer of b: refused, and logged.
    assert _tunnel(world, "fed-c") == "refused the certificate names no peer of this appliance\n"
    # a, but a tenant b does not serve to a (globex); and one that does not exist: the same answer.
    assert _tunnel(world, "fed-a", "globex") == "refused tenant globex is not served to a\n"
    assert _tunnel(world, "fed-a", "nosuch") == "refused tenant nosuch is not served to a\n"
    # A certificate of another CA: no TLS session at all.
    ans = _tunnel(world, "outsider")
    assert not ans.startswith("ok"), ans
    log = b.log()
    assert "refused" in log and "certificate ['appliance-c']" in log


def test_tenant_not_served_is_flagged(world):
    """a is configured to search globex on b, which does not serve globex to
    a: b refuses (and logs it), a answers with its own and names b."""
    gaud = api_login(world.a, "globex", "gaud", PW["aud"])
    doc = _search(gaud, "")
    assert doc["total"] == 0 and doc["unavailable"] == ["b", "d"]
    assert "tenant globex is not served to a" in world.b.log()
    # "d" answered with b's certificate: a refused it before sending the tenant line.
    assert "tenant globex is not served to d" not in world.b.log()
    assert re.search(r"peer d \(127\.0\.0\.1:\d+\) for tenant globex: .*(hostname|certificate|verif)",
                     world.a.log(), re.I), world.a.log()[-2000:]


def test_export_names_what_peers_hold(world):
    """An export carries this appliance's messages (bodies do not cross);
    the job says how many matches each peer holds, never silently less."""
    aud = world.clients[("a", "aud")]
    rows = _walk(aud, "from:spamassassin.taint.org", "date-desc", 200)[1]
    on_b = sum(1 for r in rows if r.get("appliance") == "b")
    assert 0 < on_b < len(rows)
    r = aud.request("POST", "/api/v1/exports", {"format": "mbox", "query": "from:spamassassin.taint.org"})
    assert r.status == 202, r.data
    job = r.json()
    assert job["total"] == len(rows) - on_b and job["elsewhere"] == {"b": on_b}


def test_facets_count_the_peers_matches(world):
    for q in ("", "linux"):
        got = [world.clients[(n, "aud")].request("GET", "/api/v1/search?" + urllib.parse.urlencode(
            {"q": q, "limit": 1, "facets": "true"})) for n in ("a", "c")]
        assert all(r.status == 200 for r in got), got[0].data[:300]
        assert got[0].json()["facets"] == got[1].json()["facets"]


def test_a_new_shard_on_the_peer_is_searched(world):
    """xapian-tcpsrv reads its stub per connection, and b rewrites the stub
    before forwarding one: mail in a month b had no shard for is found from a
    at the next search."""
    from email.message import EmailMessage
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "old@example.net", "alice@acme.example", "a letter from 1999"
    m["Date"], m["Message-ID"] = "Thu, 15 Jul 1999 10:00:00 +0000", "<letter.1999@example.net>"
    m.set_content("found again\n")
    for s in (world.b, world.c):
        with s.smtp() as conn:
            conn.sendmail("old@example.net", ["alice@acme.example"], m.as_bytes())
    _wait_total(world.clients[("c", "aud")], world.n + 1, world.c)
    _wait_total(world.clients[("a", "aud")], world.n + 1, world.a)
    for q in ("date:1999-07-01..1999-07-31", "letter 1999"):
        rows = _search(world.clients[("a", "alice")], q)["results"]
        assert [r["appliance"] for r in rows] == ["b"], q
    assert (world.b.dir / "store/acme/1999-07/xapian").is_dir()
    world.n += 1


def test_local_tunnel_end_serves_only_the_daemon(world):
    """a's tunnel end for b listens on 127.0.0.1; another local process
    (this test) connecting to it is cut off before anything reaches b."""
    m = re.search(r"acme on b \(via 127\.0\.0\.1:(\d+)\)", world.a.log())
    assert m, world.a.log()[-2000:]
    served_before = world.b.log().count("searches tenant acme")
    try:
        with socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=10) as s:
            got = s.recv(100)
    except ConnectionResetError:                # the reset may come before connect() returns
        got = b""
    assert got == b""                           # cut off at once: no Xapian greeting from b
    assert "not made by this process" in world.a.log()
    assert world.b.log().count("searches tenant acme") == served_before


def test_tcpsrv_is_supervised(world):
    """b's xapian-tcpsrv killed: the daemon starts it again (on a new port)
    and a's searches reach b again; meanwhile they say b is unavailable."""
    import os
    import signal
    b = world.b
    main = [p for p in b.daemon_processes() if b"xapian-tcpsrv" in Path(f"/proc/{p}/cmdline").read_bytes()
            and int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) == b.daemon.pid]
    assert len(main) == 1, main
    os.kill(main[0], signal.SIGKILL)
    aud = world.clients[("a", "aud")]
    deadline = time.monotonic() + 20
    while True:
        doc = _search(aud, "", limit=1)
        if doc["unavailable"] == [] and doc["total"] == world.n:
            break
        assert doc["unavailable"] == ["b"], doc
        assert time.monotonic() < deadline, b.log()[-2000:]
        time.sleep(0.2)
    assert "xapian-tcpsrv for acme exited" in b.log()


def test_peer_down_is_a_flagged_partial_answer(world):
    aud = world.clients[("a", "aud")]
    local_total = sum(1 for r in _walk(aud, "", "date-desc", 200)[1] if "appliance" not in r)
    world.b.stop_daemon()
    doc = _search(aud, "", limit=200)
    assert doc["unavailable"] == ["b"]
    assert doc["total"] == local_total and all("appliance" not in r for r in doc["results"])
    # And a page walk of a relevance search too (the peer is left out, not an error).
    assert _search(aud, "the", order="relevance")["unavailable"] == ["b"]
    # The audit record of that search says so.
    r = aud.request("GET", "/api/v1/audit?action=search&limit=1000")
    assert r.status == 200, r.data
    recs = [x for x in r.json()["records"] if (x.get("detail") or {}).get("unavailable")]
    assert recs and recs[-1]["detail"]["unavailable"] == ["b"]


# --- the parts alone ---------------------------------------------------------------

def _control(world, *args):
    return subprocess.run([str(Path(sys.executable).parent / "mailtresor-control"), "--config",
                           str(world.a.config_path), *args], capture_output=True, text=True, timeout=60)


def test_key_share_is_for_tenant_keys_within_the_endpoint_and_audited(world):
    r = _control(world, "keys", "share", "a", "spool", "b")
    assert r.returncode == 1 and "only tenant keys (tenant.NAME) are shared" in r.stderr
    r = _control(world, "keys", "share", "a", "tenant.acme", "elsewhere")
    assert r.returncode == 1 and "'elsewhere' is not served by this control endpoint" in r.stderr
    r = _control(world, "keys", "share", "a", "tenant.acme", "b")
    assert r.returncode == 0 and "had every version already" in r.stdout
    # b has a tenant key of its own: never replaced.
    assert _control(world, "keys", "create", "b", "tenant.newco").returncode == 0
    assert _control(world, "keys", "create", "a", "tenant.newco").returncode == 0
    r = _control(world, "keys", "share", "a", "tenant.newco", "b")
    assert r.returncode == 1 and "has a different key 'tenant.newco'" in r.stderr
    # A rotation on a reaches c at the next share: every version, the older ones unchanged.
    assert _control(world, "keys", "rotate", "a", "tenant.globex").returncode == 0
    r = _control(world, "keys", "share", "a", "tenant.globex", "c")
    assert r.returncode == 0 and "version(s) 2" in r.stdout, r.stdout + r.stderr
    rows = {(x["appliance"], x["name"]): x for x in json.loads(_control(world, "keys", "list", "--json").stdout)}
    assert rows[("c", "tenant.globex")]["versions"] == [1, 2] and rows[("c", "tenant.globex")]["current"] == 2
    audit = [json.loads(x) for x in (world.a.dir / "control" / "audit.log").read_text().splitlines()]
    shares = [x for x in audit if x["event"] in ("share", "share-refused")]
    assert [(x["event"], x["key"], x["to"]) for x in shares[-5:]] == [
        ("share-refused", "spool", "b"), ("share-refused", "tenant.acme", "elsewhere"), ("share", "tenant.acme", "b"),
        ("share-refused", "tenant.newco", "b"), ("share", "tenant.globex", "c")]
    assert not any("key" in x and isinstance(x.get("key"), str) and len(x["key"]) > 40 for x in audit)
    assert _control(world, "audit", "verify").returncode == 0


def test_config_keeps_peers_in_the_region(world):
    from mailtresor import config as configmod
    import tomllib
    raw = tomllib.loads(world.a.config_path.read_text())

    def check(peer=None, **fed):
        doc = json.loads(json.dumps(raw))
        doc["federation"].update(fed)
        if peer is not None:
            doc["federation"]["peer"][0].update(peer)
        with pytest.raises(configmod.ConfigError) as e:
            configmod.parse(doc, Path("m.toml"))
        return str(e.value)

    assert configmod.parse(json.loads(json.dumps(raw)), Path("m.toml")).federation.peer[0].name == "b"
    assert "peers only within a region" in check({"region": "us"})
    assert "peers only within a region" in check({"region": ""})
    assert "'initech' is not a configured tenant" in check({"tenants": ["initech"]})
    assert "HOST:PORT" in check({"address": "b.example"})
    assert "is this appliance or is defined twice" in check({"name": "a"})
    assert "a tcp: endpoint" in check(serve="ssl:7443")
    assert "no federation.serve endpoint" in check(serve="")


def test_tunnel_line_and_stub_are_checked():
    from mailtresor.federation.tcpsrv import stub_text
    from mailtresor.federation.tunnel import parse_request
    assert parse_request(b"mailtresor-federation/1 acme") == "acme"
    for bad in (b"acme", b"mailtresor-federation/1 ", b"mailtresor-federation/1 ../x", b"mailtresor-federation/1 A",
                b"mailtresor-federation/2 acme", b"mailtresor-federation/1 acme globex", b"\xff" * 30):
        assert parse_request(bad) is None, bad
    assert stub_text(["/s/acme/2024-01/xapian"]) == "glass /s/acme/2024-01/xapian\n"
    with pytest.raises(ValueError):
        stub_text(["relative/xapian"])
    with pytest.raises(ValueError):
        stub_text(["/s/a\nremote :evil:1"])


# --- routing by tenant: the Postfix examples ------------------------------------------

POSTMAP, POSTCONF = "/usr/sbin/postmap", "/usr/sbin/postconf"
CONF = Path(__file__).resolve().parent.parent / "conf"


@pytest.mark.skipif(not Path(POSTMAP).exists(), reason="postfix is not installed")
def test_postfix_transport_example_routes_each_tenant_to_its_appliance(tmp_path):
    """The shipped maps build with postmap, the main.cf lines are known to
    postconf, and each tenant domain resolves to the appliance the example
    says holds it: journaled tenants through their copy's address, inline
    ones by domain."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "master.cf").write_text("")
    main = (CONF / "postfix-transport-main.cf").read_text()
    (etc / "main.cf").write_text(main.replace("/etc/postfix/", f"{etc}/"))
    (etc / "mailtresor-transport").write_bytes((CONF / "postfix-transport.example").read_bytes())
    (etc / "mailtresor-bcc").write_bytes((CONF / "postfix-transport-bcc.example").read_bytes())
    for name in ("mailtresor-transport", "mailtresor-bcc"):
        r = subprocess.run([POSTMAP, "-c", str(etc), f"hash:{etc / name}"], capture_output=True, text=True)
        assert r.returncode == 0 and not r.stderr, r.stderr
    r = subprocess.run([POSTCONF, "-c", str(etc), "-n"], capture_output=True, text=True)
    assert "unused parameter" not in r.stderr and "warning" not in r.stderr, r.stderr
    for key in ("transport_maps", "recipient_bcc_maps", "sender_bcc_maps"):
        assert f"{key} = hash:{etc}/" in r.stdout

    def q(key, table):
        r = subprocess.run([POSTMAP, "-c", str(etc), "-q", key, f"hash:{etc / table}"], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    def route(domain):
        journal = q(f"@{domain}", "mailtresor-bcc")
        return q(journal, "mailtresor-transport") if journal else q(domain, "mailtresor-transport")

    assert route("acme.example") == "mailtresor-journal:[archive-a.example.org]:25"
    assert route("globex.example") == "mailtresor-journal:[archive-b.example.org]:25"
    assert route("initech.example") == "smtp:[archive-a.example.org]:25"
    assert route("other.example") is None               # not a tenant: not routed to any archive
    assert q("acme.example", "mailtresor-transport") is None   # a journaled tenant's mail itself goes on as before
    # The journal copy's address is in the tenant's own domain: the relay's
    # routing by recipient domain (mailtresor.toml [[tenant]] domains) gives the tenant.
    assert q("@acme.example", "mailtresor-bcc") == "mailtresor-journal@acme.example"



def test_index_search_leaves_out_a_peer_that_fails(tmp_path):
    """index.search with a Remote: a peer that dies after the database
    opened (during the search) and one that never answers are left out and
    named; the local shard's matches are still the answer."""
    import dataclasses
    import os
    import signal

    import xapian

    from mailtresor.archive import index
    from mailtresor.federation.tcpsrv import free_port

    def shard(path, aid, when):
        db = xapian.WritableDatabase(str(path), xapian.DB_CREATE_OR_OPEN)
        doc = xapian.Document()
        doc.set_data(aid)
        doc.add_boolean_term("Q" + aid)
        doc.add_value(index.SLOT_DATE, xapian.sortable_serialise(when))
        doc.add_value(index.SLOT_SIZE, xapian.sortable_serialise(10))
        doc.add_value(index.SLOT_MONTH, "2024-01")
        db.add_document(doc)
        db.commit()
        db.close()

    shard(tmp_path / "local", "a" * 40, 1.7e9)
    shard(tmp_path / "remote", "b" * 40, 1.8e9)
    port = free_port()
    srv = subprocess.Popen(["xapian-tcpsrv", "--one-shot", "--quiet", "--interface", "127.0.0.1", "--port",
                            str(port), str(tmp_path / "remote")])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        srv.wait(5)         # that probe was the one shot: start it again for the search
        srv = subprocess.Popen(["xapian-tcpsrv", "--one-shot", "--quiet", "--interface", "127.0.0.1", "--port",
                                str(port), str(tmp_path / "remote")])
        time.sleep(0.5)

        @dataclasses.dataclass(frozen=True)
        class Dying(index.Remote):
            def open(self):
                db = super().open()
                os.kill(srv.pid, signal.SIGKILL)       # the peer dies once the search has begun
                srv.wait()
                return db

        down: set[str] = set()
        total, hits = index.search([str(tmp_path / "local"), Dying("p", "127.0.0.1", port, timeout=5)], "",
                                   unavailable=down)
        assert down == {"p"} and total == 1 and [h.archive_id for h in hits] == ["a" * 40]
        assert srv.returncode == -signal.SIGKILL        # it did open, then died: the mid-search path
        down = set()
        total, hits = index.search([str(tmp_path / "local"), index.Remote("q", "127.0.0.1", free_port(),
                                                                        connect_timeout=1)], "",
                                   order="relevance", unavailable=down)
        assert down == {"q"} and total == 1
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()


def test_a_certificate_that_cannot_serve_both_ways_is_named(world):
    import types
    from mailtresor.federation import Federation
    cfg = world.a.cfg
    fed = Federation(cfg, reactor=None)
    assert fed.certificate_problem() is None
    client_only = types.SimpleNamespace(**{**vars(cfg.federation), "cert_file": world.pki / "appliance-a.pem"})
    fed = Federation(types.SimpleNamespace(federation=client_only, control=cfg.control), reactor=None)
    assert "lacks the extended key usage serverAuth" in fed.certificate_problem()
