"""The web UI: server-rendered pages over the same access core as the API.

Served by the daemon on the API's TLS listener and the same twisted.web
Site: ApiResource hands every path outside /api/, /healthz and /metrics to
Web.serve.  It is an adapter like the API: who is asking comes from the
API's session cookie (the same Sessions), every read goes through the
access core (which checks scope and writes the audit record), logins
through Api.login_session (the API's throttling and audit).  Templates are
jinja2 with autoescaping; no inline script anywhere (see CSP).
"""

__all__ = ["Web"]


def __getattr__(name):
    # Imported when first asked for, so that `python -m mailtresor.web.i18n`
    # does not load the pages (and i18n twice).
    if name == "Web":
        from .site import Web
        return Web
    raise AttributeError(name)
