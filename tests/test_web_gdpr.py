"""The GDPR and evidence pages (web/gdpr.py) in real headless Chromium
against a real daemon: an auditor starts a subject access from the form,
follows the export job page and downloads the zip (the messages byte for
byte, the report); a refused address shows its reason on the form; the
Art. 30 record page; the evidence page and its "run verify now" button; an
administrator reaches evidence but not subject access; German; axe on
every page."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from mailtresor.access.auth import open_databases
from mailtresor.keys.client import control_fetcher

from tests.harness.stack import Stack
from tests.harness.web import api_login, wait_archived
from tests.test_api import mail

pytestmark = pytest.mark.skipif(not __import__("shutil").which("chromedriver"),
                                reason="chromium-driver is not installed (make deps)")

PW = {n: f"{n}-password-1" for n in ("aud", "adm")}
SUBJ = "subj@acme.example"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("webgdpr")
    stack = Stack(d, {"archive": {"enabled": True, "seal_interval": 0.5}, "api": {"timeout": 20},
                      "tenant": [{"name": "acme", "domains": ["acme.example"], "controller": "ACME GmbH"},
                                 {"name": "globex", "domains": ["globex.example"]}]}, milter=False)
    stack.start_control()
    users, _tokens = open_databases(stack.cfg, control_fetcher(stack.cfg))
    users.add("acme", "aud", PW["aud"], {"auditor"}, [])
    users.add("acme", "adm", PW["adm"], {"admin"}, [])
    stack.start_daemon()
    with stack.smtp() as s:
        s.sendmail(SUBJ, ["bob@acme.example"], mail(SUBJ, "bob@acme.example", "from subj"))
        s.sendmail("bob@acme.example", ["carol@acme.example", SUBJ],
                   mail("bob@acme.example", "carol@acme.example", "bcc subj"))
        s.sendmail("bob@acme.example", ["carol@acme.example"],
                   mail("bob@acme.example", "carol@acme.example", "not subj"))
    aud = api_login(stack, "acme", "aud", PW["aud"])
    rows = wait_archived(aud, 3, stack)["results"]
    ids = {r["subject"]: r["id"] for r in rows}
    raws = {s: aud.request("GET", f"/api/v1/messages/{ids[s]}/raw").data for s in ("from subj", "bcc subj")}
    yield type("World", (), {"stack": stack, "ids": ids, "raws": raws, "aud": aud,
                             "base": f"https://127.0.0.1:{stack.api_port}"})
    aud.close()
    stack.close()


def login(b, name, next_path):
    b.get(next_path)
    b.wait_path("/login")
    b.login(name, PW[name], "acme")
    b.wait_path(next_path)


def test_subject_access_from_the_form_to_the_download(world, browser):
    b, found = browser, []
    login(b, "aud", "/search")
    b.find("#nav-gdpr").click()
    b.wait_at("/gdpr")
    found += b.axe("gdpr")
    # A refused address: the form again, with the reason.
    b.find("#gdpr-address").send_keys("subj@localhost")
    b.find("#gdpr-submit").click()
    err = b.find("#gdpr-error")
    assert "not a mail address" in err.text
    assert b.find("#gdpr-address").get_attribute("value") == "subj@localhost"
    found += b.axe("gdpr error")
    b.find("#gdpr-address").clear()
    b.find("#gdpr-address").send_keys(SUBJ)
    b.find("#gdpr-submit").click()
    b.wait_path("/exports/")
    jid = b.path().rsplit("/", 1)[1]
    link = b.find("#export-download")
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(b.driver, 20).until(lambda d: link.is_displayed())
    found += b.axe("gdpr export job")
    b.screenshot("gdpr-export")
    link.click()
    z = zipfile.ZipFile(io.BytesIO(b.wait_download(f"export-{jid}.zip")))
    assert sorted(n for n in z.namelist() if n.endswith(".eml")) == sorted(
        f"{world.ids[s]}.eml" for s in ("from subj", "bcc subj"))
    for s in ("from subj", "bcc subj"):
        assert z.read(f"{world.ids[s]}.eml") == world.raws[s]
    rep = json.loads(z.read("report.json"))
    assert rep["subject"] == SUBJ and rep["controller"]["name"] == "ACME GmbH"
    assert not found, found


def test_records_page(world, browser):
    b = browser
    login(b, "aud", "/gdpr/records")
    assert b.find("#records-name").text == "ACME GmbH"
    rows = {tr.get_attribute("data-measure"): tr.get_attribute("data-on")
            for tr in b.all("#records-measures tbody tr")}
    assert rows["trusted time stamps (RFC 3161)"] == "false" and rows["backup"] == "true"
    assert rows["encrypted volumes"] == "none"
    assert not b.axe("records"), b.axe("records")
    b.screenshot("gdpr-records")


def test_evidence_page_and_verify_now(world, browser):
    b = browser
    login(b, "aud", "/evidence")
    assert b.find("#verify-none")
    assert len(b.all("#evidence-shards tbody tr")) >= 1
    found = b.axe("evidence")
    b.find("#verify-run").click()
    verdict = b.find("#verify-verdict")          # an element of the new page (same path)
    assert "sound" in verdict.get_attribute("class")
    found += b.axe("evidence verified")
    b.screenshot("evidence")
    assert not found, found


def test_an_administrator_sees_evidence_not_subject_access(world, browser):
    b = browser
    login(b, "adm", "/evidence")
    assert b.find("#evidence-title")
    assert b.find("#nav-gdpr").get_attribute("href").endswith("/evidence")
    assert not b.all("#gdpr-nav-access")
    b.get("/gdpr")
    assert "auditor" in b.driver.page_source and not b.all("#gdpr-form")
    b.get("/gdpr/records")
    assert not b.all("#records-name")


@pytest.fixture
def browser_de(world, tmp_path):
    from tests.harness.browser import Browser
    b = Browser(world.base, tmp_path, lang="de-DE")
    yield b
    b.close()


def test_german(world, browser_de):
    b, found = browser_de, []
    login(b, "aud", "/gdpr")
    assert b.find("#gdpr-title").text == "Auskunft"
    assert b.find("label[for=gdpr-address]").text == "E-Mail-Adresse"
    found += b.axe("gdpr (de)")
    b.get("/gdpr/records")
    assert b.find("#records-title").text == "Verarbeitungsverzeichnis"
    found += b.axe("records (de)")
    b.get("/evidence")
    assert b.find("#evidence-title").text == "Nachweise"
    assert b.find("#verify-run").text == "Jetzt prüfen"
    b.find("#verify-run").click()
    assert "einwandfrei" in b.find("#verify-verdict").text
    found += b.axe("evidence (de)")
    assert not found, found


def test_the_appliance_administrator_chooses_the_tenant_of_the_evidence(world, browser):
    users, _ = open_databases(world.stack.cfg, control_fetcher(world.stack.cfg))
    if users.get(None, "root") is None:
        users.add(None, "root", "root-password-1", {"appliance-admin"}, [])
    b = browser
    b.get("/evidence")
    b.wait_path("/login")
    b.login("root", "root-password-1", None)
    b.wait_path("/evidence")
    b.find("#evidence-tenants a[href='/evidence?tenant=acme']").click()
    b.find("#evidence-shards")
    assert b.path() == "/evidence?tenant=acme"
    assert not b.axe("evidence tenants"), b.axe("evidence tenants")
