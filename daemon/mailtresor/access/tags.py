"""The API's "tags" section: auditors' case tags on messages.

    POST /api/v1/messages/{id}/tags   {"add": [...], "remove": [...]}  (?tenant= for a local caller)

Needs the `tag-case` verb (auditors; a user or an admin is 403, audited);
another tenant's message, or one not stored, is 404 (no existence leak).
The change runs on the archiver's thread (Archiver.exclusive ->
archive/casetags.py): the message's metadata gets the tags through the
shard's hash chain, the record (the message) is not touched.  Each change
is audited as action "tag"; the tag names go into the record's encrypted
`terms` (a case name can be confidential), the counts into `detail`.
"""

from __future__ import annotations

import json
import re

from mailtresor.access.api import V1, Answer, Call, Route, _segment, _MESSAGE_ID
from mailtresor.access.http import HttpError, member

_AID = re.compile(r"[0-9a-f]{40}")           # an archive id (core._AID)

ROUTES = (
    Route("POST", f"{V1}/messages/{{id}}/tags", "tag_message", args=("tenant",)),
)


def _audit(api, who, tenant, aid, result, add=(), remove=(), reason="") -> None:
    if api.audit is None:
        return
    detail = {"added": len(add), "removed": len(remove)}
    if reason:
        detail["reason"] = reason
    terms = json.dumps({"add": list(add), "remove": list(remove)}) if (add or remove) and tenant else None
    api.audit.append(principal=who, tenant=tenant, action="tag", object=aid, result=result,
                     client=who.client, terms=terms, detail=detail)


async def change_tags(api, who, aid: str, tenant_asked, add, remove) -> dict:
    """Check, change, audit: the API's handler and the web UI's form
    (web/tags.py) both call this.  Returns {"id", "tenant", "case_tags",
    "classification_tags", "tags", "changed"}; raises HttpError or the
    core's AccessError."""
    from mailtresor.archive.casetags import CaseTagError, change_case_tags, check_change
    from mailtresor.archive.store.errors import StoreLocked
    core = api._need_core()
    if not who.can("tag-case"):
        api._deny(who, who.tenant, "tag", aid, "case tags need the auditor role")
    tenant = core.tenant_of(who, tenant_asked or None)
    try:
        add, remove = check_change(add, remove)
    except CaseTagError as e:
        raise HttpError(400, str(e)) from None
    aid = aid.lower()
    if not _AID.fullmatch(aid):              # not an archive id: nothing to look up
        _audit(api, who, tenant, None, "not-found", add, remove)
        raise HttpError(404, "no such message")
    if api.archiver is None:
        raise HttpError(503, "the archiver is not running on this appliance")
    try:
        res = await api.archiver.exclusive(change_case_tags, tenant, aid, add, remove)
    except StoreLocked as e:
        raise HttpError(503, f"the store is busy ({e}); try again") from None
    except CaseTagError as e:
        _audit(api, who, tenant, aid, "failed", add, remove, str(e))
        raise HttpError(400, str(e)) from None
    if res is None:
        _audit(api, who, tenant, aid, "not-found", add, remove)
        raise HttpError(404, "no such message")
    _audit(api, who, tenant, aid, "ok", add, remove)
    return {"id": aid, "tenant": tenant, "changed": res.changed, "case_tags": res.case_tags,
            "classification_tags": res.classification_tags, "tags": res.tags}


async def h_tag_message(api, c: Call) -> Answer:
    aid = _segment(c.params["id"], _MESSAGE_ID, "message")
    doc = c.body(optional=("add", "remove"))
    add, remove = member(doc, "add", list, []), member(doc, "remove", list, [])
    return Answer(200, await change_tags(api, c.who, aid, c.args.get("tenant"), add, remove))
