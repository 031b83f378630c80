"""RFC 3161 time stamps on seals, against a local `openssl ts` TSA."""

import http.server
import os
import subprocess
import threading

import pytest

from mailtresor.archive import tsa
from mailtresor.keys.ring import KeyMaterial, KeyRing
from mailtresor.archive.store import Item, Keys, Store, seal_message


def _run(*args, cwd):
    subprocess.run(args, cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def local_tsa(tmp_path_factory):
    d = tmp_path_factory.mktemp("tsa")
    (d / "ext.cnf").write_text("[tsa_ext]\nextendedKeyUsage = critical,timeStamping\n"
                               "keyUsage = critical,digitalSignature\n")
    _run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=Test TSA CA", "-days", "30", cwd=d)
    _run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", "tsa.key", "-out", "tsa.csr", "-subj", "/CN=Test TSA", cwd=d)
    _run("openssl", "x509", "-req", "-in", "tsa.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "tsa.pem", "-days", "30", "-extfile", "ext.cnf", "-extensions", "tsa_ext", cwd=d)
    (d / "serial").write_text("01\n")
    (d / "tsa.cnf").write_text(f"""[tsa]
default_tsa = tsa_config
[tsa_config]
dir = {d}
serial = $dir/serial
signer_cert = $dir/tsa.pem
signer_key = $dir/tsa.key
certs = $dir/tsa.pem
signer_digest = sha256
default_policy = 1.2.3.4.1
digests = sha256
accuracy = secs:1
ess_cert_id_alg = sha256
""")
    lock = threading.Lock()

    class TSA(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            q = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                (d / "q.tsq").write_bytes(q)
                p = subprocess.run(["openssl", "ts", "-reply", "-config", str(d / "tsa.cnf"), "-queryfile",
                                    str(d / "q.tsq"), "-out", str(d / "r.tsr")], capture_output=True)
                body = (d / "r.tsr").read_bytes() if p.returncode == 0 else b""
            self.send_response(200 if body else 500)
            self.send_header("Content-Type", "application/timestamp-reply")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TSA)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/", d / "ca.pem"
    srv.shutdown()


def test_seal_with_a_time_stamp_verifies(tmp_path, local_tsa):
    url, ca = local_tsa
    ring = KeyRing()
    ring.put(KeyMaterial("tenant.acme", 1, os.urandom(32)), current=True)
    keys = Keys(ring)
    st = Store(tmp_path)
    raw = b"Subject: stamped\r\n\r\nbody\r\n"
    st.store("acme", [Item(keys.archive_id("acme", raw), "2002-08", raw, "e1", {}, {})], keys)
    shard = st.shard("acme", "2002-08")
    seed = os.urandom(32)
    s = shard.seal(seed, timestamper=lambda m: tsa.timestamp(url, m, ca))
    assert s.tsa_token
    msg = seal_message("acme", "2002-08", s.seq, s.head, s.time)
    when = tsa.verify(s.tsa_token, msg, ca)
    assert when.endswith("GMT")
    with pytest.raises(tsa.TimestampError, match="openssl ts -verify"):
        tsa.verify(s.tsa_token, msg + b"x", ca)          # another chain head
    other_ca = tmp_path / "other.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(tmp_path / "o.key"), "-out", str(other_ca), "-subj", "/CN=Other"],
                   check=True, capture_output=True)
    with pytest.raises(tsa.TimestampError):
        tsa.verify(s.tsa_token, msg, other_ca)
    st.close()


def test_unreachable_tsa_is_a_clear_error():
    with pytest.raises(tsa.TimestampError, match="time-stamping authority http://127.0.0.1:9/"):
        tsa.timestamp("http://127.0.0.1:9/", b"x", timeout=2)
