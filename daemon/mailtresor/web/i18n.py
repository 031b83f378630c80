"""The web UI's languages (English, German): gettext catalogues.

Strings in templates are `_("...")`.  Strings that Python code hands to a
template (a reason, a label in a table) are marked `N_("...")` where they
are written, so that the extraction finds them, and translated in the
template (`{{ _(reason) }}`).
"""

from __future__ import annotations


def N_(message: str) -> str:  # noqa: N802 - the gettext convention
    """Mark MESSAGE for translation; translated where it is shown."""
    return message
