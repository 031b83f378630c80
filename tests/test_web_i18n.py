"""English and German in the web UI: the Accept-Language negotiation
(hostile headers included), the catalogues (every msgid the UI uses has its
German, with the same placeholders; one translation per msgid), the
escaping of translated and untranslated text, and in real headless
Chromium against a real daemon: a German browser gets German pages, the
language switch keeps the user on the page and sticks, axe on the German
pages, and the switch's `next` cannot leave the site."""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest

from mailtresor.web import i18n

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "daemon/mailtresor/web"
PW = "alice-password-1"


# --- choosing the language (pure) --------------------------------------------------------------

@pytest.mark.parametrize("header, lang", [
    (None, None), ("", None),
    ("de", "de"), ("DE", "de"), ("de-DE", "de"), ("de-AT", "de"), ("de-CH,de;q=0.9", "de"),
    ("en-US,en;q=0.9", "en"), ("en-GB", "en"),
    ("de-DE,de;q=0.9,en-US;q=0.8,en;q=0.7", "de"),        # Chromium's, German
    ("en;q=0.5, de;q=0.8", "de"),                         # weights, not order
    ("de;q=0.8, en;q=0.8", "de"),                         # equal weights: the header's order
    ("fr-FR, fr;q=0.9, de;q=0.3", "de"),                  # the first one we speak
    ("fr, it", None),
    ("*", "en"), ("de;q=0, *", "en"), ("en;q=0, *", "de"), ("fr, *;q=0.1", "en"),
    ("de;q=0", None), ("de;q=0.000", None),
    ("de ; q = 0.5 , fr", "de"),                          # whitespace around the parts
    # Malformed: the range is dropped, never guessed at.
    ("de;q=abc", None), ("de;q=abc, en", "en"), ("de;q=1.5", None), ("de;q=-1", None),
    ("de;q=0.5;q=0.9", None), ("de;level=1", None), ("d e", None), ("de_DE", None),
    ("deutschland-de", None), ("de-", None), ("-de", None), (";q=1", None), (",,,,", None),
    ("de\x00", None), ("dé", None), ("de;q=1.0001", None),
    # Hostile sizes: ignored as a whole.
    ("de," + "x" * 10_000, None), ("en;q=0.1," * 40 + "de", None), ("a-" * 600 + "de", None),
])
def test_accept_language(header, lang):
    assert i18n.negotiate(header) == lang
    assert i18n.choose_language(None, header) == (lang or "en")


def test_accept_language_parse_is_ordered_and_bounded():
    assert i18n.parse_accept_language("en;q=0.5, de-AT, fr;q=0.7") == [("de-at", 1.0), ("fr", 0.7), ("en", 0.5)]
    assert i18n.parse_accept_language("de;" + "q=1;" * 5000) == []
    assert i18n.parse_accept_language("de," * 31 + "de") != []      # 32 ranges: still looked at
    assert i18n.parse_accept_language("de," * 32 + "de") == []      # 33: not


@pytest.mark.parametrize("cookie, header, lang", [
    ("en", "de-DE,de", "en"), ("de", "en-US", "de"), ("de", None, "de"),
    ("fr", "de", "de"), ("", "de", "de"), ("DE", "en", "en"), ("de; x", "en", "en"), (None, None, "en"),
])
def test_the_switchs_cookie_wins_when_it_names_a_language(cookie, header, lang):
    assert i18n.choose_language(cookie, header) == lang


# --- catalogues --------------------------------------------------------------------------------

def test_every_string_of_the_ui_has_its_german():
    """Every msgid in the templates (_, gettext, ngettext) and in web/*.py
    (N_) is translated in the merged German catalogue."""
    used = i18n.extract_messages()
    assert "Log in" in used and "The login took too long; start again." in used and "no such message" in used
    gone = i18n.missing("de")
    assert not gone, "no German for:\n" + "\n".join(f"  {', '.join(p)}: {m!r}" for m, p in gone.items())


def test_german_keeps_the_placeholders_and_each_msgid_has_one_translation():
    assert i18n.placeholder_mismatches("de") == []
    _, problems = i18n.merged_catalog("de", strict=True)
    assert problems == []


PO_HEAD = ('msgid ""\nmsgstr ""\n"Content-Type: text/plain; charset=UTF-8\\n"\n'
           '"Plural-Forms: nplurals=2; plural=(n != 1);\\n"\n\n')


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The completeness and placeholder checks fail when they should: a
    new string without German, a lost or renamed placeholder, a stray %,
    two files that translate one msgid differently; fuzzy entries are not
    used."""
    web = tmp_path / "web"
    shutil.copytree(WEB / "templates", web / "templates")
    shutil.copytree(WEB / "locale", web / "locale")
    (web / "templates" / "new.html").write_text('{{ _("A brand new string") }}{{ ngettext("%(num)d hit", '
                                               '"%(num)d hits", 3) }}')
    (web / "new.py").write_text('from mailtresor.web.i18n import N_\nLABEL = N_("A new label")\n')
    gone = i18n.missing("de", web)
    assert set(gone) == {"A brand new string", ("%(num)d hit", "%(num)d hits"), "A new label"}
    assert gone["A brand new string"] == ["templates/new.html:1"]
    (web / "locale/de/new.po").write_text(PO_HEAD + (
        'msgid "A brand new string"\nmsgstr "Neu"\n\n'
        'msgid "%(num)d hit"\nmsgid_plural "%(num)d hits"\nmsgstr[0] "%(num)d Treffer"\nmsgstr[1] "%(n)d Treffer"\n\n'
        'msgid "Error %(status)s"\nmsgstr "Fehler %(status)s"\n\n'      # the same as base.po: fine
        'msgid "Log out"\nmsgstr "Ausloggen"\n\n'                        # base.po says otherwise
        'msgid "%(a)s of %(b)s"\nmsgstr "%(a)s von %(c)s"\n\n'
        'msgid "Done"\nmsgstr "100 % fertig"\n\n'
        '#, fuzzy\nmsgid "A new label"\nmsgstr "Eine neue Beschriftung"\n'), encoding="utf-8")
    assert set(i18n.missing("de", web)) == {"A new label"}              # fuzzy: not a translation
    bad = i18n.placeholder_mismatches("de", web / "locale")
    assert len(bad) == 3 and all(any(k in b for b in bad) for k in ("hit", "of", "Done")), bad
    _, problems = i18n.merged_catalog("de", web / "locale")
    assert len(problems) == 1 and "'Log out'" in problems[0], problems
    t = i18n.load_translations("de", web / "locale")
    assert t.gettext("Log out") == "Abmelden"                          # the first file by name wins
    assert t.gettext("A new label") == "A new label"
    assert t.ngettext("%(num)d hit", "%(num)d hits", 1) == "%(num)d Treffer"


def test_a_broken_catalogue_is_left_out_not_fatal(tmp_path):
    (tmp_path / "de").mkdir()
    shutil.copy(WEB / "locale/de/base.po", tmp_path / "de/base.po")
    for bad in (b"this is not a catalogue\n", PO_HEAD.encode() + b'msgid "x"\nmsgstr "\xff"\n'):
        (tmp_path / "de/zz.po").write_bytes(bad)
        t = i18n.load_translations("de", tmp_path)
        assert t.gettext("Log in") == "Anmelden"
        with pytest.raises(Exception):
            i18n.merged_catalog("de", tmp_path, strict=True)


_PO_LINE = re.compile(r'(?:(?:msgctxt|msgid|msgid_plural|msgstr(?:\[[0-9]\])?) )?"(?:[^"\\]|\\.)*"\Z')


def test_catalogues_are_well_formed():
    """babel's reader forgives an unterminated string (it drops a
    character): every line of every catalogue is a comment, blank, or a
    keyword with one whole quoted string."""
    for po in sorted((WEB / "locale").glob("*/*.po")):
        for n, line in enumerate(po.read_text(encoding="utf-8").splitlines(), 1):
            assert not line.strip() or line.startswith("#") or _PO_LINE.match(line), f"{po.name}:{n}: {line}"
    assert not _PO_LINE.match('msgstr "unterminated') and not _PO_LINE.match('msgstr "a" "b')


def test_missing_command():
    r = subprocess.run([sys.executable, "-m", "mailtresor.web.i18n", "--missing", "de"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "mailtresor.web.i18n", "--missing", "xx"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown language 'xx'" in r.stderr and "Traceback" not in r.stderr


def test_reasons_are_translated_when_known_and_always_escaped():
    de = i18n.load_translations("de")
    assert i18n.translate_reason(de, "no such message") == "Diese Nachricht gibt es nicht."
    assert i18n.translate_reason(de, "too many failed logins; try again in 42 s") == \
        "Zu viele fehlgeschlagene Anmeldungen; versuchen Sie es in 42 s erneut."
    assert i18n.translate_reason(de, "something new") == "something new"     # unknown: English
    assert i18n.translate_reason(de, "") == ""                               # not the catalogue's header
    assert i18n.translate_reason(de, "100% <b>") == "100% <b>"               # never %-formatted

    from mailtresor.web.site import Web
    web = Web(SimpleNamespace())
    for lang in ("en", "de"):
        page = web.page("error.html", None, lang=lang, status=400,
                        reason='bad query: "<img src=x onerror=alert(1)>" 100%').decode()
        assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
        assert f'<html lang="{lang}">' in page
    # _() escapes too: a msgid is text, and _(variable) cannot inject markup.
    tpl = web.env.from_string('{{ _(v) }}|{{ _("%(x)s", x=v) }}')
    assert tpl.render(v="<b>x</b>", mt_translations=de) == "&lt;b&gt;x&lt;/b&gt;|&lt;b&gt;x&lt;/b&gt;"
    # A '%' in a string without values does not break the page; '%%' is '%' as in jinja2's newstyle.
    tpl = web.env.from_string('{{ _(v) }}|{{ _("100%% %(x)s", x=1) }}|{{ _("50%%") }}|{{ gettext("Log in") }}|'
                              '{{ ngettext("%(num)d hit", "%(num)d hits", 2) }}|{{ pgettext("c", "x %(a)s", a="<") }}')
    assert tpl.render(v="100% <i>", mt_translations=de) == "100% &lt;i&gt;|100% 1|50%|Anmelden|2 hits|x &lt;"
    assert web.env.from_string('{% trans %}Log in{% endtrans %}').render(mt_translations=de) == "Anmelden"


def test_concurrent_renders_do_not_share_a_language():
    """Two languages rendered interleaved (a generator each, step by
    step): each keeps its own."""
    from mailtresor.web.site import Web
    web = Web(SimpleNamespace())
    t = web.env.get_template("login.html")
    import itertools
    gens = {lang: t.generate(who=None, lang=lang, here="/login", csrf=None, login_csrf="x", next="/search",
                             mt_translations=web.translations[lang]) for lang in ("de", "en")}
    parts = {lang: [] for lang in gens}
    for chunks in itertools.zip_longest(*gens.values(), fillvalue=""):
        for lang, c in zip(gens, chunks):
            parts[lang].append(c)
    assert "Anmelden" in "".join(parts["de"]) and "Log in" not in "".join(parts["de"])
    assert "Log in" in "".join(parts["en"]) and "Anmelden" not in "".join(parts["en"])


# --- a real daemon -----------------------------------------------------------------------------

chromium = pytest.mark.skipif(not shutil.which("chromedriver"),
                              reason="chromium-driver is not installed (make deps)")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mailtresor.access.auth import open_databases
    from mailtresor.keys.client import control_fetcher
    from tests.harness.stack import Stack
    from tests.harness.web import api_login, wait_archived
    from tests.test_api import mail

    d = tmp_path_factory.mktemp("web-i18n")
    stack = Stack(d, {"archive": {"enabled": True}, "api": {"timeout": 20},
                      "access": {"session_idle": 3600}}, milter=False)
    stack.start_control()
    users, _tokens = open_databases(stack.cfg, control_fetcher(stack.cfg))
    users.add("acme", "alice", PW, {"user"}, ["alice@acme.example"])
    stack.start_daemon()
    with stack.smtp() as s:
        s.sendmail("bob@acme.example", ["alice@acme.example"],
                   mail("bob@acme.example", "alice@acme.example", "for alice", attachment=b"\x00\x01payload"))
    c = api_login(stack, "acme", "alice", PW)
    got = wait_archived(c, 1, stack)
    aid = got["results"][0]["id"]
    c.close()
    yield SimpleNamespace(stack=stack, aid=aid, base=f"https://127.0.0.1:{stack.api_port}")
    stack.close()


def get(world, path, headers=None):
    c = http.client.HTTPSConnection("127.0.0.1", world.stack.api_port, context=world.stack.client_context(),
                                    timeout=10)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r, r.read().decode("utf-8", "replace")
    finally:
        c.close()


def test_headers_and_html_lang_follow_the_choice(world):
    for headers, lang in (({}, "en"), ({"Accept-Language": "de-AT,de;q=0.9"}, "de"),
                          ({"Accept-Language": "de-DE", "Cookie": "mt_lang=en"}, "en"),
                          ({"Accept-Language": "en", "Cookie": "mt_lang=de"}, "de"),
                          ({"Accept-Language": "de;q=abc"}, "en"),
                          ({"Accept-Language": "de," + "x" * 10_000}, "en")):
        r, body = get(world, "/login", headers)
        assert r.status == 200, (headers, r.status)
        assert r.getheader("Content-Language") == lang
        assert r.getheader("Vary") == "Accept-Language, Cookie"
        assert f'<html lang="{lang}">' in body
        assert ("Anmelden" in body) == (lang == "de") and ("Log in" in body) == (lang == "en")
    # An error page too, its reason translated.
    r, body = get(world, "/no/such/page", {"Accept-Language": "de"})
    assert r.status == 404 and r.getheader("Content-Language") == "de"
    assert "Nicht gefunden" in body and "Diese Seite gibt es nicht." in body


def test_language_switch_sets_the_cookie_and_goes_back_only_locally(world):
    r, _ = get(world, "/language?set=de&next=" + urllib.parse.quote("/message/abc?view=text"))
    assert r.status == 303 and r.getheader("Location") == "/message/abc?view=text"
    cookie = r.getheader("Set-Cookie")
    attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
    assert cookie.startswith("mt_lang=de;") and {"secure", "httponly", "path", "max-age", "samesite"} <= attrs
    assert "Path=/;" in cookie + ";" and "SameSite=lax" in cookie.replace("Lax", "lax") \
        and f"Max-Age={365 * 86400}" in cookie
    for evil in ("//evil.example", "https://evil.example", "/\\evil.example", "\\\\evil.example",
                 "/\t/evil.example", " //evil.example", "http:/evil.example", "javascript:alert(1)", ""):
        r, _ = get(world, "/language?set=en&next=" + urllib.parse.quote(evil, safe=""))
        assert r.status == 303 and r.getheader("Location") == "/search", evil
    for bad in ("fr", "", "de-DE", "EN", "de%0d%0aX-Evil:%201"):
        r, body = get(world, f"/language?set={bad}&next=/search", {"Accept-Language": "de"})
        assert r.status == 400 and r.getheader("Set-Cookie") is None, bad
        assert "Unbekannte Sprache." in body and "Traceback" not in body
    c = http.client.HTTPSConnection("127.0.0.1", world.stack.api_port, context=world.stack.client_context(),
                                    timeout=10)
    c.request("POST", "/language?set=de", body="", headers={"Content-Type": "application/x-www-form-urlencoded"})
    r = c.getresponse()
    r.read()
    assert r.status == 405 and r.getheader("Set-Cookie") is None
    c.close()


@pytest.fixture
def browser_de(world, tmp_path):
    from tests.harness.browser import Browser
    b = Browser(world.base, tmp_path, lang="de-DE")
    yield b
    b.close()


def lang_of(b) -> str:
    return b.driver.find_element("tag name", "html").get_attribute("lang")


@chromium
def test_a_german_browser_gets_german_pages(world, browser_de):
    b = browser_de
    found = []
    b.get("/")
    b.wait_path("/login")
    assert lang_of(b) == "de"
    assert b.find("label[for=username]").text == "Benutzername"
    assert b.find("label[for=password]").text == "Passwort"
    assert b.find("#login-submit").text == "Anmelden"
    assert b.find("#lang-de").get_attribute("aria-current") == "true"
    found += b.axe("login (de)")
    b.screenshot("login-de")
    b.login("alice", "wrong-password", "acme")
    assert b.find("#login-error").text == "Benutzername, Passwort oder Code ist falsch."
    found += b.axe("login error (de)")
    b.login("alice", PW, "acme")
    b.wait_path("/search")
    assert lang_of(b) == "de"
    assert b.find("#nav-search").text == "Suche" and b.find("#logout").text == "Abmelden"
    b.find("#q").send_keys("alice\n")
    b.find("#results")
    assert b.find("#hit-count").text == "1"
    assert {"Jahr", "Monat", "Absenderdomain"} <= {e.text for e in b.all(".facets h2")}   # site.py's labels
    found += b.axe("search (de)")
    b.screenshot("search-de")
    b.find("#results td.subject a").click()
    b.wait_path("/message/")
    assert b.find("#download-eml").text == "Original herunterladen (.eml)"
    assert b.find("#att-h").text == "Anhänge"
    assert "Von" in [e.text for e in b.all("dl.headers dt")]
    assert b.find("#back").text == "Zurück zur Suche"
    found += b.axe("message (de)")
    b.screenshot("message-de")
    b.get("/message/0000000000000000")
    assert b.find("#error-title").text == "Nicht gefunden"
    assert b.find("#error-reason").text == "Diese Nachricht gibt es nicht."
    found += b.axe("not found (de)")
    assert not found, found


@chromium
def test_the_switch_keeps_the_page_and_sticks(world, browser_de):
    b = browser_de
    target = f"/message/{world.aid}?view=text"
    b.get(target)
    b.wait_path("/login")
    # On the login page (with its next), before logging in: to English and back.
    b.find("#lang-en").click()
    b.wait_path("/login?next=")
    assert lang_of(b) == "en" and b.find("#login-submit").text == "Log in"
    assert b.find("#lang-en").get_attribute("aria-current") == "true"
    b.login("alice", PW, "acme")
    b.wait_path(target)                                     # the login's next survived the switch
    assert lang_of(b) == "en" and b.find("#download-eml").text == "Download original (.eml)"
    # Sticks: the browser still asks for German, the cookie says English.
    b.get("/search")
    assert lang_of(b) == "en" and b.find("#nav-search").text == "Search"
    cookie = b.driver.get_cookie("mt_lang")
    assert cookie["value"] == "en" and cookie["secure"] and cookie["httpOnly"] and cookie["path"] == "/"
    assert cookie["sameSite"] == "Lax" and cookie["expiry"] > time.time() + 300 * 86400
    # With the keyboard alone: Tab to "Deutsch", Enter; the same page, German.
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    b.get(target)
    b.find("#download-eml")
    de = b.find("#lang-de")
    for _ in range(15):
        ActionChains(b.driver).send_keys(Keys.TAB).perform()
        if b.driver.switch_to.active_element == de:
            break
    else:
        raise AssertionError("the language switch cannot be reached with Tab")
    ActionChains(b.driver).send_keys(Keys.ENTER).perform()
    b.wait_path(target)
    assert lang_of(b) == "de"
    assert b.find("#download-eml").text == "Original herunterladen (.eml)"
    assert b.path() == target
    b.get("/search")
    assert lang_of(b) == "de"


@chromium
def test_the_switchs_next_cannot_leave_the_site(world, browser_de):
    b = browser_de
    for evil in ("//evil.example/", "https://evil.example/", "/\\evil.example/", "/%2F/evil.example/"):
        b.get("/language?set=en&next=" + urllib.parse.quote(evil, safe=""))
        # Still on the appliance (a local path, perhaps one that is not there).
        assert urllib.parse.urlsplit(b.driver.current_url).netloc == urllib.parse.urlsplit(world.base).netloc, \
            (evil, b.driver.current_url)
    assert not any("evil.example" in u for u in b.requested_urls() if not u.startswith(world.base))
