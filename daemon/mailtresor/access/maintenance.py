"""The API's maintenance section: compacting the months that no longer
change (archive/compact.py), for the appliance's operator.

    POST /api/v1/maintenance/compact   {"tenant"?, "month"?, "quiet_days"?}

Only a local principal (root or the daemon's user on the unix socket:
`mailtresor compact`) or the appliance administrator may: compaction is
the appliance's housekeeping, no tenant's decision, and it rewrites every
shard file it touches.  Every call is one audit record, action "admin"
with op "compact" (refusals included).  The work runs on the archiver's
thread under its locks (Archiver.exclusive); the answer lists each month
considered: compacted (with its sizes before and after), skipped (and
why) or failed (the copy did not match: nothing was swapped).
"""

from __future__ import annotations

import re
import time

from .api import V1, Answer, Route
from .http import HttpError, member

ROUTES = (
    Route("POST", f"{V1}/maintenance/compact", "maintenance_compact"),
)

_MONTH = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])\Z")


def _checked(api, who, doc) -> tuple[str | None, str | None, float]:
    """(tenant, month, quiet_days) of a compaction request; HttpError 400,
    403 (audited) or 404."""
    api._appliance_only(who, "compaction")
    tenant = member(doc, "tenant", str)
    month = member(doc, "month", str)
    quiet = member(doc, "quiet_days", int)
    if tenant is not None and tenant not in api.tenant_names:
        raise HttpError(404, "no such tenant")
    if month is not None and not _MONTH.match(month):
        raise HttpError(400, "'month' must be YYYY-MM")
    if quiet is not None and not 0 <= quiet <= 3650:
        raise HttpError(400, "'quiet_days' must be between 0 and 3650")
    if quiet is None:
        quiet = getattr(getattr(getattr(api, "cfg", None), "lifecycle", None), "compact_quiet_days", 7)
    return tenant, month, quiet


async def h_maintenance_compact(api, c) -> Answer:
    from mailtresor.archive.compact import compact_closed
    from mailtresor.archive.store import StoreLocked
    doc = c.body(optional=("tenant", "month", "quiet_days"))
    tenant, month, quiet = await api.run(_checked, api, c.who, doc)
    archiver = getattr(api, "archiver", None)
    if archiver is None:
        raise HttpError(503, "the archive is not enabled on this appliance")
    obj = "/".join(x for x in (tenant, month) if x) or "all"
    try:
        done = await archiver.exclusive(compact_closed, time.time(), quiet_days=quiet, tenant=tenant, month=month)
    except StoreLocked as e:
        api._admin_audit(c.who, tenant, obj, "compact", result="failed")
        raise HttpError(409, f"the store is busy, try again later: {e}") from None
    except Exception as e:
        api._admin_audit(c.who, tenant, obj, "compact", result="failed")
        raise HttpError(503, f"compaction failed: {type(e).__name__}: {e}") from None
    failed = any(m["status"] == "failed" for m in done)
    api._admin_audit(c.who, tenant, obj, "compact", result="failed" if failed else "ok")
    return Answer(200, {"months": done})
