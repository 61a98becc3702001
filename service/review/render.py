"""Markdown, code and LaTeX in review texts rendered to HTML that is safe to insert into the review page.

Model and student text is untrusted. markdown-it-py renders it with raw HTML off (a `<script>` in the text stays
text), `$...$`, `$$...$$`, `\\(...\\)` and `\\[...\\]` become MathML (latex2mathml; browsers render MathML
natively, so the page needs no math script), and nh3 (the Ammonia sanitizer) then keeps only the tags and
attributes listed here, and links only to http(s) and mailto. Server-side, so the page's Content-Security-Policy
stays strict: no script but the page's own, and that script can insert HTML only through a Trusted Types policy."""

from __future__ import annotations

import html
import logging
import re
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
# Left out: mphantom (its content is invisible) and mpadded (zero width makes text overlap what follows); nh3
# keeps their children, shown plainly.
MATHML_TAGS = {
    "math", "mrow", "mi", "mn", "mo", "ms", "mtext", "mspace", "msup", "msub", "msubsup", "mfrac", "msqrt", "mroot",
    "mover", "munder", "munderover", "mtable", "mtr", "mtd", "mstyle", "menclose",
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
# Lengths a formula may set, bounded: \hspace{100000em} or \rule{..}{..} would push the verdict form off screen.
LENGTH_ATTRIBUTES = {"width", "height", "depth", "voffset", "lspace", "rspace", "minsize", "maxsize", "mathsize"}
MAX_LENGTH = {"em": 5.0, "ex": 10.0, "px": 80.0, "pt": 60.0, "%": 300.0, "": 5.0, "mu": 90.0}
# Digits and blanks are each read by one quantifier only: "[0-9]*\.?[0-9]+", or "\s*" on both sides of a unit that
# may be empty, split a long run two ways (quadratic).
_LENGTH = re.compile(r"^\s*(-?(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+))(?:\s*(em|ex|px|pt|%|mu))?\s*$")
# Longer texts are shown as plain text: Markdown with math costs more than linear time on some inputs, and the
# queue renders every text of an item on each request.
MAX_MARKDOWN_CHARS = 20_000
# Text-mode LaTeX, whose argument latex2mathml copies into <mtext> without escaping it.
_TEXT_MODE = re.compile(r"\\(?:text[a-z]*|mbox|hbox)\s*\{")


def _escape_text_mode(latex: str) -> str:
    """`<`, `>` and `&` inside \\text{...} and its kin escaped: latex2mathml copies those arguments into the HTML as
    they are, where the sanitizer would drop what looks like a tag ("a<b and c>d" shown as "ad")."""
    out, pos = [], 0
    for match in _TEXT_MODE.finditer(latex):
        if match.start() < pos:  # inside an argument already escaped
            continue
        depth, end = 1, match.end()
        while end < len(latex) and depth:
            char = latex[end]
            if char == "\\":
                end += 2
                continue
            depth += {"{": 1, "}": -1}.get(char, 0)
            end += 1
        out += [latex[pos:match.end()], html.escape(latex[match.end():end], quote=False)]
        pos = end
    return "".join(out) + latex[pos:]


def _math(latex: str, options: dict[str, Any]) -> str:
    """MathML for one formula, or, where latex2mathml cannot read it, the formula's source as code."""
    display = "block" if options.get("display_mode") else "inline"
    try:
        return latex_to_mathml(_escape_text_mode(latex), display=display)
    except Exception as exc:  # any LaTeX a model writes: a formula it cannot parse must not fail the item
        log.debug("latex2mathml could not render %r: %s", latex[:80], exc)
        return f'<code class="math-error">{html.escape(latex)}</code>'


def _closer_after(state, opener: str, closer: str) -> bool:
    """Whether `closer` comes anywhere after an `opener` at the state's position: known in constant time from the
    closer's last place in this text (kept in the render's env), so a text of many openers and no closer is not
    searched to its end once per opener."""
    key = ("last", closer, state.src)
    if key not in state.env:
        state.env[key] = state.src.rfind(closer)
    return state.env[key] >= state.pos + len(opener)


def _display_brackets_inline(state, silent: bool) -> bool:
    start = state.pos
    if not state.src.startswith("\\[", start) or not _closer_after(state, "\\[", "\\]"):
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


def _unless_unclosed(rule, opener: str, closer: str):
    """texmath's \\( rule, which searches the rest of the text for its closer at every opener, skipped where there
    is none."""

    def guarded(state, silent: bool) -> bool:
        if state.src.startswith(opener, state.pos) and not _closer_after(state, opener, closer):
            return False
        return rule(state, silent)

    return guarded


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
    for rule in md.inline.ruler.__rules__:
        if rule.fn.__module__ == texmath_plugin.__module__:
            rule.fn = _unless_unclosed(rule.fn, "\\(", "\\)")
    md.inline.ruler.__cache__ = None  # the rule chains are compiled from the rules on first use
    # texmath takes \[...\] only as a block of its own; models also write it inside a sentence.
    md.inline.ruler.before("escape", "math_display_brackets_inline", _display_brackets_inline)
    md.add_render_rule("image", _image)
    # Both plugins make tokens of these types; one renderer for all, through latex2mathml.
    for token_type, display in (("math_inline", False), ("math_inline_double", True), ("math_block", True),
                                ("math_block_label", True), ("math_block_eqno", True)):
        md.add_render_rule(token_type, _math_rule(display, inline=token_type.startswith("math_inline")))
    return md


def _bounded_length(tag: str, attribute: str, value: str) -> str | None:
    if attribute not in LENGTH_ATTRIBUTES:
        return value
    match = _LENGTH.match(value)
    if match is None:  # a named size (mathsize="big") or a keyword: no length to grow
        return value if value.isalpha() else None
    number, unit = float(match.group(1)), match.group(2) or ""
    return value if abs(number) <= MAX_LENGTH[unit] else None


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
        attribute_filter=_bounded_length,
        strip_comments=True,
    )


CACHED_CHARS = 2_000  # texts up to this long are kept rendered: a formula's MathML is ~30x its source


def to_html(text: str) -> str:
    """Markdown (with math) to sanitized HTML; a text over MAX_MARKDOWN_CHARS as plain text."""
    text = text or ""
    if len(text) > MAX_MARKDOWN_CHARS:
        return f'<pre class="plain">{html.escape(text)}</pre>'  # cheap: never cached
    return _cached_html(text) if len(text) <= CACHED_CHARS else _rendered(text)


def _rendered(text: str) -> str:
    return sanitize(_markdown().render(text))


# The queue renders an item's texts on every request for it. Bounded in bytes as well as entries: students can
# put long texts in the queue themselves, and 1,024 rendered 20,000-character formulas would pin hundreds of MB.
_cached_html = lru_cache(maxsize=1024)(_rendered)
