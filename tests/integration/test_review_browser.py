"""The review page in a real browser (Debian's Chromium driven by Playwright) on the real server: real vLLM
answers and their candidates, a reviewer judging with mouse and keyboard, undo, live statistics, untrusted
text shown as text, and the export holding exactly the verdicts given."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from typer.testing import CliRunner

from cli.app import app as cli
from tests.integration.conftest import REVIEWER_KEY, STUDENT_KEY
from tests.review_data import pair

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
HOSTILE_QUESTION = 'Is <b>this</b> bold? <script>window.__owned = "question"</script>'
HOSTILE_ANSWER = '<script>window.__owned = "answer"</script> and <img src=x onerror="window.__owned = \'img\'">'


@pytest.fixture(scope="module")
def review_items(server):
    """Three items: one whose texts are hostile HTML (stored as a model could have written it), then two real
    chats marked for review, each with a candidate the server makes after answering."""
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it with scripts/chromium-for-tests.sh")
        pytest.skip("needs Debian's chromium (bash scripts/chromium-for-tests.sh)")
    db = server.home / "zephyr.db"
    hostile = pair("hostile-item", HOSTILE_QUESTION, HOSTILE_ANSWER, "A plain, harmless answer.")
    for row in hostile:
        row["created_at"] = datetime.now(UTC) - timedelta(hours=1)  # oldest: shown first
    with sqlite3.connect(db) as conn:
        for row in hostile:
            values = {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()}
            values["created_at"] = row["created_at"].strftime("%Y-%m-%d %H:%M:%S.%f")
            conn.execute(f"INSERT INTO generations ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                         list(values.values()))
    ids = ["hostile-item"]
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {STUDENT_KEY}",
                                                    "X-Zephyr-Review": "true"}, timeout=120) as http:
        for question in ("Why do we have seasons?", "What does a mitochondrion do?"):
            reply = http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": question}], "max_tokens": 40, "temperature": 0})
            assert reply.status_code == 200
            ids.append(reply.json()["id"])
    for _ in range(240):  # the candidates come after the answers
        with sqlite3.connect(db) as conn:
            done = conn.execute(f"SELECT count(*) FROM generations WHERE parent_id IN ({', '.join('?' * 2)}) "
                                "AND status = 'ok'", ids[1:]).fetchone()[0]
        if done == 2:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"review candidates were not made:\n{server.log_tail()}")
    return ids


def export(server, fmt: str, tmp_path) -> list[dict]:
    out = tmp_path / f"{fmt}.jsonl"
    result = CliRunner().invoke(cli, ["review", "export", "--format", fmt, "--out", str(out)],
                                env={"ZEPHYR_HOME": str(server.home)})
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in out.read_text().splitlines()]


async def test_reviewer_judges_undoes_and_exports(server, review_items, tmp_path):
    from playwright.async_api import async_playwright, expect

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(f"{server.url}/review")

        # Sign in: a student key is refused, the reviewer key is accepted.
        await page.fill("#key", STUDENT_KEY)
        await page.click("#sign-in-form button")
        await expect(page.locator("#sign-in-error")).to_contain_text("needs a reviewer key")
        await page.fill("#key", REVIEWER_KEY)
        await page.click("#sign-in-form button")
        await expect(page.locator("#progress")).to_have_text("0 judged · 2 waiting")

        # Item 1: hostile text is shown as text and runs nothing.
        item = page.locator("#item")
        await expect(item).to_have_attribute("data-item-id", "hostile-item")
        await expect(page.locator("#conversation")).to_contain_text("<script>window.__owned")
        answers = page.locator("#answers .answer .text")
        texts = await answers.all_inner_texts()
        assert HOSTILE_ANSWER in texts
        assert await page.locator("#answers img, #conversation img, #conversation b").count() == 0
        assert await page.evaluate("window.__owned") is None
        hostile_is_a = texts[0] == HOSTILE_ANSWER
        # With the mouse: the plain answer is better (strength 3) and the hostile one is flagged unsafe.
        await page.click('#verdicts button[data-verdict="b"]' if hostile_is_a else '#verdicts button[data-verdict="a"]')
        await page.check('#strengths input[value="3"]')
        await page.check(f'input[data-answer="{"A" if hostile_is_a else "B"}"][data-flag="unsafe"]')
        await page.fill("#comment", "script in the answer")
        await page.click("#submit")
        await expect(page.locator("#progress")).to_have_text("1 judged · 1 waiting")
        await expect(page.locator('dd[data-stat="verdicts"]')).to_have_text("1")

        # Item 2, keyboard only: B better, strength 2, flag A incorrect, submit.
        await expect(item).to_have_attribute("data-item-id", review_items[1])
        second = await answers.all_inner_texts()
        for key in ("b", "2", "i", "Enter"):
            await page.keyboard.press(key)
        await expect(page.locator("#progress")).to_have_text("2 judged · 0 waiting")

        # Item 3, keyboard: tie; then undo it and judge it again as both bad.
        await expect(item).to_have_attribute("data-item-id", review_items[2])
        for key in ("t", "Enter"):
            await page.keyboard.press(key)
        await expect(page.locator('dd[data-stat="verdicts"]')).to_have_text("3")
        await expect(page.locator("#empty")).to_be_visible()
        await page.keyboard.press("z")
        await expect(item).to_have_attribute("data-item-id", review_items[2])
        await expect(page.locator("#progress")).to_have_text("2 judged · 0 waiting")
        await expect(page.locator('dd[data-stat="verdicts"]')).to_have_text("2")
        await page.click('#verdicts button[data-verdict="both_bad"]')
        await page.keyboard.press("Enter")
        await expect(page.locator('dd[data-stat="verdicts"]')).to_have_text("3")
        await expect(page.locator("#chart-flags")).to_contain_text("unsafe")
        stats = await page.locator("#chart-win").inner_text()
        assert "smollm2-135m-instruct" in stats
        assert errors == [] and await page.evaluate("window.__owned") is None
        await browser.close()

    # The export holds exactly those verdicts.
    dpo = await asyncio.to_thread(export, server, "dpo", tmp_path)
    assert [r["meta"]["item_ids"] for r in dpo] == [["hostile-item"], [review_items[1]]]
    assert dpo[0]["chosen"][0]["content"] == "A plain, harmless answer."
    assert dpo[0]["rejected"][0]["content"] == HOSTILE_ANSWER
    assert dpo[1]["chosen"][0]["content"] == second[1] and dpo[1]["rejected"][0]["content"] == second[0]
    assert all(r["meta"]["reviewers"] == 1 and r["meta"]["agreement"] == 1.0 for r in dpo)
    kto = await asyncio.to_thread(export, server, "kto", tmp_path)
    assert [(r["meta"]["item_ids"][0], r["label"]) for r in kto] == [
        ("hostile-item", True), ("hostile-item", False), (review_items[1], True), (review_items[1], False),
        (review_items[2], False), (review_items[2], False)]
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        stats = (await http.get("/review/stats", headers={"Authorization": f"Bearer {REVIEWER_KEY}"})).json()
    assert stats["verdicts"] == 3 and stats["labels"]["both_bad"] == 1 and stats["labels"]["tie"] == 0
    assert stats["flags"]["unsafe"] == 1 and stats["flags"]["incorrect"] == 1
