"""Markdown → HTML fragment with inline styles, for the HTML part of outbound mail.

Agents write Markdown; recipients' mail clients strip ``<style>`` blocks and
block remote resources, so every element carries its own ``style``. Raw HTML
written by an agent never reaches the output: a message body is not a place to
smuggle tags (or scripts) past the recipient's client.

The styles are applied while rendering rather than by a CSS inliner that
re-parses the result: every selector is a plain tag selector, the token stream
already knows each element, and a re-parse would reorder attributes and drop the
XHTML ``/>`` forms. Same input, byte-identical output.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Sequence

from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml, unescapeAll
from markdown_it.renderer import RendererHTML
from markdown_it.rules_core import StateCore
from markdown_it.token import Token
from markdown_it.utils import EnvType, OptionsDict
from mdit_py_plugins.footnote import footnote_plugin

MARKDOWN_CAP = 5_242_880
"""Largest Markdown source (UTF-8 bytes, signature included) the default send path renders."""

RAW_HTML_OMITTED = "<!-- raw HTML omitted -->"

_MONO = "font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;"

STYLES: dict[str, str] = {
    "h1": "font-size: 1.75em; margin: 1.2em 0 0.5em; line-height: 1.25;",
    "h2": "font-size: 1.4em; margin: 1.1em 0 0.5em; line-height: 1.3;",
    "h3": "font-size: 1.2em; margin: 1em 0 0.4em; line-height: 1.3;",
    "h4": "font-size: 1.05em; margin: 1em 0 0.4em; line-height: 1.3;",
    "p": "margin: 0.6em 0;",
    "ul": "margin: 0.6em 0; padding-left: 1.4em;",
    "ol": "margin: 0.6em 0; padding-left: 1.4em;",
    "li": "margin: 0.2em 0;",
    "a": "color: #0b66c2; text-decoration: none;",
    "code": _MONO + " background: #f3f4f6; padding: 0.1em 0.3em; border-radius: 3px;"
    " font-size: 0.95em;",
    "pre": _MONO + " background: #f3f4f6; padding: 12px; border-radius: 5px;"
    " overflow-x: auto; font-size: 0.95em; line-height: 1.45;",
    "blockquote": "border-left: 3px solid #d0d7de; padding: 0 0.9em; color: #57606a;"
    " margin: 0.6em 0;",
    "table": "border-collapse: collapse; margin: 0.8em 0; border: 1px solid #d0d7de;",
    "th": "border: 1px solid #d0d7de; padding: 6px 10px; background: #f6f8fa; text-align: left;",
    "td": "border: 1px solid #d0d7de; padding: 6px 10px;",
    "hr": "border: 0; border-top: 1px solid #d0d7de; margin: 1.4em 0;",
}
"""Per-tag inline styles. ``body`` is not listed: the output is a fragment."""

# Tags whose content is not text for a reader: an inline ``<script>`` must not
# leave its code behind once the tags themselves are omitted.
_RAW_TEXT_TAGS = ("script", "style", "title", "textarea", "xmp", "iframe", "noembed",
                  "noframes", "plaintext", "template")
_RAW_TEXT_OPEN = re.compile(r"<(" + "|".join(_RAW_TEXT_TAGS) + r")(?=[\s/>])", re.IGNORECASE)

# GFM extended autolinks: scheme URLs and ``www.`` hosts may start a line or follow
# whitespace or ``*`` ``_`` ``~`` ``(``; addresses need a dotted domain.
_AUTOLINK = re.compile(
    r"(?<![^\s*_~(])(?P<url>(?:https?://|ftp://|www\.)[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*"
    r"[^\s<]*)"
    r"|(?<![A-Za-z0-9._+-])(?P<email>[A-Za-z0-9._+-]+@[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+)",
    re.IGNORECASE,
)
_LINK_TRAILING_PUNCTUATION = "?!.,:*_~'\""
_ENTITY_SUFFIX = re.compile(r"&[A-Za-z0-9]+;$")

_ALIGN = re.compile(r"text-align:\s*(left|right|center)")

Attrs = Sequence[tuple[str, str | None]]


def render_markdown(text: str) -> str:
    """Render agent Markdown (CommonMark + GFM) to a styled, script-free HTML fragment."""
    return _MARKDOWN.render(text)


def merge_style(existing: str | None, value: str) -> str:
    """Combine an element's own style with the house style (house style last)."""
    if existing and existing.strip():
        return existing.strip().rstrip(";").rstrip() + "; " + value
    return value


def heading_slug(text: str) -> str:
    """Anchor id for a heading: lower-cased letters, marks, digits, ``_`` and ``-``."""
    kept = []
    for char in text.lower():
        if char == " ":
            kept.append("-")
        elif char == "-" or unicodedata.category(char)[0] in "LMN" \
                or unicodedata.category(char) == "Pc":
            kept.append(char)
    return "".join(kept)


def _tag(tag: str, attrs: Attrs, *, self_closing: bool = False) -> str:
    """An opening tag with escaped attributes and the house style appended last."""
    parts = [tag]
    style = STYLES.get(tag)
    for name, value in attrs:
        if name == "style" and style is not None:
            style = merge_style(value, style)
            continue
        parts.append(name if value is None else f'{name}="{escapeHtml(value)}"')
    if style is not None:
        parts.append(f'style="{escapeHtml(style)}"')
    return "<" + " ".join(parts) + (" />" if self_closing else ">")


# --- core rules (token-stream rewrites) -----------------------------------------------------


def _drop_raw_text_content(state: StateCore) -> None:
    """Collapse inline ``<script>…</script>`` (and kin) into one omitted-HTML marker."""
    for block in state.tokens:
        if block.type != "inline" or not block.children:
            continue
        if not any(child.type == "html_inline" for child in block.children):
            continue
        kept: list[Token] = []
        closing: re.Pattern[str] | None = None
        for child in block.children:
            if closing is not None:
                if child.type == "html_inline" and closing.match(child.content):
                    closing = None
                continue
            kept.append(child)
            if child.type == "html_inline":
                opened = _RAW_TEXT_OPEN.match(child.content)
                if opened and not child.content.rstrip().endswith("/>"):
                    closing = re.compile(rf"</{opened.group(1)}\s*>", re.IGNORECASE)
        block.children = kept


def _trim_url(url: str) -> str:
    """Drop what GFM leaves outside a bare link: closing punctuation, stray ``)``, entities."""
    unmatched = url.count(")") - url.count("(")
    while url:
        if url[-1] in _LINK_TRAILING_PUNCTUATION:
            url = url[:-1]
        elif url[-1] == ")" and unmatched > 0:
            url = url[:-1]
            unmatched -= 1
        elif url[-1] == ";" and (entity := _ENTITY_SUFFIX.search(url)):
            url = url[: entity.start()]
        else:
            break
    return url


def _valid_host(url: str) -> bool:
    host = re.split(r"[/?#:]", url.split("://", 1)[-1], maxsplit=1)[0]
    labels = host.split(".")
    return bool(host) and all(labels) and "_" not in "".join(labels[-2:])


def _link_tokens(md: MarkdownIt, href: str, text: str, level: int) -> list[Token] | None:
    target = md.normalizeLink(href)
    if not md.validateLink(target):
        return None
    opening = Token("link_open", "a", 1, attrs={"href": target}, markup="linkify",
                    info="auto", level=level)
    label = Token("text", "", 0, content=md.normalizeLinkText(text), level=level + 1)
    closing = Token("link_close", "a", -1, markup="linkify", info="auto", level=level)
    return [opening, label, closing]


def _split_autolinks(md: MarkdownIt, token: Token) -> list[Token]:
    text, out, done = token.content, [], 0
    for found in _AUTOLINK.finditer(text):
        if found.start() < done:
            continue
        if found.group("url"):
            shown = _trim_url(found.group("url"))
            if not _valid_host(shown) or shown.lower() in ("http://", "https://", "ftp://"):
                continue
            href = shown if "://" in shown else "http://" + shown
        else:
            shown = found.group("email").rstrip(".")
            if shown[-1] in "-_" or "." not in shown.rsplit("@", 1)[1]:
                continue
            href = "mailto:" + shown
        link = _link_tokens(md, href, shown, token.level)
        if link is None:
            continue
        if found.start() > done:
            out.append(Token("text", "", 0, content=text[done:found.start()], level=token.level))
        out.extend(link)
        done = found.start() + len(shown)
    if not out:
        return [token]
    if done < len(text):
        out.append(Token("text", "", 0, content=text[done:], level=token.level))
    return out


def _autolinks(state: StateCore) -> None:
    """Turn bare URLs, ``www.`` hosts and e-mail addresses in text into links."""
    for block in state.tokens:
        if block.type != "inline" or not block.children:
            continue
        children: list[Token] = []
        link_depth = 0
        for child in block.children:
            if child.type == "link_open":
                link_depth += 1
            elif child.type == "link_close":
                link_depth -= 1
            if child.type == "text" and link_depth == 0 and (
                    "://" in child.content or "www." in child.content.lower()
                    or "@" in child.content):
                children.extend(_split_autolinks(state.md, child))
            else:
                children.append(child)
        block.children = children


def _heading_text(tokens: Sequence[Token]) -> str:
    out: list[str] = []
    for token in tokens:
        if token.type in ("text", "code_inline"):
            out.append(token.content)
        elif token.type in ("softbreak", "hardbreak"):
            out.append(" ")
        elif token.children:
            out.append(_heading_text(token.children))
    return "".join(out)


def _heading_anchors(state: StateCore) -> None:
    """Give every heading a unique anchor id (repeats get ``-1``, ``-2`` …)."""
    seen: set[str] = set()
    tokens = state.tokens
    for index, token in enumerate(tokens):
        if token.type != "heading_open":
            continue
        inline = tokens[index + 1]
        base = heading_slug(_heading_text(inline.children or []))
        anchor, counter = base, 0
        while anchor in seen:
            counter += 1
            anchor = f"{base}-{counter}"
        seen.add(anchor)
        token.meta = {**(token.meta or {}), "anchor": anchor}


def _walk(tokens: Sequence[Token]) -> Iterator[Token]:
    for token in tokens:
        yield token
        if token.children:
            yield from _walk(token.children)


def _element_shapes(state: StateCore) -> None:
    """``<s>`` → ``<del>``; table alignment as ``align=`` (the house style owns ``style``)."""
    for token in _walk(state.tokens):
        if token.type in ("s_open", "s_close"):
            token.tag = "del"
        elif token.type in ("th_open", "td_open"):
            style = token.attrs.get("style")
            if isinstance(style, str):
                found = _ALIGN.search(style)
                token.attrs.pop("style")
                if found:
                    token.attrs["align"] = found.group(1)


def _apply_styles(state: StateCore) -> None:
    """Append the house style to every listed element the stock renderer draws."""
    for token in _walk(state.tokens):
        if token.nesting == -1 or token.tag not in STYLES or token.type in _SELF_STYLED:
            continue
        house = STYLES[token.tag]
        if token.tag == "th" and token.attrs.get("align"):
            # The house header style left-aligns; a column the author aligned keeps its side.
            house = house.replace("text-align: left;", f"text-align: {token.attrs['align']};")
        existing = token.attrs.pop("style", None)
        token.attrs["style"] = merge_style(None if existing is None else str(existing), house)


# Token types drawn by the renderer overrides below, which style their own tags.
_SELF_STYLED = frozenset({"fence", "code_block", "html_block", "html_inline"})


# --- renderer overrides -------------------------------------------------------------------


def _heading_open(self: RendererHTML, tokens: Sequence[Token], idx: int,
                  options: OptionsDict, env: EnvType) -> str:
    anchor = (tokens[idx].meta or {}).get("anchor", "")
    link = _tag("a", [("href", "#" + anchor), ("aria-hidden", "true"), ("class", "anchor"),
                      ("id", anchor)])
    return self.renderToken(tokens, idx, options, env) + link + "</a>"


def _list_item_open(self: RendererHTML, tokens: Sequence[Token], idx: int,
                    options: OptionsDict, env: EnvType) -> str:
    token = tokens[idx]
    result = self.renderToken(tokens, idx, options, env)
    if token.meta and "checked" in token.meta:
        ticked = ' checked=""' if token.meta["checked"] else ""
        result += f'<input type="checkbox"{ticked} disabled="" /> '
    return result


def _code_block(self: RendererHTML, tokens: Sequence[Token], idx: int,
                options: OptionsDict, env: EnvType) -> str:
    code = escapeHtml(tokens[idx].content)
    return _tag("pre", []) + _tag("code", []) + code + "</code></pre>\n"


def _fence(self: RendererHTML, tokens: Sequence[Token], idx: int,
           options: OptionsDict, env: EnvType) -> str:
    token = tokens[idx]
    info = unescapeAll(token.info).strip() if token.info else ""
    language = info.split(maxsplit=1)[0] if info else ""
    code_attrs = [("class", "language-" + language)] if language else []
    return (_tag("pre", []) + _tag("code", code_attrs) + escapeHtml(token.content)
            + "</code></pre>\n")


def _html_block(self: RendererHTML, tokens: Sequence[Token], idx: int,
                options: OptionsDict, env: EnvType) -> str:
    return RAW_HTML_OMITTED + "\n"


def _html_inline(self: RendererHTML, tokens: Sequence[Token], idx: int,
                 options: OptionsDict, env: EnvType) -> str:
    return RAW_HTML_OMITTED


def _footnote_name(meta: dict) -> str:
    label = meta.get("label")
    return str(label) if label else str(meta["id"] + 1)


def _footnote_ref(self: RendererHTML, tokens: Sequence[Token], idx: int,
                  options: OptionsDict, env: EnvType) -> str:
    meta = tokens[idx].meta
    name = _footnote_name(meta)
    ref_id = "fnref-" + name + (f"-{meta['subId'] + 1}" if meta.get("subId", 0) > 0 else "")
    link = _tag("a", [("href", "#fn-" + name), ("id", ref_id), ("data-footnote-ref", None)])
    return f'<sup class="footnote-ref">{link}{meta["id"] + 1}</a></sup>'


def _footnote_block_open(self: RendererHTML, tokens: Sequence[Token], idx: int,
                         options: OptionsDict, env: EnvType) -> str:
    return '<section class="footnotes" data-footnotes>\n' + _tag("ol", []) + "\n"


def _footnote_block_close(self: RendererHTML, tokens: Sequence[Token], idx: int,
                          options: OptionsDict, env: EnvType) -> str:
    return "</ol>\n</section>\n"


def _footnote_open(self: RendererHTML, tokens: Sequence[Token], idx: int,
                   options: OptionsDict, env: EnvType) -> str:
    return _tag("li", [("id", "fn-" + _footnote_name(tokens[idx].meta))]) + "\n"


def _footnote_close(self: RendererHTML, tokens: Sequence[Token], idx: int,
                    options: OptionsDict, env: EnvType) -> str:
    return "</li>\n"


def _footnote_anchor(self: RendererHTML, tokens: Sequence[Token], idx: int,
                     options: OptionsDict, env: EnvType) -> str:
    meta = tokens[idx].meta
    name = _footnote_name(meta)
    number = str(meta["id"] + 1)
    target, index, mark = "fnref-" + name, number, "\u21a9"
    if meta.get("subId", 0) > 0:
        repeat = str(meta["subId"] + 1)
        target += "-" + repeat
        index += "-" + repeat
        mark += f'<sup class="footnote-ref">{repeat}</sup>'
    link = _tag("a", [("href", "#" + target), ("class", "footnote-backref"),
                      ("data-footnote-backref", None), ("data-footnote-backref-idx", index),
                      ("aria-label", "Back to reference " + index)])
    return " " + link + mark + "</a>"


def _build() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": True, "xhtmlOut": True, "breaks": False})
    md.enable(["table", "strikethrough"])
    md.options["tasklists"] = True
    md.options["tasklists_editable"] = False
    md.options["strikethrough_single_tilde"] = True
    md.use(footnote_plugin, inline=False)
    md.core.ruler.push("aimx_autolinks", _autolinks)
    md.core.ruler.push("aimx_raw_text", _drop_raw_text_content)
    md.core.ruler.push("aimx_anchors", _heading_anchors)
    md.core.ruler.push("aimx_shapes", _element_shapes)
    md.core.ruler.push("aimx_styles", _apply_styles)
    for token_type, rule in (
        ("heading_open", _heading_open),
        ("list_item_open", _list_item_open),
        ("code_block", _code_block),
        ("fence", _fence),
        ("html_block", _html_block),
        ("html_inline", _html_inline),
        ("footnote_ref", _footnote_ref),
        ("footnote_block_open", _footnote_block_open),
        ("footnote_block_close", _footnote_block_close),
        ("footnote_open", _footnote_open),
        ("footnote_close", _footnote_close),
        ("footnote_anchor", _footnote_anchor),
    ):
        md.add_render_rule(token_type, rule)
    return md


_MARKDOWN = _build()
