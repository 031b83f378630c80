"""Classification: a tenant's rules put tags on a message as it is archived.

Pure functions.  A rule (`[[tenant.classify]]`, docs/lifecycle/tags.md) is
a tag and ONE condition:

- `header = "X-Acme-Classification"` with `equals`, `contains` or `matches`
  (a regular expression), or with none of them (the header is present).
  Header names are case-insensitive; values are compared after unfolding
  and RFC 2047 decoding, case-insensitively, and every occurrence of the
  header counts.  `header = "msip_labels"` (Microsoft Purview sensitivity
  labels) may use `label = "Confidential"`: the name (or GUID) of a label
  that is enabled in the header.  `value_tag = true` tags with the rule's
  tag as a prefix and the normalised value: "class:confidential".
- `sender_domain = [...]`: the domain of a From: address or of the envelope
  sender (MAIL FROM, a trusted journal report's sender).
- `recipient = [addresses or domains]` or `recipient_group = "legal"` (a
  list in `[tenant.groups]`): a To/Cc/Bcc address or an envelope recipient
  (RCPT TO, a trusted journal report's recipients).

`trusted_only = true` makes a rule apply only to mail that came through a
path bound to the tenant (a relay connector with `tenant`, e.g. the
journaling connector) or through the milter: a header set by the
customer's mail flow cannot be believed from a path any sender on the
Internet can reach with the header already in place.

Tags are facts at archive time: rules changed later do not re-tag mail
already archived (docs/lifecycle/tags.md says why).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

TAG_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
MAX_TAG = 64
MAX_PATTERN = 200            # characters of a `matches` expression
MAX_VALUE = 1000             # characters of a header value a rule looks at
MAX_VALUES = 50              # occurrences of one header looked at
MAX_HEAD = 256 * 1024        # bytes of the header block read
MAX_VALUE_TAGS = 10          # tags one value_tag rule may add to a message
MAX_RULES = 200              # rules per tenant
MSIP_HEADER = "msip_labels"
_MSIP_ITEM = re.compile(r"^MSIP_Label_([0-9A-Fa-f-]{36})_([A-Za-z]+)$")
_NORMAL = re.compile(r"[^a-z0-9._-]+")
_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")      # RFC 5322 ftext


# Auditors' case tags (archive/casetags.py) are the tags in this namespace:
# no rule may give one (so a sender cannot make one with a header), and
# principals who read only their own mail never see them.
CASE_PREFIX = "case:"
_TAG_PREFIX = "K"                  # index.PREFIXES["tag"]
_WILDCARD_TAG = re.compile(r"WILDCARD \w+ K(\S+?)[\s)]")


def is_case_tag(tag: str) -> bool:
    return tag.startswith(CASE_PREFIX)


def without_case_tags(tags) -> list[str]:
    return [t for t in tags if not is_case_tag(t)]


def touches_case_tags(query) -> bool:
    """Whether a parsed Xapian query asks for a case tag: a `tag:case:...`
    term, or a `tag:` wildcard that could match one (`tag:c*`).  A user
    who reads only their own mail must not learn that it is under a case."""
    for term in query:
        t = term.decode("utf-8", "replace") if isinstance(term, bytes) else str(term)
        if t.startswith(_TAG_PREFIX + CASE_PREFIX):
            return True
    for stem in _WILDCARD_TAG.findall(str(query) + " "):
        if CASE_PREFIX.startswith(stem) or stem.startswith(CASE_PREFIX):
            return True
    return False


class RuleError(ValueError):
    """A rule cannot be used: `key` is the rule's field, `msg` says why."""

    def __init__(self, key: str, msg: str):
        super().__init__(f"{key}: {msg}")
        self.key, self.msg = key, msg


def valid_tag(tag: object) -> bool:
    return isinstance(tag, str) and bool(TAG_RE.match(tag))


def normalise(value: str, room: int = MAX_TAG) -> str:
    """A header value as part of a tag: lower case, each run of other
    characters than [a-z0-9._-] one "-", at most `room` characters;
    "" if nothing is left."""
    return _NORMAL.sub("-", value.strip().lower()).strip("-.")[:room].strip("-.")


@dataclass(frozen=True)
class Rule:
    """One compiled rule (`compile_rules`)."""
    tag: str
    kind: str                               # "header", "sender_domain", "recipient"
    header: str = ""                        # lower case
    op: str = ""                            # "equals", "contains", "matches", "label", "" (present)
    value: str = ""                         # casefolded for equals/contains/label
    regex: re.Pattern | None = None
    value_tag: bool = False
    addresses: frozenset = frozenset()      # recipient: full addresses, lower case
    domains: frozenset = frozenset()        # sender_domain / recipient: domains, lower case
    trusted_only: bool = False
    name: str = ""                          # "tenant[0].classify[2]" for messages


@dataclass
class Facts:
    """What rules look at, for one message and one tenant."""
    headers: dict[str, list[str]]           # lower-case name -> decoded values
    senders: list[str] = field(default_factory=list)       # From: and envelope sender addresses
    recipients: list[str] = field(default_factory=list)    # header and envelope recipients
    trusted: bool = False                   # came through a path bound to the tenant, or the milter


# --- compiling (at configuration load) ---------------------------------------

def _check_regex(pattern: str, key: str) -> re.Pattern:
    if len(pattern) > MAX_PATTERN:
        raise RuleError(key, f"the expression is longer than {MAX_PATTERN} characters")
    try:
        rx = re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise RuleError(key, f"not a regular expression: {e}") from None
    # Headers come from anyone: an expression that can backtrack
    # exponentially (a repeat inside a repeat, a back reference) would let
    # one crafted header stall the archiver.
    try:
        from re import _parser as sre      # noqa: PLC0415 - the stdlib's own parse of the pattern
        tree = sre.parse(pattern, re.IGNORECASE)
    except Exception:  # noqa: BLE001 - compiled fine above; the check is a bonus
        return rx
    repeats = {sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", None)} - {None}

    def walk(items, inside: bool) -> None:
        for op, av in items:
            if op in repeats:
                if inside:
                    raise RuleError(key, "a repetition inside a repetition can take exponential time "
                                         "on a crafted header; simplify the expression")
                walk(av[2], True)
            elif op in (sre.GROUPREF, getattr(sre, "GROUPREF_EXISTS", None)):
                raise RuleError(key, "back references are not allowed")
            elif op is sre.SUBPATTERN:
                walk(av[-1], inside)
            elif op is sre.BRANCH:
                for b in av[1]:
                    walk(b, inside)
            elif op in (sre.ASSERT, sre.ASSERT_NOT):
                walk(av[1], inside)
    walk(tree, False)
    return rx


def _domain(d: str, key: str) -> str:
    d = d.strip().lower().rstrip(".")
    if not d or "@" in d or " " in d or len(d) > 253:
        raise RuleError(key, f"{d!r} is not a domain")
    return d


def compile_rule(raw, groups: dict[str, tuple[str, ...]], name: str) -> Rule:
    """One rule from its configuration (an object with the fields of
    config.Classify, or a dict with them).  RuleError names the field."""
    get = (lambda k: raw.get(k)) if isinstance(raw, dict) else (lambda k: getattr(raw, k, None))
    tag = get("tag")
    if not valid_tag(tag):
        raise RuleError(f"{name}.tag", f"{tag!r} is not a tag name (1-64 of A-Z a-z 0-9 . _ : -)")
    if is_case_tag(tag) or (get("value_tag") and tag + ":" == CASE_PREFIX):
        raise RuleError(f"{name}.tag", f"tags that begin with {CASE_PREFIX!r} are auditors' case tags")
    kinds = [k for k in ("header", "sender_domain", "recipient", "recipient_group") if get(k)]
    if len(kinds) != 1:
        raise RuleError(name, "give exactly one condition: header, sender_domain, recipient or recipient_group"
                        + (f" (found {', '.join(kinds)})" if kinds else ""))
    kind = kinds[0]
    ops = [k for k in ("equals", "contains", "matches", "label") if get(k) is not None]
    value_tag = bool(get("value_tag"))
    trusted = bool(get("trusted_only"))
    if kind != "header":
        if ops:
            raise RuleError(f"{name}.{ops[0]}", "only with a header condition")
        if value_tag:
            raise RuleError(f"{name}.value_tag", "only with a header condition")
    if kind == "header":
        header = str(get("header")).strip().lower()
        if not _HEADER_NAME.match(header):
            raise RuleError(f"{name}.header", f"{get('header')!r} is not a header name")
        if len(ops) > 1:
            raise RuleError(f"{name}.{ops[1]}", f"give one of equals, contains, matches, label (found {', '.join(ops)})")
        op = ops[0] if ops else ""
        value = get(op) if op else ""
        if op and not isinstance(value, str):
            raise RuleError(f"{name}.{op}", "expected a string")
        if op in ("equals", "contains", "label") and not value.strip():
            raise RuleError(f"{name}.{op}", "must not be empty")
        if op in ("equals", "contains", "label") and len(value) > MAX_VALUE:
            raise RuleError(f"{name}.{op}", f"longer than {MAX_VALUE} characters")
        if op == "label" and header != MSIP_HEADER:
            raise RuleError(f"{name}.label", f"only with header = \"{MSIP_HEADER}\" (Microsoft Purview labels)")
        if value_tag and len(tag) > MAX_TAG - 2:
            raise RuleError(f"{name}.tag", "too long to be a value tag's prefix")
        regex = _check_regex(value, f"{name}.matches") if op == "matches" else None
        return Rule(tag, "header", header=header, op=op, value=value.strip().casefold() if op != "matches" else "",
                    regex=regex, value_tag=value_tag, trusted_only=trusted, name=name)
    if kind == "sender_domain":
        items = get("sender_domain")
        if isinstance(items, str):
            items = [items]
        return Rule(tag, "sender_domain", domains=frozenset(_domain(d, f"{name}.sender_domain[{i}]")
                                                            for i, d in enumerate(items)),
                    trusted_only=trusted, name=name)
    if kind == "recipient_group":
        group = get("recipient_group")
        if group not in groups:
            raise RuleError(f"{name}.recipient_group", f"no group {group!r} in [tenant.groups]"
                            + (f" (there are: {', '.join(sorted(groups))})" if groups else ""))
        items, where = groups[group], f"groups.{group}"
    else:
        items, where = get("recipient"), f"{name}.recipient"
        if isinstance(items, str):
            items = [items]
    addrs, doms = set(), set()
    for i, a in enumerate(items):
        a = a.strip().strip("<>").lower()
        if "@" in a:
            local, _, dom = a.rpartition("@")
            if not local or not dom or " " in a:
                raise RuleError(f"{where}[{i}]", f"{a!r} is not an address")
            addrs.add(a)
        elif kind == "recipient_group":
            raise RuleError(f"{where}[{i}]", f"{a!r} is not an address (a group is a list of addresses)")
        else:
            doms.add(_domain(a, f"{where}[{i}]"))
    return Rule(tag, "recipient", addresses=frozenset(addrs), domains=frozenset(doms),
                trusted_only=trusted, name=name)


def compile_rules(rules, groups: dict | None = None, where: str = "classify") -> tuple[Rule, ...]:
    """A tenant's rules, compiled; RuleError on the first bad one."""
    groups = dict(groups or {})
    for g, members in groups.items():
        if not isinstance(members, (list, tuple)) or not all(isinstance(m, str) for m in members):
            raise RuleError(f"groups.{g}", "expected a list of addresses")
    if len(rules) > MAX_RULES:
        raise RuleError(where, f"at most {MAX_RULES} rules per tenant")
    return tuple(compile_rule(r, groups, f"{where}[{i}]") for i, r in enumerate(rules))


# --- facts (at archive time) --------------------------------------------------

def header_block(raw: bytes) -> bytes:
    """The message's header block (at most MAX_HEAD bytes)."""
    head = raw[:MAX_HEAD]
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = head.find(sep)
        if i >= 0:
            head = head[:i + len(sep) // 2]
            break
    return head


def headers_of(raw: bytes, names) -> dict[str, list[str]]:
    """The values of the headers `names` (lower case) in the message's
    header block: every occurrence (at most MAX_VALUES), unfolded, RFC 2047
    decoded, at most MAX_VALUE characters each."""
    from mailtresor.archive.parse import _decode_words   # the one RFC 2047 decoder of the archive
    names = set(names)
    out: dict[str, list[str]] = {}
    if not names:
        return out
    text = header_block(raw).decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    current, value = None, []

    def flush() -> None:
        if current is not None and current in names and len(out.get(current, ())) < MAX_VALUES:
            unfolded = " ".join(v.strip() for v in value)
            out.setdefault(current, []).append(_decode_words(unfolded[:4 * MAX_VALUE], None).strip()[:MAX_VALUE])

    for line in text.split("\n"):
        if line[:1] in (" ", "\t") and current is not None:
            value.append(line)
            continue
        flush()
        name, sep, rest = line.partition(":")
        if not sep or not name or name != name.rstrip() or " " in name:
            current, value = None, []
            continue
        current, value = name.lower(), [rest]
    flush()
    return out


def msip_labels(value: str) -> list[tuple[str, str]]:
    """The enabled labels of an msip_labels header: [(guid, name)].
    Format: "MSIP_Label_<guid>_Enabled=true; MSIP_Label_<guid>_Name=Confidential; ..."."""
    fields: dict[str, dict[str, str]] = {}
    for item in value.split(";"):
        k, sep, v = item.strip().partition("=")
        m = _MSIP_ITEM.match(k.strip()) if sep else None
        if m:
            fields.setdefault(m.group(1).lower(), {})[m.group(2).lower()] = v.strip()
    return [(g, f.get("name", "")) for g, f in fields.items() if f.get("enabled", "").lower() == "true"]


def _domain_of(a: str) -> str:
    return a.strip().strip("<>").rpartition("@")[2].lower().rstrip(".") if "@" in a else ""


def _header_tags(rule: Rule, values: list[str]) -> list[str]:
    hits: list[str] = []
    for v in values:
        folded = v.casefold()
        if rule.op == "label":
            names = [n for g, n in msip_labels(v) if rule.value in (n.casefold(), g)]
            hits += names
        elif rule.op == "" and rule.header == MSIP_HEADER and rule.value_tag:
            hits += [n for _, n in msip_labels(v)]
        elif (rule.op == "" or (rule.op == "equals" and folded == rule.value)
              or (rule.op == "contains" and rule.value in folded)
              or (rule.op == "matches" and rule.regex.search(v))):
            hits.append(v)
    if not hits:
        return []
    if not rule.value_tag:
        return [rule.tag]
    room = MAX_TAG - len(rule.tag) - 1
    tags = [f"{rule.tag}:{n}" for n in dict.fromkeys(normalise(h, room) for h in hits) if n]
    return tags[:MAX_VALUE_TAGS]


def apply(rules: tuple[Rule, ...], facts: Facts) -> list[str]:
    """The tags the rules give a message, sorted."""
    tags: set[str] = set()
    for r in rules:
        if r.trusted_only and not facts.trusted:
            continue
        if r.kind == "header":
            tags.update(_header_tags(r, facts.headers.get(r.header, [])))
        elif r.kind == "sender_domain":
            if any(_domain_of(a) in r.domains for a in facts.senders):
                tags.add(r.tag)
        elif r.kind == "recipient":
            for a in facts.recipients:
                a = a.strip().strip("<>").lower()
                if a in r.addresses or _domain_of(a) in r.domains:
                    tags.add(r.tag)
                    break
    return sorted(tags)


def header_names(rules: tuple[Rule, ...]) -> set[str]:
    """The headers these rules read (the rest of the header block is skipped)."""
    return {r.header for r in rules if r.kind == "header"}


def trusted_path(envelope: dict, tenant: str) -> bool:
    """Whether mail came through a path the tenant controls: a relay
    connector bound to it (a journaling connector is), or the milter on
    the customer's own MTA.  Not: an unbound relay connector, an import."""
    if envelope.get("journal_untrusted"):
        return False
    src = envelope.get("source") or ""
    return (src == "relay" and envelope.get("tenant") == tenant) or src == "milter"


def facts_of(raw: bytes, parsed, envelope: dict, tenant: str, rules: tuple[Rule, ...]) -> Facts:
    """The facts for `rules` of one prepared message (archiver.Prepared's
    raw, parsed and envelope; `raw` is the journaled original when a
    trusted journal report was unwrapped, and `envelope` carries the
    report's sender and recipients)."""
    j = envelope.get("journal") or {}
    senders = [*parsed.from_, envelope.get("mail_from") or "", j.get("sender") or ""]
    recipients = [*parsed.to, *parsed.cc, *parsed.bcc, *(envelope.get("rcpt_to") or [])]
    for r in j.get("recipients", []):
        recipients += [r[k] for k in ("address", "expanded", "forwarded") if r.get(k)]
    return Facts(headers=headers_of(raw, header_names(rules)), senders=[s for s in senders if s],
                 recipients=[r for r in recipients if r], trusted=trusted_path(envelope, tenant))


def classify(rules: tuple[Rule, ...], raw: bytes, parsed, envelope: dict, tenant: str) -> list[str]:
    """The classification tags of one message for one tenant."""
    if not rules:
        return []
    return apply(rules, facts_of(raw, parsed, envelope, tenant, rules))
