"""Markdown rendering: GFM element set, anchors, footnotes, raw-HTML rule, inline styles.

Outputs are checked structurally with ``html.parser`` rather than compared as strings.
"""

from __future__ import annotations

import os
import subprocess
import sys
from html.parser import HTMLParser

import attrs

from aimx.mail.render import STYLES, render_markdown


@attrs.define
class Element:
    tag: str
    attrs: list[tuple[str, str | None]]
    parent: Element | None = None
    children: list[Element] = attrs.field(factory=list)
    text: str = ""

    @property
    def attr(self) -> dict[str, str | None]:
        return dict(self.attrs)

    def all_text(self) -> str:
        return self.text + "".join(child.all_text() for child in self.children)


_VOID = {"br", "hr", "img", "input"}


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#root", [])
        self.current = self.root
        self.elements: list[Element] = []
        self.comments: list[str] = []

    def handle_starttag(self, tag, attrs_):
        element = Element(tag, attrs_, self.current)
        self.current.children.append(element)
        self.elements.append(element)
        if tag not in _VOID:
            self.current = element

    def handle_startendtag(self, tag, attrs_):
        element = Element(tag, attrs_, self.current)
        self.current.children.append(element)
        self.elements.append(element)

    def handle_endtag(self, tag):
        node = self.current
        while node is not self.root and node.tag != tag:
            node = node.parent
        assert node is not self.root, f"stray </{tag}>"
        self.current = node.parent

    def handle_data(self, data):
        # Text is attached to the innermost open element (order inside it is not needed).
        self.current.text += data

    def handle_comment(self, data):
        self.comments.append(data)


def parse(html: str) -> _TreeBuilder:
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    assert builder.current is builder.root, "unclosed elements"
    return builder


def find(tree: _TreeBuilder, tag: str) -> list[Element]:
    return [element for element in tree.elements if element.tag == tag]


def test_heading_gets_style_and_empty_anchor_with_slug():
    tree = parse(render_markdown("# Hello\n\nWorld"))
    (h1,) = find(tree, "h1")
    assert h1.attr["style"] == "font-size: 1.75em; margin: 1.2em 0 0.5em; line-height: 1.25;"
    anchor = h1.children[0]
    assert anchor.tag == "a" and anchor.all_text() == ""
    assert anchor.attr["href"] == "#hello" and anchor.attr["id"] == "hello"
    assert anchor.attr["aria-hidden"] == "true" and anchor.attr["class"] == "anchor"
    assert anchor.attr["style"] == STYLES["a"]
    assert h1.all_text() == "Hello"
    (paragraph,) = find(tree, "p")
    assert paragraph.all_text() == "World" and paragraph.attr["style"] == "margin: 0.6em 0;"


def test_heading_ids_follow_text_and_repeats_are_numbered():
    html = render_markdown("## Daily Briefing — May\n\n### Daily Briefing — May\n\n"
                           "# Daily Briefing — May\n\n# Über `code_x` & 42!")
    ids = [h.children[0].attr["id"] for h in parse(html).elements if h.tag in ("h1", "h2", "h3")]
    assert ids == ["daily-briefing--may", "daily-briefing--may-1", "daily-briefing--may-2",
                   "über-code_x--42"]


def test_table_is_styled_and_keeps_column_alignment():
    tree = parse(render_markdown("| a | b |\n|:--|--:|\n| 1 | 2 |\n"))
    (table,) = find(tree, "table")
    assert table.attr["style"] == STYLES["table"]
    assert [child.tag for child in table.children] == ["thead", "tbody"]
    th = find(tree, "th")
    td = find(tree, "td")
    assert [cell.all_text() for cell in th] == ["a", "b"]
    assert [cell.all_text() for cell in td] == ["1", "2"]
    assert [cell.attr.get("align") for cell in th + td] == ["left", "right"] * 2
    assert th[0].attr["style"] == STYLES["th"]
    assert "text-align: right;" in th[1].attr["style"]  # the author's alignment wins
    assert all(cell.attr["style"] == STYLES["td"] for cell in td)


def test_task_list_items_render_disabled_checkboxes():
    html = render_markdown("- [x] shipped\n- [ ] pending\n")
    assert '<input type="checkbox" checked="" disabled="" /> shipped' in html
    assert '<input type="checkbox" disabled="" /> pending' in html
    items = find(parse(html), "li")
    assert [item.children[0].tag for item in items] == ["input", "input"]
    assert [("checked" in item.children[0].attr) for item in items] == [True, False]


def test_strikethrough_becomes_del():
    (deleted,) = find(parse(render_markdown("~~gone~~ kept")), "del")
    assert deleted.all_text() == "gone" and "style" not in deleted.attr


def test_bare_urls_www_and_addresses_become_styled_links():
    html = render_markdown("See https://example.com/a?b=1. Or www.example.org, "
                           "or write to bob@example.com (https://x.example/y).")
    links = find(parse(html), "a")
    assert [(link.attr["href"], link.all_text()) for link in links] == [
        ("https://example.com/a?b=1", "https://example.com/a?b=1"),
        ("http://www.example.org", "www.example.org"),
        ("mailto:bob@example.com", "bob@example.com"),
        ("https://x.example/y", "https://x.example/y"),
    ]
    assert all(link.attr["style"] == STYLES["a"] for link in links)


def test_dangerous_link_schemes_are_not_links():
    html = render_markdown("[x](javascript:alert(1)) <vbscript:foo>")
    assert not find(parse(html), "a")


def test_footnotes_have_reference_and_definition_structure():
    html = render_markdown("Claim[^src] and more[^two].\n\n[^src]: The source.\n"
                           "[^unused]: Never cited.\n[^two]: Second.\n")
    tree = parse(html)
    refs = [sup for sup in find(tree, "sup") if sup.attr.get("class") == "footnote-ref"]
    first = refs[0].children[0]
    assert first.attr["href"] == "#fn-src" and first.attr["id"] == "fnref-src"
    assert "data-footnote-ref" in first.attr and first.all_text() == "1"
    assert refs[1].children[0].all_text() == "2"
    (section,) = find(tree, "section")
    assert section.attr["class"] == "footnotes" and "data-footnotes" in section.attr
    (ordered,) = section.children
    assert ordered.tag == "ol"
    assert [item.attr["id"] for item in ordered.children] == ["fn-src", "fn-two"]
    backrefs = [a for a in find(tree, "a") if a.attr.get("class") == "footnote-backref"]
    assert backrefs[0].attr["href"] == "#fnref-src" and backrefs[0].all_text() == "\u21a9"
    assert "Never cited" not in html


def test_fenced_code_keeps_language_class_and_escapes_content():
    tree = parse(render_markdown("```python\nif a < b:\n    pass\n```\n\nuse `x<y`"))
    (pre,) = find(tree, "pre")
    block_code, inline = find(tree, "code")
    assert block_code.parent is pre
    assert block_code.tag == "code" and block_code.attr["class"] == "language-python"
    assert block_code.all_text() == "if a < b:\n    pass\n"
    assert pre.attr["style"] == STYLES["pre"] and block_code.attr["style"] == STYLES["code"]
    assert inline.all_text() == "x<y" and inline.attr["style"] == STYLES["code"]


def test_raw_html_never_passes():
    html = render_markdown("Some <b>bold</b> words.\n\n<div onclick=\"x()\">\nblock\n</div>\n\n"
                           "<script>alert(1)</script>\n\ninline <script>alert(2)</script> end "
                           "<img src=x onerror=alert(3)>")
    tree = parse(html)
    assert {element.tag for element in tree.elements} == {"p"}
    assert "alert(" not in html and "onclick" not in html and "block" not in html
    assert tree.comments and set(tree.comments) == {" raw HTML omitted "}
    assert find(tree, "p")[0].all_text() == "Some bold words."
    assert "end" in find(tree, "p")[1].all_text()


def test_every_listed_element_carries_its_style_last():
    source = ("# H1\n## H2\n### H3\n#### H4\n##### H5\n\n> quote\n\n1. one\n\n- two\n\n---\n\n"
              "[link](https://example.com) `code`\n\n```\npre\n```\n\n| t |\n|---|\n| d |\n")
    tree = parse(render_markdown(source))
    styled = [element for element in tree.elements if element.tag in STYLES]
    assert {element.tag for element in styled} == set(STYLES)
    for element in styled:
        assert element.attrs[-1] == ("style", STYLES[element.tag]), element.tag
    unstyled = [element for element in tree.elements if element.tag not in STYLES]
    assert unstyled and all("style" not in element.attr for element in unstyled)


def test_output_is_a_self_contained_fragment():
    source = "# Report\n\nhttps://example.com\n\n| a |\n|---|\n| b |\n\n- [ ] x\n"
    html = render_markdown(source)
    tags = {element.tag for element in parse(html).elements}
    assert not tags & {"html", "head", "body", "style", "link", "script", "iframe", "img"}
    assert "src=" not in html and "@import" not in html


def test_void_elements_use_xhtml_form():
    assert render_markdown("---") == f'<hr style="{STYLES["hr"]}" />\n'
    assert "line one<br />\nline two" in render_markdown("line one  \nline two")


def test_rendering_is_deterministic_across_processes():
    source = ("# Title\n\nText[^a] with https://example.com and a table:\n\n| x | y |\n|---|---|"
              "\n| 1 | 2 |\n\n- [x] done\n\n[^a]: note\n")
    script = ("import sys; from aimx.mail.render import render_markdown; "
              "sys.stdout.buffer.write(render_markdown(sys.stdin.read()).encode())")
    outputs = set()
    for seed in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", script], input=source.encode(),
                              capture_output=True, check=True, timeout=60,
                              env={**os.environ, "PYTHONHASHSEED": seed})
        outputs.add(done.stdout)
    outputs.add(render_markdown(source).encode())
    outputs.add(render_markdown(source).encode())
    assert len(outputs) == 1
