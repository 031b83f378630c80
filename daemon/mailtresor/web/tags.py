"""Case tags on the message page: the form an auditor adds and removes
them with (templates/message_tags.html, included by message.html).

    POST /message/<id>/tags   op=add tag=case:...  |  op=remove tag=case:...

No check is made here that the API does not make: the form calls
access.tags.change_tags, as POST /api/v1/messages/{id}/tags does (the
role: `tag-case`, audited when refused; the tenant: the auditor's own,
another tenant's message is "not found"; the change through the archiver
and the shard's chain; the audit record).  CSRF is checked centrally
(web/site.py).  Success: back to the message page (post/redirect/get);
a bad tag: the message page again, 400, with the error by the field and
what was typed.
"""

from __future__ import annotations

from mailtresor.access.http import HttpError
from mailtresor.archive.classify import CASE_PREFIX, valid_tag
from mailtresor.web.i18n import N_
from mailtresor.web.reading import _aid

NOT_A_TAG = N_("This is not a tag name: use 1 to 64 letters, digits and the characters . _ : -")
NOT_A_CASE = N_("A case tag begins with case: and names the case, e.g. case:acme-v-smith.")
# The API's reasons this form may show, for the German catalogue.
REASONS = (N_("case tags need the auditor role"), N_("the archiver is not running on this appliance"))


async def tag(web, request, who, csrf, aid):
    from mailtresor.access.tags import change_tags
    aid = _aid(aid)
    f = web.form(request)
    op, value = f.get("op", ""), f.get("tag", "").strip()
    if op not in ("add", "remove"):
        raise HttpError(400, N_("bad request"))
    error = None
    if not valid_tag(value):
        error = NOT_A_TAG
    elif not value.startswith(CASE_PREFIX) or value == CASE_PREFIX:
        error = NOT_A_CASE
    if error is None:
        try:
            await change_tags(web.api, who, aid, None, [value] if op == "add" else [],
                              [value] if op == "remove" else [])
        except HttpError as e:
            if e.status != 400:
                raise
            error = e.reason
        else:
            return web.redirect(request, f"/message/{aid}#case-tags")
    # Only a caller who may tag gets here with a bad tag (change_tags
    # checks the role first): the page again, with the error.
    doc = await web.api.run(web.core.message, who, aid)
    web.render(request, "message.html", who, csrf, status=400, m=doc, view="html", text=None,
               tag_error=error, tag_value=value[:100])


ROUTES = (
    ("POST", r"/message/(?P<aid>[^/]+)/tags", tag),
)
