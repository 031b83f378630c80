"""A message's HTML body made safe to show in a browser, with bleach (the
maintained html5lib-based sanitiser; no regular expressions on markup).

What is kept is an allow-list: text formatting, lists, tables, links and
images.  Everything else is removed with its content where it is code
(script, style) and unwrapped where it is markup (form, iframe, object,
svg, math...): no script, no event handler attribute, no form, no frame,
no style attribute or element (so no CSS url() either), no remote content
(an image's http(s) source is dropped, its alt text stays).  Links keep an
http(s) or mailto target and get rel="noopener noreferrer" and
target="_blank".  Images that name a part of the message (`cid:`) become
data: URIs of that part (raster types only, within a size budget): the API
serves the page with `Content-Security-Policy: default-src 'none';
img-src data:; style-src 'unsafe-inline'` or stricter, and nothing in it
reaches the network.
"""

from __future__ import annotations

import base64
import html

import bleach
import html5lib
from bleach.html5lib_shim import Filter

from mailtresor.archive import parse

TAGS = frozenset({
    "a", "abbr", "b", "blockquote", "br", "caption", "center", "cite", "code", "col", "colgroup",
    "dd", "del", "div", "dl", "dt", "em", "font", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i",
    "img", "ins", "kbd", "li", "ol", "p", "pre", "q", "s", "samp", "small", "span", "strike",
    "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "tt", "u", "ul",
})
ATTRIBUTES = {
    "a": ["href", "title"],
    "img": ["src", "alt", "title", "width", "height"],
    "td": ["colspan", "rowspan", "align", "valign"],
    "th": ["colspan", "rowspan", "align", "valign"],
    "table": ["border", "cellpadding", "cellspacing", "width", "align"],
    "col": ["span", "width"], "colgroup": ["span", "width"],
    "font": ["color", "size"],
    "p": ["align"], "div": ["align"], "h1": ["align"], "h2": ["align"], "h3": ["align"],
    "abbr": ["title"],
}
PROTOCOLS = frozenset({"http", "https", "mailto", "cid"})
# Raster images only: an SVG can carry script (not run in <img>, but there is
# no reason to hand one out).
INLINE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp"})
INLINE_IMAGE_MAX = 5 * 1024 * 1024
INLINE_TOTAL_MAX = 20 * 1024 * 1024


class _Links(Filter):
    """After sanitising: links inert towards the opener, images from the
    message's own parts only."""

    def __init__(self, source, images: dict[str, str]):
        super().__init__(source)
        self.images = images

    def __iter__(self):
        for token in super().__iter__():
            if token["type"] in ("StartTag", "EmptyTag"):
                attrs = token.get("data") or {}
                if token["name"] == "a":
                    attrs[(None, "rel")] = "noopener noreferrer"
                    attrs[(None, "target")] = "_blank"
                elif token["name"] == "img":
                    src = attrs.get((None, "src"), "")
                    if src[:4].lower() == "cid:":
                        data = self.images.get(src[4:].strip().strip("<>"))
                        if data is not None:
                            attrs[(None, "src")] = data
                        else:
                            attrs.pop((None, "src"), None)
                    else:
                        attrs.pop((None, "src"), None)      # remote content: never fetched
                token["data"] = attrs
            yield token


def inline_images(parts: list[parse.Part]) -> dict[str, str]:
    """content id -> data: URI of the message's raster image parts, within
    the size budget."""
    out, total = {}, 0
    for p in parts:
        if not p.content_id or p.content_type not in INLINE_TYPES or not p.data:
            continue
        if len(p.data) > INLINE_IMAGE_MAX or total + len(p.data) > INLINE_TOTAL_MAX:
            continue
        total += len(p.data)
        out[p.content_id] = f"data:{p.content_type};base64,{base64.b64encode(p.data).decode()}"
    return out


# Elements dropped with everything in them before bleach sees the markup
# (bleach's strip keeps the text of a removed element: a script's code
# would be shown as text).
DROP = frozenset({"script", "style", "title", "head", "template", "noscript", "xmp", "iframe",
                  "noembed", "noframes", "object", "embed", "applet", "textarea", "select", "svg", "math"})


def _drop_code(markup: str) -> str:
    """`markup` without the DROP elements and their content (html5lib
    parses it the way a browser would)."""
    root = html5lib.parseFragment(markup, treebuilder="etree", namespaceHTMLElements=False)
    stack = [root]
    while stack:
        el = stack.pop()
        for child in list(el):
            tag = child.tag if isinstance(child.tag, str) else ""
            if tag.rpartition("}")[2].lower() in DROP:
                # keep the text after the element (its tail), drop the element
                prev = None
                idx = list(el).index(child)
                if child.tail:
                    if idx > 0:
                        prev = el[idx - 1]
                        prev.tail = (prev.tail or "") + child.tail
                    else:
                        el.text = (el.text or "") + child.tail
                el.remove(child)
            else:
                stack.append(child)
    return html5lib.serialize(root, tree="etree", omit_optional_tags=False, quote_attr_values="always")


def sanitise(markup: str, images: dict[str, str] | None = None) -> str:
    """`markup` with only the allow-listed tags and attributes left (see
    the module's docstring)."""
    markup = _drop_code(markup)
    cleaner = bleach.Cleaner(tags=TAGS, attributes=ATTRIBUTES, protocols=PROTOCOLS, strip=True,
                             strip_comments=True,
                             filters=[lambda source: _Links(source, images or {})])
    return cleaner.clean(markup)


def message_html(parts: list[parse.Part]) -> str:
    """The HTML body of a message (its first text/html body part),
    sanitised; a message without one: its plain text, escaped, in <pre>."""
    images = inline_images(parts)
    for p in parts:
        if not p.n and p.content_type == "text/html":
            return sanitise(parse.decode_text(p)[:parse._HTML_MAX_INPUT], images)
    text = "\n\n".join(parse.decode_text(p) for p in parts if not p.n and p.content_type == "text/plain")
    return "<pre>" + html.escape(text.replace("\r\n", "\n")) + "</pre>"
