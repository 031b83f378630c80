"""The web UI's languages (English, German): gettext catalogues and the
choice of language per request.

Strings in templates are `{{ _("...") }}` (jinja2's i18n extension,
newstyle: `_("%(n)s hits", n=x)`, `ngettext(...)`).  Strings that Python
code hands to a template (a label in a table) are marked `N_("...")` where
they are written, so that the extraction finds them, and translated in the
template (`{{ _(label) }}`).  Text that is not a constant of ours -- a
reason from the core or the API, which may quote the user's input -- is
shown with the `reason` filter (`{{ reason|reason }}`): translated if the
catalogue knows it, else as it is, escaped, never formatted.

The catalogues are `locale/<lang>/*.po` beside this module, one file per
part of the UI; every .po of a language is merged into one translations
object, compiled in memory once at start-up (babel's read_po and write_mo:
no build step, no .mo in the tree).  Fuzzy entries are not used.

`python -m mailtresor.web.i18n --missing de` lists the strings the UI uses
that the German catalogue lacks.
"""

from __future__ import annotations

import gettext
import io
import logging
import re
from pathlib import Path

log = logging.getLogger("mailtresor.web")

HERE = Path(__file__).parent
LOCALE = HERE / "locale"
LANGUAGES = ("en", "de")            # what the UI speaks; the first is the default
DEFAULT = LANGUAGES[0]
COOKIE = b"mt_lang"                 # an explicit choice (the language switch)
COOKIE_MAX_AGE = 365 * 86400
MAX_ACCEPT_LANGUAGE = 1024          # characters; real headers are well under 200
MAX_RANGES = 32                     # language ranges looked at in one header


def N_(message: str) -> str:  # noqa: N802 - the gettext convention
    """Mark MESSAGE for translation; translated where it is shown."""
    return message


# --- choosing the language ---------------------------------------------------------------------

_RANGE = re.compile(r"(?:\*|[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*)\Z")
_QVALUE = re.compile(r"[qQ]\s*=\s*(0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)\Z")


def parse_accept_language(header: str | None) -> list[tuple[str, float]]:
    """The language ranges of an Accept-Language header (RFC 9110 12.5.4)
    with their weights, most preferred first (equal weights keep the
    header's order).  Lower-cased.  A range that does not parse (a bad tag,
    `q=abc`, a parameter other than q) is left out; a header longer than
    MAX_ACCEPT_LANGUAGE or with more than MAX_RANGES ranges is ignored as a
    whole ([]).  Pure."""
    if not header or len(header) > MAX_ACCEPT_LANGUAGE:
        return []
    items = header.split(",")
    if len(items) > MAX_RANGES:
        return []
    got = []
    for i, item in enumerate(items):
        tag, *params = (p.strip() for p in item.split(";"))
        if not _RANGE.match(tag):
            continue
        q = 1.0
        if params:
            m = _QVALUE.match(params[0]) if len(params) == 1 else None
            if m is None:
                continue
            q = float(m.group(1))
        got.append((-q, i, tag.lower()))
    return [(tag, -nq) for nq, _, tag in sorted(got)]


def negotiate(header: str | None, available=LANGUAGES) -> str | None:
    """The first of AVAILABLE the header accepts most, or None.  A range
    matches by its primary subtag (de-AT, de-DE -> de); `*` matches any
    available language the header does not name; q=0 means "not this one"."""
    ranges = parse_accept_language(header)
    refused = {tag.split("-")[0] for tag, q in ranges if q == 0}
    named = {tag.split("-")[0] for tag, _ in ranges}
    for tag, q in ranges:
        if q == 0:
            continue
        if tag == "*":
            for lang in available:
                if lang not in named and lang not in refused:
                    return lang
            continue
        primary = tag.split("-")[0]
        if primary in available and primary not in refused:
            return primary
    return None


def choose_language(cookie: str | None, accept_language: str | None) -> str:
    """The language of a page: the switch's cookie if it names one we
    speak, else the Accept-Language header's choice, else DEFAULT.  Pure."""
    if cookie in LANGUAGES:
        return cookie
    return negotiate(accept_language) or DEFAULT


def request_language(request) -> str:
    """choose_language for a twisted.web request."""
    cookie = request.getCookie(COOKIE)
    headers = request.requestHeaders.getRawHeaders(b"accept-language") or []
    header = ",".join(h.decode("latin-1") for h in headers[:4])
    return choose_language(cookie.decode("latin-1") if cookie else None, header)


# --- catalogues -------------------------------------------------------------------------------

def merged_catalog(lang: str, directory: Path = LOCALE, strict: bool = False):
    """(babel Catalog of every locale/<lang>/*.po merged, problems): the
    problems are the files that do not parse and msgids two files
    translate differently (the first file by name wins).  STRICT: a file
    that does not parse raises (the tests); else it is logged and left out
    (the UI then shows those strings in English, rather than not start)."""
    from babel.messages.catalog import Catalog
    from babel.messages.pofile import read_po

    merged = Catalog(locale=lang, fuzzy=False)
    source: dict = {}
    problems = []
    for po in sorted((directory / lang).glob("*.po")):
        try:
            with po.open("rb") as f:
                cat = read_po(f, locale=lang, abort_invalid=True)
        except Exception as e:  # noqa: BLE001 - one bad file must not keep the UI from starting
            if strict:
                raise
            problems.append(f"{po.name}: does not parse: {e}")
            log.error("web: the catalogue %s does not parse (%s); its strings stay in English", po, e)
            continue
        for m in cat:
            if not m.id or m.fuzzy or not (all(m.string) if isinstance(m.string, tuple) else m.string):
                continue
            key = (m.id, m.context)
            if key in source:
                if merged.get(m.id, m.context).string != m.string:
                    problems.append(f"{po.name}: {m.id!r} is translated differently in {source[key]}")
                continue
            source[key] = po.name
            merged.add(m.id, m.string, context=m.context)
    return merged, problems


def load_translations(lang: str, directory: Path = LOCALE) -> gettext.NullTranslations:
    """The translations of LANG, compiled in memory from its catalogues
    (NullTranslations, i.e. the English msgids, if it has none)."""
    from babel.messages.mofile import write_mo

    if not (directory / lang).is_dir():
        return gettext.NullTranslations()
    catalog, problems = merged_catalog(lang, directory)
    for p in problems:
        log.warning("web: catalogue %s: %s", lang, p)
    buf = io.BytesIO()
    write_mo(buf, catalog, use_fuzzy=False)
    buf.seek(0)
    return gettext.GNUTranslations(buf)


def load_all(directory: Path = LOCALE) -> dict[str, gettext.NullTranslations]:
    """Every language's translations (once, at start-up; read-only after)."""
    return {lang: load_translations(lang, directory) for lang in LANGUAGES}


# --- reasons: text from the core and the API ---------------------------------------------------

# The reasons users commonly see on a page from the core and the API
# (site.py marks its own where it writes them), so that the extraction
# finds them and the German catalogue has them.  Any other reason is shown
# in English.
REASONS = (
    N_("no such message"), N_("no such attachment"), N_("no such export"), N_("no such tenant"),
    N_("no such user"), N_("no such token"),
    N_("the session has expired or ended; log in again"),
    N_("the session has ended (the account changed); log in again"),
    N_("wrong user name, password or code"),
    N_("logins are not available yet (the access key is being fetched)"),
    N_("the archive is not enabled on this appliance"),
    N_("administrators do not read mail"), N_("not allowed to read mail"),
    N_("only auditors read the audit trail"), N_("this principal may not read events"),
)
# Reasons with a value in them: (whole-text pattern, msgid with the same
# named groups as placeholders).
REASON_PATTERNS = (
    (re.compile(r"too many failed logins; try again in (?P<seconds>[0-9]{1,9}) s"),
     N_("too many failed logins; try again in %(seconds)s s")),
    (re.compile(r"bad query: (?P<detail>.*)", re.S), N_("bad query: %(detail)s")),
)


def translate_reason(translations: gettext.NullTranslations, text) -> str:
    """TEXT (a reason from the core, the API or site.py) in the language of
    TRANSLATIONS if the catalogue knows it, else TEXT as it is.  Always a
    plain str: the template escapes it (a reason may quote the user's
    input), and it is never %-formatted (it may hold a '%')."""
    text = "" if text is None else str(text)
    if not text:
        return text                 # gettext("") is the catalogue's header
    for rx, msgid in REASON_PATTERNS:
        m = rx.fullmatch(text)
        if m:
            return str(translations.gettext(msgid)) % m.groupdict()
    return str(translations.gettext(text))


# --- what the UI uses, for the tests and --missing ----------------------------------------------

TEMPLATE_KEYWORDS = {"_": None, "gettext": None, "ngettext": (1, 2),
                     "pgettext": ((1, "c"), 2), "npgettext": ((1, "c"), 2, 3)}
PYTHON_KEYWORDS = {"N_": None}


def extract_messages(web_dir: Path = HERE) -> dict:
    """Every msgid the web UI uses: `_()`/`gettext`/`ngettext` in the
    templates (jinja2's babel extractor) and `N_()` in web/*.py.  Maps the
    msgid (a (singular, plural) tuple for plurals) to its places."""
    import jinja2.ext
    from babel.messages.extract import extract

    found: dict = {}
    sources = [(p, jinja2.ext.babel_extract, TEMPLATE_KEYWORDS,
                {"silent": "false", "newstyle_gettext": "true", "trim_blocks": "true", "lstrip_blocks": "true"})
               for p in sorted((web_dir / "templates").glob("*.html"))]
    sources += [(p, "python", PYTHON_KEYWORDS, {}) for p in sorted(web_dir.glob("*.py"))]
    for path, method, keywords, options in sources:
        with path.open("rb") as f:
            for lineno, msgid, _comments, _context in extract(method, f, keywords=keywords, options=options):
                found.setdefault(msgid, []).append(f"{path.relative_to(web_dir)}:{lineno}")
    return found


def missing(lang: str, web_dir: Path = HERE) -> dict:
    """The msgids the UI uses that LANG's merged catalogue does not
    translate (msgid -> places)."""
    catalog, _ = merged_catalog(lang, web_dir / "locale", strict=True)
    out = {}
    for msgid, places in extract_messages(web_dir).items():
        m = catalog.get(msgid)
        if m is None or not (all(m.string) if isinstance(m.string, tuple) else m.string):
            out[msgid] = places
    return out


_PLACEHOLDER = re.compile(r"%(?:\((?P<name>[^)]*)\))?[-#0 +]*[0-9*]*(?:\.[0-9*]+)?(?P<conv>[a-zA-Z%])?")


def placeholders(text: str) -> tuple[frozenset, int]:
    """(named placeholders, count of other % directives) of TEXT, '%%' not
    counted.  A translation must keep its msgid's: jinja formats every
    template string, so a stray '%' breaks the page."""
    names, other = set(), 0
    for m in _PLACEHOLDER.finditer(text):
        if m.group("conv") == "%" and m.group("name") is None:
            continue
        if m.group("name") is not None:
            names.add(m.group("name"))
        else:
            other += 1
    return frozenset(names), other


def placeholder_mismatches(lang: str, directory: Path = LOCALE) -> list[str]:
    """The entries of LANG whose translation has other placeholders than
    its msgid (for plurals: each form's a subset of the msgids', and all
    of them together the same)."""
    catalog, _ = merged_catalog(lang, directory, strict=True)
    bad = []
    for m in catalog:
        if not m.id:
            continue
        if isinstance(m.id, tuple):
            want_names = placeholders(m.id[0])[0] | placeholders(m.id[1])[0]
            got = [placeholders(s) for s in m.string]
            if not all(n <= want_names and o == placeholders(m.id[1])[1] for n, o in got) \
                    or frozenset().union(*(n for n, _ in got)) != want_names:
                bad.append(f"{m.id!r} -> {m.string!r}")
        elif placeholders(m.id) != placeholders(m.string):
            bad.append(f"{m.id!r} -> {m.string!r}")
    return bad


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m mailtresor.web.i18n",
                                 description="Check the web UI's catalogues.")
    ap.add_argument("--missing", metavar="LANG", required=True,
                    help="list the strings the UI uses that LANG's catalogue does not translate")
    args = ap.parse_args(argv)
    if args.missing not in LANGUAGES:
        ap.error(f"unknown language {args.missing!r} (one of {', '.join(LANGUAGES)})")
    gone = missing(args.missing)
    for msgid, places in sorted(gone.items(), key=lambda kv: kv[1][0]):
        print(f"{', '.join(places)}: {msgid!r}")
    bad = placeholder_mismatches(args.missing)
    for b in bad:
        print(f"placeholders differ: {b}")
    return 1 if gone or bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
