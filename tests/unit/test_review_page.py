"""The review page's server side (stub engine): Markdown and math rendered to sanitized HTML, the guidelines,
the facts shown with each answer, and reviewers' names from the key file."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from service.auth import KeyRing
from service.review import render
from service.review.store import answer_facts
from tests.unit.conftest import ADMIN_KEY, REVIEWER_KEY, STUDENT_KEY
from zephyr.settings import Settings

CHAT = "/v1/chat/completions"
REVIEWER = {"Authorization": f"Bearer {REVIEWER_KEY}"}

HOSTILE = [
    '<script>window.__owned = 1</script>',
    '<img src=x onerror="window.__owned = 1">',
    '[click](javascript:alert(1))',
    '[click](JaVaScRiPt:alert(1))',
    '<a href="javascript:alert(1)">click</a>',
    '![x](javascript:alert(1))',
    '[data](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)',
    '<svg onload="alert(1)"><circle r="1"/></svg>',
    '<math><mtext><table><mglyph><style><img src=x onerror=alert(1)></style></mglyph></table></mtext></math>',
    '<iframe src="https://example.org"></iframe>',
    '<div style="position:fixed;inset:0">cover</div>',
    '$x$ <span class="answer" onclick="alert(1)">dress-up</span>',
]


class Elements(HTMLParser):
    """Every element and attribute in an HTML fragment, as a browser's parser would see them."""

    def __init__(self, fragment: str):
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.feed(fragment)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))


def assert_harmless(fragment: str) -> None:
    for tag, attrs in Elements(fragment).elements:
        assert tag not in {"script", "style", "img", "svg", "iframe", "object", "embed", "form", "mglyph"}, fragment
        for name, value in attrs.items():
            assert not name.startswith("on") and name not in {"style", "src", "srcdoc", "id"}, fragment
            if name == "href":
                assert value.split(":", 1)[0].lower() in {"http", "https", "mailto"}, fragment
            if name == "class":
                assert set(value.split()) <= {"math", "inline", "block", "math-error", ""}, fragment


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_text_renders_as_harmless_html(text):
    assert_harmless(render.to_html(text))
    assert_harmless(render.sanitize(text))  # the sanitizer alone, on raw HTML (markdown-it escapes it first)


def test_the_sanitizer_removes_script_handlers_and_javascript_links():
    cleaned = render.sanitize('<p onclick="x()">hi<script>alert(1)</script><img src=x onerror=alert(1)>'
                              '<a href="javascript:alert(1)">j</a><a href="https://example.org">k</a></p>')
    assert "<script" not in cleaned and "alert" not in cleaned and "onerror" not in cleaned
    assert "onclick" not in cleaned and "javascript:" not in cleaned and "<img" not in cleaned
    assert '<a href="https://example.org" target="_blank" rel="noopener noreferrer nofollow">k</a>' in cleaned


def test_raw_html_in_markdown_stays_text():
    html = render.to_html('Is <b>this</b> bold? <script>window.__owned = "x"</script>')
    assert Elements(html).elements == [("p", {})]
    assert "&lt;b&gt;this&lt;/b&gt;" in html and "&lt;script&gt;" in html


def test_markdown_code_and_math_render():
    html = render.to_html("# Energy\n\n**Mass** and `E` are related:\n\n$$E = mc^2$$\n\nInline $a^2 + b^2$, "
                          "\\(\\frac{1}{2}\\) and \\[\\sqrt{x}\\].\n\n```python\nprint('hi')\n```\n\n"
                          "| a | b |\n|---|---|\n| 1 | 2 |\n")
    tags = [tag for tag, _ in Elements(html).elements]
    for tag in ("h1", "strong", "code", "pre", "table", "td", "math", "msup", "mfrac", "msqrt"):
        assert tag in tags, (tag, html)
    assert tags.count("math") == 4
    assert '<math display="block">' in html and '<math display="inline">' in html
    assert "print(&#39;hi&#39;)" in html or "print('hi')" in html
    assert_harmless(html)


def test_unreadable_latex_shows_its_source_and_prices_stay_text():
    html = render.to_html(r"Broken $x^$ and $<b> \left($ here. It costs $5 and $6.")
    assert '<code class="math-error">x^</code>' in html
    assert '<code class="math-error">&lt;b&gt; \\left(</code>' in html
    assert "It costs $5 and $6." in html
    assert_harmless(html)


def test_an_image_becomes_a_visible_link():
    html = render.to_html("![a cell](https://example.org/cell.png)")
    assert Elements(html).elements[1] == ("a", {"href": "https://example.org/cell.png", "target": "_blank",
                                                "rel": "noopener noreferrer nofollow"})
    assert "[image: a cell]" in html


def test_text_in_a_formula_is_shown_as_written_not_taken_for_tags():
    html = render.to_html(r"$\text{a<b and c>d & e}$ and $\mbox{x<y}$")
    assert "a&lt;b&nbsp;and&nbsp;c&gt;d&nbsp;&amp;&nbsp;e" in html and "x&lt;y" in html
    assert_harmless(html)


@pytest.mark.parametrize("latex", [r"\phantom{hidden}", r"\rlap{over}", r"\hspace{100000em}", r"\rule{9999em}{9999em}",
                                   r"\mathsize{999em}"])
def test_a_formula_cannot_hide_text_or_push_the_page_away(latex):
    html = render.to_html(f"${latex}$ tail")
    assert "mphantom" not in html and "mpadded" not in html
    for value in __import__("re").findall(r'(?:width|height|depth|mathsize)="([^"]*)"', html):
        assert not value.endswith("em") or float(value[:-2]) <= render.MAX_LENGTH["em"], html
    assert "tail" in html
    # A modest space stays.
    assert 'width="1em"' in render.to_html(r"$a\hspace{1em}b$")


@pytest.mark.parametrize(("value", "kept"), [
    ("1em", "1em"), ("-.5mu", "-.5mu"), (" 2 em ", " 2 em "), ("3", "3"), ("big", "big"), ("99em", None),
    ("3.", None), ("1" * 50_000 + "x", None), ("1" + " " * 50_000 + "x", None),
    ("1" + " " * 50_000 + "em", "1" + " " * 50_000 + "em"),
])
def test_a_length_is_read_once_however_long_its_digits_or_blanks(value, kept):
    # digit and blank runs were split two ways by the pattern (quadratic: 40k blanks took 7 s)
    assert render._bounded_length("mspace", "width", value) == kept


def test_an_unclosed_math_opener_is_not_searched_for_its_closer_again_and_again():
    """A student's message of many `\\(` and no `\\)` made texmath's rule search the rest of the text at every
    opener: quadratic, 35 s for 120 KB, and the queue renders an item on each request. The guard knows from one
    reverse search per paragraph that no closer follows, so texmath's rule is never asked."""
    md = render._markdown()
    guarded = next(rule.fn for rule in md.inline.ruler.__rules__ if rule.fn.__name__ == "guarded")
    cell = guarded.__closure__[guarded.__code__.co_freevars.index("rule")]
    texmath_rule, asked = cell.cell_contents, []

    def counting(state, silent):
        asked.append(state.pos)
        return texmath_rule(state, silent)

    cell.cell_contents = counting
    try:
        env: dict = {}
        md.parse("\\( " * 2000, env)
        assert asked == [] and len(env) == 1  # one reverse search for `\\)`, none per opener
        md.parse("\\( " * 3 + "\\(x\\)", {})
        assert asked  # with a closer, the rule does its work
    finally:
        cell.cell_contents = texmath_rule
    assert "<math" in render.to_html("\\( " * 3 + "\\(x\\)")


def test_a_text_too_long_to_render_is_shown_plain():
    text = "<b>x</b> $y$ " * (render.MAX_MARKDOWN_CHARS // 10)
    html = render.to_html(text)
    assert html.startswith('<pre class="plain">') and "&lt;b&gt;" in html and "<math" not in html


# Items, guidelines and names over HTTP --------------------------------------------------------------------------

async def judged_items(served):
    await served.app.state.tutor.candidates.idle()
    await served.flushed_log()


async def test_an_answer_that_loops_is_marked_for_the_reviewer(app_factory):
    async with app_factory(review_share=1.0) as served:
        served.engine.reply = "Atoms are small. " + "They are made up of atoms. " * 8
        r = await served.client.post(CHAT, json={"messages": [{"role": "user", "content": "atoms?"}]})
        assert r.status_code == 200
        await judged_items(served)
        item = (await served.client.get("/review/api/next", headers=REVIEWER)).json()["item"]
        assert item["answers"] and all(answer["looping"] is True for answer in item["answers"])


def test_rows_logged_before_the_log_judged_loops_are_judged_for_the_reviewer():
    stuck = "They are made up of atoms. " * 8
    old_row = {"response": [{"index": 0, "content": stuck, "finish_reason": "length"}], "completion_tokens": 64,
               "params": {"max_tokens": 64}}
    assert answer_facts(old_row)["looping"] is True
    old_row["response"][0]["content"] = "Plants make sugar from light."
    assert answer_facts(old_row)["looping"] is False
    # A logged verdict is kept as it is.
    assert answer_facts({**old_row, "response": [{**old_row["response"][0], "looping": True}]})["looping"] is True


async def test_an_item_carries_rendered_html_and_its_answers_facts(app_factory):
    async with app_factory(review_share=1.0) as served:
        served.engine.reply = "Use **Newton's** law: $F = ma$. <script>alert(1)</script>"
        r = await served.client.post(CHAT, json={"messages": [
            {"role": "system", "content": "Be *brief*."}, {"role": "user", "content": "What is `F`?"}],
            "max_tokens": 5})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        await judged_items(served)
        body = (await served.client.get("/review/api/next", headers=REVIEWER)).json()
        item = body["item"]
        system, user = item["conversation"]
        assert system["content"] == "Be *brief*." and system["html"] == "<p>Be <em>brief</em>.</p>\n"
        assert user["html"] == "<p>What is <code>F</code>?</p>\n"
        for answer in item["answers"]:
            assert answer["finish_reason"] == "length" and answer["tokens"] == 5 and answer["max_tokens"] == 5
            assert answer["looping"] is False
            assert answer["text"] and answer["html"].startswith("<p>")
            assert_harmless(answer["html"])
        assert item["created_at"].endswith("+00:00")
        # Undo shows the item again, rendered the same way.
        await served.client.post("/review/api/verdicts", headers=REVIEWER,
                                 json={"assignment_id": item["assignment_id"], "verdict": "tie"})
        again = (await served.client.post("/review/api/undo", headers=REVIEWER)).json()["item"]
        assert again["answers"] == item["answers"] and again["conversation"] == item["conversation"]


async def test_guidelines_default_and_operator_file(app_factory, tmp_path):
    async with app_factory() as served:
        assert (await served.client.get("/review/api/guidelines", headers={"Authorization": ""})).status_code == 401
        student = await served.client.get("/review/api/guidelines")
        assert student.status_code == 403
        shipped = (await served.client.get("/review/api/guidelines", headers=REVIEWER)).json()
        for term in ("slightly better", "clearly better", "much better", "far better", "incorrect", "unsafe",
                     "gives the answer away", "off-topic"):
            assert term in shipped["source"] and term in shipped["html"]
        assert "<table>" in shipped["html"]

    own = tmp_path / "ours.md"
    own.write_text("# Our rules\n\nA *slight* edge is `1`. <script>alert(1)</script>\n")
    async with app_factory(review_guidelines=own) as served:
        ours = (await served.client.get("/review/api/guidelines", headers=REVIEWER)).json()
        assert ours["source"] == own.read_text()
        assert ours["html"].startswith("<h1>Our rules</h1>") and "<script" not in ours["html"]
        own.write_text("# Edited while running\n")  # read at each request
        assert (await served.client.get("/review/api/guidelines", headers=REVIEWER)).json()["html"] == (
            "<h1>Edited while running</h1>\n")
        own.unlink()
        gone = await served.client.get("/review/api/guidelines", headers=REVIEWER)
        assert gone.status_code == 503 and gone.json()["error"]["code"] == "guidelines_unavailable"


def test_a_missing_guidelines_file_stops_the_start(settings_factory, tmp_path, tokenizer):
    from service.app import create_app
    from tests.unit.stub_engine import StubEngine

    with pytest.raises(ValueError, match="ZEPHYR_REVIEW_GUIDELINES=.*missing.md is not a file"):
        create_app(settings_factory(review_guidelines=tmp_path / "missing.md"), StubEngine.factory(tokenizer))


def test_key_entries_take_an_optional_name_and_keep_their_old_meaning(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# role:key or name=role:key\nreviewer:plain-key\nAda  Lovelace=reviewer:k:with:colons\n"
                    "admin:abc==\nGrace = admin : base64key== \n")
    settings = Settings(api_keys="student:s1,Bob=reviewer:b=1", api_keys_file=keys, min_api_key_chars=1)
    assert settings.api_key_entries == [
        ("student", "s1", None), ("reviewer", "b=1", "Bob"), ("reviewer", "plain-key", None),
        ("reviewer", "k:with:colons", "Ada Lovelace"), ("admin", "abc==", None), ("admin", "base64key==", "Grace")]
    with pytest.raises(ValueError, match="name=role:key"):
        _ = Settings(api_keys="Bob=boss:key").api_key_entries
    with pytest.raises(ValueError, match="longer than 64"):
        _ = Settings(api_keys=f"{'x' * 65}=reviewer:key").api_key_entries
    # A bare key (no role) is named by its place, never quoted: the message reaches start-up logs and pod events.
    with pytest.raises(ValueError, match="ZEPHYR_API_KEYS entry 2 ") as refused:
        _ = Settings(api_keys="student:s1,sk-live-0123456789abcdef", min_api_key_chars=1).api_key_entries
    assert "sk-" not in str(refused.value)
    keys.write_text("# comment\nsk-live-0123456789abcdef\n")
    with pytest.raises(ValueError, match="ZEPHYR_API_KEYS_FILE line 2 ") as refused:
        _ = Settings(api_keys="", api_keys_file=keys).api_key_entries
    assert "sk-" not in str(refused.value)


def test_a_key_no_client_can_send_as_typed_is_refused_and_one_outside_ascii_warned_of(caplog):
    """A control character is no key anyone types; a key outside ASCII signs in on the review page (JSON) but not
    in an Authorization header, which the server reads as Latin-1."""
    with pytest.raises(ValueError, match="ZEPHYR_API_KEYS entry 1: its key holds a character that is not") as no:
        _ = Settings(api_keys="student:tab\there-0123456789").api_key_entries
    assert "0123456789" not in str(no.value)
    entries = Settings(api_keys="reviewer:prüfer-2024-abcdefghij").api_key_entries
    assert entries == [("reviewer", "prüfer-2024-abcdefghij", None)]
    assert "ZEPHYR_API_KEYS entry 1: its key holds characters outside ASCII" in caplog.text
    assert "prüfer" not in caplog.text


def test_a_key_short_enough_to_guess_is_refused_by_its_place(tmp_path):
    with pytest.raises(ValueError, match="ZEPHYR_API_KEYS entry 2: its key is shorter than 16 characters") as refused:
        _ = Settings(api_keys="student:0123456789abcdef,reviewer:0123456789abcde").api_key_entries
    assert "0123456789abcde" not in str(refused.value) and "token_urlsafe" in str(refused.value)
    keys = tmp_path / "keys"
    keys.write_text("reviewer:hunter2\n")
    with pytest.raises(ValueError, match="ZEPHYR_API_KEYS_FILE line 1: its key is shorter than 20"):
        _ = Settings(api_keys_file=keys, min_api_key_chars=20).api_key_entries
    assert Settings(api_keys_file=keys, min_api_key_chars=7).api_key_entries == [("reviewer", "hunter2", None)]


def test_names_are_kept_by_digest_and_a_shared_name_stays_distinct():
    ring = KeyRing([("reviewer", "k1", "Ada"), ("reviewer", "k2", "Sam"), ("admin", "k3", "Sam"),
                    ("reviewer", "k4", None)], b"s" * 32)
    d1, d2, d3, d4 = (ring.digest(k) for k in ("k1", "k2", "k3", "k4"))
    assert ring.names == {d1: "Ada", d2: f"Sam ({d2[:8]})", d3: f"Sam ({d3[:8]})"}
    assert not {"k1", "k2", "k3", "k4"} & (set(ring.names) | set(ring.names.values()))  # never the key


async def test_reviewers_are_shown_by_name(app_factory):
    keys = f"student:{STUDENT_KEY},Ada Lovelace=reviewer:{REVIEWER_KEY},admin:{ADMIN_KEY}"
    async with app_factory(api_keys=keys, review_share=1.0, review_overlap=2) as served:
        signed = await served.client.post("/review/session", json={"key": REVIEWER_KEY})
        assert signed.json() == {"reviewer": "Ada Lovelace", "role": "reviewer"}
        assert (await served.client.get("/review/api/me", headers=REVIEWER)).json()["reviewer"] == "Ada Lovelace"
        for question in ("What is a cell?", "What is an atom?"):
            await served.client.post(CHAT, json={"messages": [{"role": "user", "content": question}],
                                                 "max_tokens": 8})
        await judged_items(served)
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        for headers, verdict in ((REVIEWER, "tie"), (admin, "both_bad")):
            item = (await served.client.get("/review/api/next", headers=headers)).json()["item"]
            await served.client.post("/review/api/verdicts", headers=headers,
                                     json={"assignment_id": item["assignment_id"], "verdict": verdict})
        skipped = (await served.client.get("/review/api/next", headers=REVIEWER)).json()["item"]
        await served.client.post("/review/api/skip", headers=REVIEWER, json={"assignment_id": skipped["assignment_id"]})
        stats = (await served.client.get("/review/stats", headers=admin)).json()
        unnamed = served.app.state.keyring.digest(ADMIN_KEY)[:8]
        assert sorted(stats["reviewers"], key=lambda r: r["judged"] + r["skipped"]) == [
            {"reviewer": unnamed, "judged": 1, "skipped": 0}, {"reviewer": "Ada Lovelace", "judged": 1, "skipped": 1}]
        # A reviewer sees the team's figures and their own name, not who else judged how much.
        admin_view = stats
        stats = (await served.client.get("/review/stats", headers=REVIEWER)).json()
        assert sorted(stats["reviewers"], key=lambda r: r["judged"] + r["skipped"]) == [
            {"reviewer": "reviewer 1", "judged": 1, "skipped": 0},
            {"reviewer": "Ada Lovelace", "judged": 1, "skipped": 1}]
        # Blind A/B: which model won, or served-vs-candidate counts moving after one's verdict, is an admin's.
        assert isinstance(admin_view["win_rate"], list) and "served" in admin_view["labels"]
        assert stats["win_rate"] is None and not {"served", "candidate"} & set(stats["labels"])
        assert stats["labels"]["one_preferred"] == admin_view["labels"]["served"] + admin_view["labels"]["candidate"]


def test_only_short_texts_are_kept_rendered():
    """A student can queue long texts of formulas: the cache holds short texts only, so its size stays bounded in
    bytes; long ones render the same, every time."""
    render._cached_html.cache_clear()
    short, long = "Inline $a^2$.", "$x_1$ and " * (render.CACHED_CHARS // 10 + 1)
    assert render.to_html(short) == render.to_html(short)
    assert "<math" in render.to_html(long) and render.to_html(long) == render.to_html(long)
    assert "plain" in render.to_html("x" * (render.MAX_MARKDOWN_CHARS + 1))
    assert render._cached_html.cache_info().currsize == 1
