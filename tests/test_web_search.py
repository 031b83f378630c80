"""The web UI's search page in real headless Chromium (tests/harness/browser.py)
against a real daemon (tests/harness/stack.py) with 37 messages sent over
SMTP: the date fields, the To column, the has-attachment facet, paging
forward and back (with the script: without page loads, through the
history; without it: plain links), the bounded back= stack, row selection
and the export form, axe and the phone width.  The pure helpers
(narrow, date_term, back_stack) and the German catalogue's completeness
are checked without a browser."""

from __future__ import annotations

import datetime
import html
import http.client
import re
import time
import urllib.parse
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailtresor.access.auth import open_databases
from mailtresor.archive.index import parse_query
from mailtresor.keys.client import control_fetcher
from mailtresor.web import reading

from tests.harness.stack import Stack
from tests.harness.web import api_login as web_api_login, wait_archived
from tests.test_api import Client

chromium = pytest.mark.skipif(not __import__("shutil").which("chromedriver"),
                              reason="chromium-driver is not installed (make deps)")

PW = {"alice": "alice-password-1", "aud": "aud-password-1"}
N = 36                                  # alice's messages: 2023-01-15 + 20 days each, ~2 years
FIRST = datetime.datetime(2023, 1, 15, 9, 0, tzinfo=datetime.timezone.utc)
MULTI_TO = ["alice@acme.example", "bob@acme.example", "carol@acme.example", "dave@acme.example"]


def when(i: int) -> datetime.datetime:
    return FIRST + datetime.timedelta(days=20 * i)


def message(i: int) -> bytes:
    m = EmailMessage()
    m["From"] = f"sender{i % 4}@{'acme' if i % 2 else 'partner'}.example"
    m["To"] = ", ".join(MULTI_TO) if i == 7 else "alice@acme.example"
    m["Subject"] = f"report {i:02d}"
    m["Message-ID"] = f"<report.{i}@test>"
    m["Date"] = when(i).strftime("%a, %d %b %Y %H:%M:%S +0000")
    m.set_content(f"The body of report {i}.\n")
    if i % 3 == 0:
        m.add_attachment(b"\x00\x01" * 50, maintype="application", subtype="octet-stream", filename=f"r{i}.bin")
    return m.as_bytes()


def has_attachment(i: int) -> bool:
    return i % 3 == 0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("websearch")
    stack = Stack(d, {"archive": {"enabled": True}, "api": {"timeout": 20},
                      "access": {"session_idle": 3600}}, milter=False)
    stack.start_control()
    users, _tokens = open_databases(stack.cfg, control_fetcher(stack.cfg))
    users.add("acme", "alice", PW["alice"], {"user"}, ["alice@acme.example"])
    users.add("acme", "aud", PW["aud"], {"auditor"}, [])
    stack.start_daemon()
    with stack.smtp() as s:             # one connection for all of them
        for i in range(N):
            s.sendmail(f"sender{i % 4}@example.net", ["alice@acme.example"], message(i))
        other = EmailMessage()
        other["From"], other["To"], other["Subject"] = "bob@acme.example", "victim@acme.example", "not alice's"
        other["Date"] = "Fri, 01 Mar 2024 10:00:00 +0000"
        other.set_content("x\n")
        s.sendmail("bob@acme.example", ["victim@acme.example"], other.as_bytes())
    alice = _api_login(stack, "alice")
    got = wait_archived(alice, N, stack, limit=1)
    yield type("World", (), {"stack": stack, "alice": alice, "base": f"https://127.0.0.1:{stack.api_port}"})
    alice.close()
    stack.close()


def _api_login(stack, name) -> Client:
    return web_api_login(stack, "acme", name, PW[name])


def api_total(world, query: str) -> int:
    r = world.alice.request("GET", "/api/v1/search?" + urllib.parse.urlencode({"q": query, "limit": 1}))
    assert r.status == 200, r.data
    return r.json()["total"]


class Page:
    """A page fetched over plain HTTP with alice's session (no script)."""

    def __init__(self, world):
        self.world = world
        self.conn = http.client.HTTPSConnection("127.0.0.1", world.stack.api_port,
                                                context=world.stack.client_context(), timeout=20)

    def get(self, path: str) -> tuple[int, str]:
        self.conn.request("GET", path, headers={"Cookie": f"mt_session={self.world.alice.cookie}"})
        r = self.conn.getresponse()
        body = r.read().decode("utf-8")
        assert "Traceback" not in body
        self.headers = dict(r.getheaders())
        return r.status, body

    @staticmethod
    def link(body: str, ident: str) -> str | None:
        m = re.search(rf'<a href="([^"]*)" id="{ident}"', body)
        return html.unescape(m.group(1)) if m else None

    @staticmethod
    def subjects(body: str) -> list[str]:
        return re.findall(r'<td class="subject"><a href="/message/[0-9a-f]+">([^<]*)</a>', body)

    def close(self):
        self.conn.close()


def login(b, next_path="/search"):
    b.get(next_path)
    b.wait_path("/login")
    b.login("alice", PW["alice"], "acme")
    b.wait_path(next_path.split("?")[0])


def rows(b) -> list[str]:
    # In one script: the rows may be swapped out between two WebDriver calls.
    return b.driver.execute_script(
        "return [...document.querySelectorAll('#results td.subject a')].map(a => a.textContent)")


def set_dates(b, start: str, end: str):
    # <input type="date"> takes keys in the browser's locale order; its value is ISO.
    b.driver.execute_script("document.getElementById('date-from').value = arguments[0];"
                            "document.getElementById('date-to').value = arguments[1];", start, end)


# --- pure helpers ------------------------------------------------------------------

@pytest.mark.parametrize("start,end,term", [
    ("2023-06-01", "2023-12-31", "date:2023-06-01..2023-12-31"),
    ("2023-06-01", "", "date:2023-06-01.."),
    ("", "2023-06-01", "date:..2023-06-01"),
    ("", "", None),
    ("2024-02-29", "2024-02-29", "date:2024-02-29..2024-02-29"),
])
def test_date_term(start, end, term):
    assert reading.date_term(start, end) == (term, None)
    if term:
        parse_query(term)           # the core's language takes it


@pytest.mark.parametrize("start,end,words", [
    ("2023-02-30", "", "start date 2023-02-30 is not a date"),
    ("", "31.12.2023", "end date 31.12.2023 is not a date"),
    ("2023-1-5", "", "not a date"),
    ("2024-01-01", "2023-01-01", "before the start date"),
    ("2023-06-01 OR x", "", "not a date"),
])
def test_date_term_errors(start, end, words):
    term, (msg, args) = reading.date_term(start, end)
    assert term is None and words in msg % args


@pytest.mark.parametrize("query,term,means", [
    ("", "has:attachment", "has:attachment"),
    ("invoice", "date:2024..", "invoice date:2024.."),
    ("a OR b", "has:attachment", "(a OR b) has:attachment"),
    ("NOT a", "has:attachment", "(NOT a) has:attachment"),
    ('"x OR y"', "date:2024..", '"x OR y" date:2024..'),
    ("invoice", None, "invoice"),
])
def test_narrow(query, term, means):
    assert reading.narrow(query, term) == means
    parse_query(reading.narrow(query, term))


def test_narrow_keeps_an_or_query_whole():
    """Without the parentheses, "a OR b" and a term would be a OR (b AND term)."""
    q = str(parse_query(reading.narrow("invoice OR lunch", "has:attachment")))
    assert q.endswith("FILTER VALUE_RANGE 4 1 1))"), q


def test_back_stack_is_bounded_and_keeps_only_cursor_shapes():
    good = ["", "A" * 54, "b_-9" * 10]
    assert reading.back_stack(good) == good
    assert reading.back_stack(["", "x y", "<script>", "A" * 101, "B" * 54]) == ["", "B" * 54]
    many = [f"c{i:03d}" for i in range(50)]
    assert reading.back_stack(many) == many[-reading.MAX_BACK:]     # the oldest are dropped


# --- over plain HTTP (no script) -------------------------------------------------------

def test_paging_without_script_by_plain_links(world):
    p = Page(world)
    try:
        status, body = p.get("/search?q=&limit=10")
        assert status == 200
        pages = [p.subjects(body)]
        assert len(pages[0]) == 10 and p.link(body, "prev-page") is None
        for _ in range(3):
            nxt = p.link(body, "next-page")
            assert nxt, body[-2000:]
            status, body = p.get(nxt)
            assert status == 200
            pages.append(p.subjects(body))
        assert p.link(body, "next-page") is None                # 36 = 10 + 10 + 10 + 6
        assert [len(x) for x in pages] == [10, 10, 10, 6]
        seen = [s for page in pages for s in page]
        assert sorted(seen) == sorted(f"report {i:02d}" for i in range(N))     # each once
        assert seen == [f"report {i:02d}" for i in reversed(range(N))]          # newest first
        # And back, page by page, to the first (which has no "previous").
        for want in reversed(pages[:-1]):
            prev = p.link(body, "prev-page")
            assert prev, body[-2000:]
            status, body = p.get(prev)
            assert status == 200 and p.subjects(body) == want
        assert p.link(body, "prev-page") is None and p.link(body, "first-page") is None
        # The result section alone, for the script: the same rows, no page around them.
        status, body = p.get(p.link(p.get("/search?q=&limit=10")[1], "next-page") + "&part=results")
        assert status == 200
        assert "<html" not in body and 'id="results-part"' in body and p.subjects(body) == pages[1]
        assert "default-src 'self'" in {k.lower(): v for k, v in p.headers.items()}["content-security-policy"]
    finally:
        p.close()


def test_back_stack_in_links_is_bounded_and_tampering_is_refused(world):
    p = Page(world)
    try:
        _, body = p.get("/search?q=&limit=1")
        nxt = p.link(body, "next-page")
        cursor = urllib.parse.parse_qs(urllib.parse.urlsplit(nxt).query)["cursor"][0]
        # 30 earlier cursors in the URL: the next link carries only the newest MAX_BACK.
        stack = "".join(f"&back={cursor}" for _ in range(30))
        status, body = p.get(f"/search?q=&limit=1&page=31&cursor={cursor}{stack}")
        assert status == 200
        nxt = p.link(body, "next-page")
        assert len(urllib.parse.parse_qs(urllib.parse.urlsplit(nxt).query)["back"]) == reading.MAX_BACK
        # A back= cursor edited by hand: "previous" leads to the core's refusal, not a 500.
        forged = cursor[:30] + ("B" if cursor[30] != "B" else "C") + cursor[31:]
        status, body = p.get(f"/search?q=&limit=1&page=3&cursor={cursor}&back=&back={forged}")
        prev = p.link(body, "prev-page")
        status, body = p.get(prev)
        assert status == 400 and 'id="search-error"' in body and "bad cursor" in body
        # A cursor made for another query is refused as well (the core binds it to the query).
        status, body = p.get(f"/search?q=report&limit=1&cursor={cursor}")
        assert status == 400 and "bad cursor" in body
        # Invalid dates: a clear error on the page (400), no search, no 500.
        for qs, words in (("from=2023-02-30", "is not a date"), ("to=yesterday", "is not a date"),
                          ("from=2024-01-01&to=2023-01-01", "before the start date")):
            status, body = p.get(f"/search?q=&{qs}")
            assert status == 400 and words in html.unescape(body), body[-1500:]
            assert 'id="results"' not in body
        # The part alone with an error is an error too (the script then loads the whole page).
        status, _ = p.get("/search?q=&from=2023-02-30&part=results")
        assert status == 400
    finally:
        p.close()


def test_has_attachment_facet_links_give_the_counts_they_show(world):
    p = Page(world)
    try:
        _, body = p.get("/search?q=report")
        links = {html.unescape(t): (html.unescape(h), int(n)) for h, n, t in re.findall(
            r'<a href="([^"]*)" class="facet" data-count="(\d+)">([^<]*)</a>', body)}
        want = sum(has_attachment(i) for i in range(N))
        href, n = links["with attachments"]
        assert n == want and "has:attachment" in urllib.parse.unquote_plus(href)
        _, got = p.get(href)
        assert re.search(r'<span id="hit-count">(\d+)</span>', got).group(1) == str(want)
        assert api_total(world, "report has:attachment") == want
        href, n = links["without attachments"]
        assert n == N - want and "-has:attachment" in urllib.parse.unquote_plus(href)
        _, got = p.get(href)
        assert re.search(r'<span id="hit-count">(\d+)</span>', got).group(1) == str(N - want)
        assert "clip.svg" not in got.split('id="results"', 1)[1].split("</table>")[0]
    finally:
        p.close()


# --- in the browser ---------------------------------------------------------------------

@chromium
def test_date_range_narrows_and_stays_across_paging_sorting_and_facets(world, browser):
    b = browser
    login(b, "/search?q=report&limit=5")
    assert b.find("#hit-count").text == str(N)
    set_dates(b, "2023-06-01", "2024-05-31")
    b.find("#search-submit").click()
    b.wait_url_has("from=2023-06-01")          # /search? was the path before the submit too
    want = sum(1 for i in range(N) if datetime.datetime(2023, 6, 1, tzinfo=datetime.timezone.utc)
               <= when(i) < datetime.datetime(2024, 6, 1, tzinfo=datetime.timezone.utc))
    assert 0 < want < N
    assert b.find("#hit-count").text == str(want)
    assert api_total(world, "report date:2023-06-01..2024-05-31") == want
    dates = [e.text[:10] for e in b.all("#results td.date")]
    assert dates and all("2023-06-01" <= d <= "2024-05-31" for d in dates), dates
    # Facet links keep the dates.
    for a in b.all("a.facet"):
        qs = urllib.parse.parse_qs(urllib.parse.urlsplit(a.get_attribute("href")).query)
        assert qs["from"] == ["2023-06-01"] and qs["to"] == ["2024-05-31"]
    # Paging keeps them.
    b.find("#next-page").click()
    b.find("#prev-page")
    b.get(b.path())                     # the page as loaded from its URL
    assert b.find("#date-from").get_attribute("value") == "2023-06-01"
    assert b.find("#date-to").get_attribute("value") == "2024-05-31"
    assert b.find("#hit-count").text == str(want)
    # Sorting keeps them (the sort select submits the form).
    from selenium.webdriver.support.ui import Select
    Select(b.find("#order")).select_by_value("date-asc")
    b.wait_url_has("order=date-asc")
    assert b.find("#date-from").get_attribute("value") == "2023-06-01"
    assert b.find("#hit-count").text == str(want)
    assert b.all("#results td.date")[0].text[:10] >= "2023-06-01"
    # One open end.
    b.get("/search?q=&from=2024-06-01")
    assert b.find("#hit-count").text == str(api_total(world, "date:2024-06-01.."))
    # An invalid date typed into the URL: an error on the page.
    b.get("/search?q=&from=2023-02-30")
    assert "not a date" in b.find("#search-error").text


@chromium
def test_to_column_shortens_long_recipient_lists(world, browser):
    b = browser
    login(b, "/search?q=subject:%22report+07%22")
    assert rows(b) == ["report 07"]
    to = b.find("#results td.to")
    assert to.text.replace("\n", " ").startswith("alice@acme.example +3"), to.text
    assert to.get_attribute("title") == ", ".join(MULTI_TO)
    assert "and 3 more" in to.get_attribute("textContent")            # for screen readers
    b.get("/search?q=subject:%22report+08%22")
    assert b.find("#results td.to").text == "alice@acme.example"
    assert [e.text for e in b.all("#results thead th")][:5] == ["Date (UTC)", "From", "To", "Subject", "Size"]


@chromium
def test_paging_with_the_script_replaces_only_the_results(world, browser):
    b = browser
    login(b, "/search?q=&limit=10")
    b.driver.execute_script("window.__noReload = 42;")
    p1 = rows(b)
    b.find("#next-page").click()
    b.wait_path("/search?")

    def wait_rows(old):
        for _ in range(100):
            now = rows(b)
            if now and now != old:
                return now
            time.sleep(0.05)
        raise AssertionError(f"rows did not change from {old}")
    p2 = wait_rows(p1)
    assert "page=2" in b.path() and "part=" not in b.path()
    assert b.driver.switch_to.active_element.get_attribute("id") == "hits"      # focus on the results heading
    assert b.find("#announce").get_attribute("textContent").startswith(f"{N} messages")
    b.find("#next-page").click()
    p3 = wait_rows(p2)
    assert p3 == [f"report {i:02d}" for i in reversed(range(N))][20:30]
    b.find("#prev-page").click()
    assert wait_rows(p3) == p2
    assert "page=2" in b.path()
    # The browser's own back button: the history holds p1, p2, p3, p2.
    b.driver.back()
    assert wait_rows(p2) == p3 and "page=3" in b.path()
    b.driver.back()
    assert wait_rows(p3) == p2
    b.driver.back()
    assert wait_rows(p2) == p1 and "cursor" not in b.path()
    b.driver.forward()
    assert wait_rows(p1) == p2
    assert b.driver.execute_script("return window.__noReload") == 42          # never a full page load
    # Three pages by their result part, four steps of the history by the whole answer.
    parts = [u for u in b.requested_urls() if "part=results" in u]
    answers = [u for u in b.requested_urls() if "part=answer" in u]
    assert len(parts) >= 3 and len(answers) >= 4, (parts, answers)
    b.logs()
    assert not [e for e in b.console if e["level"] == "SEVERE"], b.console


@chromium
def test_a_new_search_with_the_script_swaps_the_answer_in_place(world, browser):
    """Enter in the box: the answer (hits, rows, facets) is fetched and
    swapped in without a page load, the URL is the search's own, the focus
    stays in the box; back returns to the earlier search with its query in
    the box; a refused query shows its reason in place; an expired session
    loads the page itself (login, then back to that search)."""
    from selenium.webdriver.common.keys import Keys
    b = browser
    login(b, "/search?q=&limit=10")
    b.driver.execute_script("window.__noReload = 42;"
                            "window.__swaps = 0; document.addEventListener('mt:results', () => window.__swaps++);")

    def enter(text, swaps):
        box = b.find("#q")
        box.send_keys(Keys.CONTROL, "a", Keys.DELETE)
        box.send_keys(text + Keys.ENTER)
        for _ in range(200):
            if b.driver.execute_script("return window.__swaps") >= swaps:
                return
            time.sleep(0.05)
        raise AssertionError(f"no answer for {text!r}")
    enter('subject:"report 07"', 1)
    assert rows(b) == ["report 07"] and b.find("#hit-count").text == "1"
    assert "q=subject%3A%22report+07%22" in b.path() and "part=" not in b.path()
    assert b.driver.switch_to.active_element.get_attribute("id") == "q"
    assert b.find("#announce").get_attribute("textContent").startswith("1 message")
    facets = b.driver.execute_script("return [...document.querySelectorAll('.facets a.facet')].map(a => a.href)")
    assert facets and all("report+07" in f for f in facets), facets       # the new search's facets
    enter("subject:(", 2)
    assert b.find("#search-error").text.startswith("bad query"), b.find("#search-error").text
    assert not rows(b)
    b.driver.back()                                    # the search before the refused one
    for _ in range(100):
        if rows(b) == ["report 07"]:
            break
        time.sleep(0.05)
    assert rows(b) == ["report 07"] and b.find("#q").get_attribute("value") == 'subject:"report 07"'
    assert not b.all("#search-error")
    assert b.driver.execute_script("return window.__noReload") == 42          # never a full page load
    b.driver.delete_cookie("mt_session")
    box = b.find("#q")
    box.send_keys(Keys.CONTROL, "a", Keys.DELETE)
    box.send_keys('subject:"report 08"' + Keys.ENTER)
    b.wait_path("/login")
    back_to = urllib.parse.parse_qs(urllib.parse.urlsplit(b.driver.current_url).query)["next"][0]
    assert "report+08" in back_to and "part=" not in back_to
    b.login("alice", PW["alice"], "acme")
    b.wait_path("/search?")
    assert rows(b) == ["report 08"]
    b.logs()
    # The browser logs the refused query's 400 and the refused redirect; no script error.
    assert not [e for e in b.console if e["level"] == "SEVERE"
                and not (e["source"] == "network"
                         and ("part=answer" in e["message"] or "part%3Danswer" in e["message"]))], b.console


@chromium
def test_paging_with_the_script_after_the_session_expired_goes_to_login_and_back(world, browser):
    """The fetch of the result section does not follow the redirect to the
    login: the script loads the page itself, which goes to the login with
    the page (not its part=results) as where to come back to."""
    b = browser
    login(b, "/search?q=&limit=10")
    nxt = b.find("#next-page").get_attribute("href")
    b.driver.delete_cookie("mt_session")
    b.find("#next-page").click()
    b.wait_path("/login")
    back_to = urllib.parse.parse_qs(urllib.parse.urlsplit(b.driver.current_url).query)["next"][0]
    assert back_to == nxt[len(world.base):] and "part=" not in back_to
    b.login("alice", PW["alice"], "acme")
    b.wait_path("/search?")
    assert "page=2" in b.path() and len(rows(b)) == 10


@chromium
def test_selection_and_export_form_post_the_expected_fields(world, browser):
    b = browser
    login(b, "/search?q=report&limit=10&from=2023-01-01&to=2023-12-31")
    aids = [e.get_attribute("value") for e in b.all("#results input[name='id']")]
    assert len(aids) == 10 and all(re.fullmatch(r"[0-9a-f]{40}", a) for a in aids)
    box = b.find("#results input[name='id']")
    label = b.find(f"label[for='{box.get_attribute('id')}']")
    assert label.get_attribute("textContent").startswith("Select")
    form = b.find("form#export")
    assert form.get_attribute("method") == "post" and form.get_attribute("action").endswith("/exports")
    assert b.find("#export input[name='csrf']").get_attribute("value")
    all_button = b.find("#export-all")
    assert all_button.get_attribute("name") == "q"
    assert all_button.get_attribute("value") == "report date:2023-01-01..2023-12-31"
    total = b.find("#hit-count").text
    assert f"Export all {total} results" in all_button.text
    # Nothing ticked: "Export selected" says so and posts nothing.
    b.find("#export-selected").click()
    assert b.find("#export-none").is_displayed()
    assert b.path().startswith("/search")
    # Two ticked, zip: the POST to /exports carries csrf, format and the two ids.
    boxes = b.all("#results input[name='id']")
    boxes[0].click()
    boxes[2].click()
    from selenium.webdriver.support.ui import Select
    Select(b.find("#export-format")).select_by_value("zip")
    b.logs()
    b.find("#export-selected").click()
    b.wait_path("/exports")
    posted = last_post(b)
    assert posted["format"] == ["zip"] and sorted(posted["id"]) == sorted([aids[0], aids[2]])
    assert posted["csrf"] and "q" not in posted
    # "Export all": the query with the dates folded in, and no ids even with rows ticked.
    b.driver.back()
    b.find("#export-all")
    b.driver.execute_script("document.querySelectorAll('#results input[name=id]')[1].checked = true;")
    fmt = b.find("#export-format").get_attribute("value")      # as the browser restored it
    b.logs()
    b.find("#export-all").click()
    b.wait_path("/exports")
    posted = last_post(b)
    assert posted["q"] == ["report date:2023-01-01..2023-12-31"] and "id" not in posted
    assert posted["format"] == [fmt] and posted["csrf"]


def last_post(b) -> dict:
    for _ in range(50):
        b.logs()
        posts = [m["params"]["request"] for m in b.network if m["method"] == "Network.requestWillBeSent"
                 and m["params"]["request"]["method"] == "POST"
                 and m["params"]["request"]["url"].endswith("/exports")]
        if posts and posts[-1].get("postData") is not None:
            data = posts[-1]["postData"]
            b.network.clear()
            return urllib.parse.parse_qs(data, keep_blank_values=True)
        time.sleep(0.1)
    raise AssertionError("no POST to /exports seen")


@chromium
def test_axe_and_screenshots_with_results_and_dates(world, browser):
    b = browser
    login(b, "/search?q=report&from=2023-03-01&to=2024-10-31&limit=10")
    b.find("#results")
    found = b.axe("search with dates")
    b.screenshot("search-dates")
    b.find("#next-page").click()
    for _ in range(100):
        if b.all("#prev-page"):
            break
        time.sleep(0.05)
    found += b.axe("search page 2 (swapped in)")
    b.screenshot("search-page2")
    b.get("/search?q=&from=2023-02-30")
    b.find("#search-error")
    found += b.axe("search date error")
    assert not found, found


@chromium
def test_phone_width_with_dates_and_selection(world, tmp_path):
    from tests.harness.browser import Browser
    b = Browser(world.base, tmp_path, width=390, height=844)
    try:
        login(b, "/search?q=report&from=2023-03-01&to=2024-10-31")
        b.find("#results")
        b.find("#export")
        width = b.driver.execute_script("return document.documentElement.scrollWidth")
        wide = b.driver.execute_script(
            "return [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > 392)"
            ".map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right))")
        assert width <= 400, (width, wide)
        b.screenshot("search-phone-dates")
    finally:
        b.close()


# --- the German catalogue ---------------------------------------------------------------

HERE = Path(reading.__file__).parent


def test_reading_po_translates_every_msgid_of_the_search_and_reading_pages():
    """Every string of search.html, search_results.html and reading.py (the
    N_ marks) has a German translation in locale/de/reading.po."""
    from babel.messages.extract import extract_from_file
    from babel.messages.pofile import read_po
    want = set()
    for name in ("templates/search.html", "templates/search_results.html"):
        for _, msg, _, _ in extract_from_file("jinja2.ext:babel_extract", HERE / name,
                                              options={"extensions": "jinja2.ext.i18n"}):
            want.add(msg if isinstance(msg, str) else tuple(msg))
    for _, msg, _, _ in extract_from_file("python", HERE / "reading.py", keywords={"N_": None}):
        want.add(msg)
    assert len(want) > 40, want
    with open(HERE / "locale/de/reading.po", "rb") as f:
        cat = read_po(f, locale="de")
    missing = []
    for m in want:
        key = m[0] if isinstance(m, tuple) else m
        got = cat.get(key)
        if got is None or not got.string or (isinstance(got.string, tuple) and not all(got.string)) \
                or got.fuzzy:
            missing.append(m)
    assert not missing, missing
    assert cat.plural_forms == "nplurals=2; plural=(n != 1);"
