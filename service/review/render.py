"""Markdown, code and LaTeX in review texts rendered to HTML that is safe to insert into the review page.

Model and student text is untrusted. markdown-it-py renders it with raw HTML off (a `<script>` in the text stays
text), `$...$`, `$$...$$`, `\\(...\\)` and `\\[...\\]` become MathML (latex2mathml; browsers render MathML
natively, so the page needs no math script), and nh3 (the Ammonia sanitizer) then keeps only the tags and
attributes listed here, and links only to http(s) and mailto. Server-side, so the page's Content-Security-Policy
stays strict: no script but the page's own, and that script can insert HTML only through a Trusted Types policy."""

from __future__ import annotations

import html
import logging
from functools import lru_cache
from typing import Any

import nh3
from latex2mathml.converter import convert as latex_to_mathml
from markdown_it import MarkdownIt
from mdit_py_plugins.dollarmath import dollarmath_plugin
from mdit_py_plugins.texmath import texmath_plugin

log = logging.getLogger(__name__)

# What Markdown renders to (CommonMark plus tables and strikethrough), and the MathML that latex2mathml writes.
MARKDOWN_TAGS = {
    "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "ul", "ol", "li", "em", "strong", "s",
    "code", "pre", "a", "table", "thead", "tbody", "tr", "th", "td", "span", "div",
}
MATHML_TAGS = {
    "math", "mrow", "mi", "mn", "mo", "ms", "mtext", "mspace", "msup", "msub", "msubsup", "mfrac", "msqrt", "mroot",
    "mover", "munder", "munderover", "mtable", "mtr", "mtd", "mstyle", "mpadded", "mphantom", "menclose",
}
# Layout only. Left out on purpose: style (the policy would block it anyway), href, and mathcolor/mathbackground,
# which could hide text from a reviewer (white on white).
MATHML_ATTRIBUTES = {
    "display", "mathvariant", "mathsize", "stretchy", "fence", "separator", "lspace", "rspace", "width", "height",
    "depth", "voffset", "columnalign", "columnspacing", "columnlines", "rowspacing", "rowlines", "linethickness",
    "accent", "accentunder", "movablelimits", "largeop", "notation", "displaystyle", "scriptlevel", "form",
    "minsize", "maxsize", "symmetric",
}
ATTRIBUTES: dict[str, set[str]] = {
    "a": {"href", "title"},
    "ol": {"start"},
    "th": {"align"},
    "td": {"align"},
    **{tag: MATHML_ATTRIBUTES for tag in MATHML_TAGS},
}
# Only the classes the renderer itself writes; a class in the text cannot dress up as the page's own elements.
CLASSES = {"span": {"math", "inline", "block", "math-error"}, "div": {"math", "block"}, "code": {"math-error"}}
URL_SCHEMES = {"http", "https", "mailto"}


def _math(latex: str, options: dict[str, Any]) -> str:
    """MathML for one formula, or, where latex2mathml cannot read it, the formula's source as code."""
    display = "block" if options.get("display_mode") else "inline"
    try:
        return latex_to_mathml(latex, display=display)
    except Exception as exc:  # any LaTeX a model writes: a formula it cannot parse must not fail the item
        log.debug("latex2mathml could not render %r: %s", latex[:80], exc)
        return f'<code class="math-error">{html.escape(latex)}</code>'


def _display_brackets_inline(state, silent: bool) -> bool:
    start = state.pos
    if not state.src.startswith("\\[", start):
        return False
    end = state.src.find("\\]", start + 2)
    if end < 0 or not state.src[start + 2 : end].strip():
        return False
    if not silent:
        token = state.push("math_inline_double", "math", 0)
        token.content = state.src[start + 2 : end]
        token.markup = "\\["
    state.pos = end + 2
    return True


def _image(self, tokens, idx, options, env) -> str:
    """An image is shown as a link to it: a model's image would load from anywhere (the policy blocks that), and
    the reviewer should still see that the answer had one."""
    token = tokens[idx]
    alt = self.renderInline(token.children or [], options, env) if token.children else ""
    return f'<a href="{html.escape(token.attrGet("src") or "", quote=True)}">[image: {alt}]</a>'


def _math_rule(display: bool, inline: bool):
    """A formula's element: a span inside a paragraph (a div there would end the paragraph), else a div."""
    tag, kind = ("span" if inline else "div"), ("block" if display else "inline")

    def rule(self, tokens, idx, options, env) -> str:
        return f'<{tag} class="math {kind}">{_math(tokens[idx].content.strip(), {"display_mode": display})}</{tag}>'

    return rule


@lru_cache(maxsize=1)
def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.enable(["table", "strikethrough"])
    md.use(dollarmath_plugin, renderer=_math, allow_space=True, allow_digits=False, double_inline=True)
    # LaTeX's own \( \) and \[ \] delimiters, which models often write too.
    md.use(texmath_plugin, delimiters="brackets")
    # texmath takes \[...\] only as a block of its own; models also write it inside a sentence.
    md.inline.ruler.before("escape", "math_display_brackets_inline", _display_brackets_inline)
    md.add_render_rule("image", _image)
    # Both plugins make tokens of these types; one renderer for all, through latex2mathml.
    for token_type, display in (("math_inline", False), ("math_inline_double", True), ("math_block", True),
                                ("math_block_label", True), ("math_block_eqno", True)):
        md.add_render_rule(token_type, _math_rule(display, inline=token_type.startswith("math_inline")))
    return md


def sanitize(fragment: str) -> str:
    """Keeps the allow-listed tags and attributes only: scripts and their content, event handlers, styles, and links
    to anything but http(s) and mailto are removed. Links open in a new tab, with no referrer."""
    return nh3.clean(
        fragment,
        tags=MARKDOWN_TAGS | MATHML_TAGS,
        clean_content_tags={"script", "style"},
        attributes=ATTRIBUTES,
        allowed_classes=CLASSES,
        url_schemes=URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
        set_tag_attribute_values={"a": {"target": "_blank"}},
        strip_comments=True,
    )


def to_html(text: str) -> str:
    """Markdown (with math) to sanitized HTML."""
    return sanitize(_markdown().render(text or ""))
