// The review page. Model and student text reaches the page in two forms: the raw text, always set with
// textContent, and HTML the server rendered from its Markdown and sanitized (service/review/render.py), which
// enters the page only through setSanitizedHTML and the Trusted Types policy the page's CSP names.
"use strict";

const FLAGS = [
  ["incorrect", "incorrect", "i"],
  ["unsafe", "unsafe", "u"],
  ["gives_answer", "gives the answer away", "v"],
  ["off_topic", "off-topic", "o"],
];
const PAIR_VERDICTS = [["a", "A better", "a"], ["b", "B better", "b"], ["tie", "Tie", "t"], ["both_bad", "Both bad", "x"]];
const SINGLE_VERDICTS = [["good", "Good", "g"], ["bad", "Bad", "x"]];
const STRENGTH_NAMES = { 1: "1 slightly", 2: "2 clearly", 3: "3 much", 4: "4 far better" };
const FLAG_NAMES = Object.fromEntries(FLAGS.map(([name, title]) => [name, title]));
// A message longer than this is shown collapsed, with its first words and its length.
const COLLAPSE_CHARS = 600;
const COLLAPSE_LINES = 12;
// An empty queue asks again this often (a plain GET: works behind any proxy and on every replica).
const POLL_MS = 4000;
// A request the server has not answered by then is given up, and the reviewer told: a hung request would leave the
// page waiting for good, every key ignored (one action at a time).
const REQUEST_MS = 30000;
const NARROW = window.matchMedia("(max-width: 700px)");

// `drafts`: what was typed on an item the page left (an undo, a lost sign-in), by assignment, given back when the
// item returns.
const state = { signedIn: false, item: null, verdict: null, poll: null, busy: false, drafts: new Map(), ended: "" };
const $ = (id) => document.getElementById(id);

// One verdict, skip or undo at a time: Enter then `s` before the save returns would send both for the same item
// (the server refuses the second with a 409; this keeps the reviewer from seeing it).
async function exclusive(action) {
  if (state.busy) return;
  state.busy = true;
  try {
    await action();
  } finally {
    state.busy = false;
  }
}

const htmlPolicy = window.trustedTypes
  ? window.trustedTypes.createPolicy("zephyr-review", { createHTML: (html) => html })
  : { createHTML: (html) => html };

// The one place HTML enters the page: only ever the server's sanitized rendering.
function setSanitizedHTML(node, html) {
  node.innerHTML = htmlPolicy.createHTML(html);
}

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function api(method, path, body) {
  // A controller and a timer, not AbortSignal.timeout: a school's older iPad (Safari 15) has no such function.
  // The body is read within the same limit: a server that sends its headers and then stalls is given up on too.
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), REQUEST_MS);
  const noAnswer = () => { // status 0: neither a refusal nor a lost sign-in
    const saving = method !== "GET" ? " (it may have been saved: the page will say when you submit again)" : "";
    const failure = new Error(controller.signal.aborted
      ? `The server did not answer within ${REQUEST_MS / 1000} s${saving}; try again`
      : "The server could not be reached; try again");
    failure.status = 0;
    return failure;
  };
  let response;
  let data = null;
  try {
    response = await fetch(path, {
      method,
      credentials: "same-origin",
      headers: body === undefined ? {} : { "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: controller.signal,
    });
    if (response.status !== 204) {
      data = await response.json().catch((error) => {
        if (controller.signal.aborted) throw error;
        return {}; // a body that is no JSON (a proxy's error page): the status says what happened
      });
    }
  } catch (error) {
    throw noAnswer();
  } finally {
    clearTimeout(timer);
  }
  if (!response.ok) {
    const error = new Error((data && data.error && data.error.message) || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

function say(text, isError = false) {
  const message = $("message");
  message.textContent = text;
  message.classList.toggle("error", isError);
}

function showProgress(progress) {
  $("progress").textContent = `${progress.judged} judged · ${progress.waiting} waiting`;
}

// Text -------------------------------------------------------------------------------------------

// Rendered Markdown and, hidden until "show source", the raw text: both in the page, so the toggle is instant.
function textBlock(raw, html, attrs = {}) {
  const block = el("div", { class: "text", dir: "auto", ...attrs });
  const rendered = el("div", { class: "rendered md" });
  setSanitizedHTML(rendered, html);
  block.append(rendered, el("pre", { class: "source" }, raw));
  return block;
}

const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

function isLong(text) {
  return text.length > COLLAPSE_CHARS || text.split("\n").length > COLLAPSE_LINES;
}

function renderMessage(message) {
  const content = message.content || "";
  const li = el("li", { class: `turn ${message.role}` });
  const role = el("span", { class: "role" }, message.role);
  const body = textBlock(content, message.html || "");
  if ((message.role === "system" || message.role === "user") && isLong(content)) {
    const details = el("details", { class: "collapsed-turn" });
    const summary = el("summary");
    const preview = content.replace(/\s+/g, " ").slice(0, 120);
    summary.append(role, el("span", { class: "preview", dir: "auto" }, `${preview}…`),
      el("span", { class: "length" }, ` (${plural(content.length, "character")}; click to show all)`));
    details.append(summary, body);
    li.append(details);
  } else {
    li.append(role, body);
  }
  return li;
}

function answerFacts(answer) {
  const facts = el("p", { class: "facts" });
  const text = answer.text || "";
  const words = text.trim() ? text.trim().split(/\s+/).length : 0;
  const parts = [plural(words, "word"), plural(text.length, "character")];
  if (answer.tokens !== null && answer.tokens !== undefined) parts.push(plural(answer.tokens, "token"));
  facts.append(el("span", { class: "lengths" }, parts.join(" · ")));
  if (answer.finish_reason === "length") {
    const limit = answer.max_tokens ? ` (${answer.max_tokens})` : "";
    facts.append(el("span", { class: "badge cut-off", title: "The answer stopped at its token limit: it is unfinished." },
      `cut off at max_tokens${limit}`));
  }
  if (answer.finish_reason === "content_filter" && answer.answer_safety) {
    const category = answer.answer_safety.category.replace("_", "-");
    facts.append(el("span", { class: "badge guarded",
      title: "The safety guard stopped the model's answer at this sentence, then added its reply: \u201c" +
        answer.answer_safety.sentence + "\u201d. Was stopping it right? If the sentence was harmless, flag the " +
        "answer incorrect." },
      `answer stopped by the safety guard (${category})`));
  } else if (answer.finish_reason === "content_filter") {
    const category = answer.safety ? answer.safety.category.replace("_", "-") : "harmful";
    facts.append(el("span", { class: "badge guarded",
      title: "The safety guard judged the request " + category + " and answered it instead of the model. " +
        "Was refusing right? If the request was harmless, flag the answer incorrect." },
      `safety guard's reply (${category})`));
  }
  if (answer.looping) {
    facts.append(el("span", { class: "badge looping",
      title: "Half or more of its four-word sequences repeat an earlier one: the answer is stuck in a loop." },
      "repeats itself"));
  }
  return facts;
}

// Item ------------------------------------------------------------------------------------------

function renderItem(item) {
  state.item = item;
  state.verdict = null;
  $("verdict-form").reset();
  $("item").hidden = !item;
  $("empty").hidden = !!item;
  clearTimeout(state.poll);
  if (!item) {
    schedulePoll();
    return;
  }
  $("item").dataset.itemId = item.item_id;

  const created = new Date(item.created_at);
  const facts = $("item-facts");
  facts.dataset.createdAt = item.created_at;
  facts.textContent = `asked ${created.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" })}`;

  $("conversation").replaceChildren(...item.conversation.map(renderMessage));

  const answers = $("answers");
  answers.replaceChildren();
  answers.classList.toggle("single", item.kind === "single");
  for (const answer of item.answers) {
    const box = el("section", { class: "answer", "data-label": answer.label,
      "data-finish-reason": answer.finish_reason || "" });
    box.append(el("h3", {}, item.kind === "pair" ? `Answer ${answer.label}` : "Answer"));
    box.append(answerFacts(answer));
    // Focusable, so a keyboard reviewer can scroll a long answer with the arrow keys (Safari does not focus a
    // scrolling box by itself).
    box.append(textBlock(answer.text, answer.html || "", { "data-testid": `answer-${answer.label}`, tabindex: "0",
      role: "region", "aria-label": item.kind === "pair" ? `Answer ${answer.label}, text` : "Answer, text" }));
    // Named by answer: a screen reader moving between fields heard "incorrect (i)" twice, not whose it was.
    const flags = el("div", { class: "flags", role: "group",
      "aria-label": item.kind === "pair" ? `Flags on answer ${answer.label}` : "Flags on the answer" });
    for (const [name, title, key] of FLAGS) {
      const label = el("label");
      const box_ = el("input", { type: "checkbox", "data-answer": answer.label, "data-flag": name });
      const shortcut = answer.label === "B" ? key.toUpperCase() : key;
      label.append(box_, document.createTextNode(` ${title} (${shortcut})`));
      flags.append(label);
    }
    box.append(flags);
    answers.append(box);
  }
  linkScrolling([...answers.querySelectorAll(".answer > .text")]);

  const verdicts = $("verdicts");
  verdicts.querySelectorAll("button").forEach((b) => b.remove());
  for (const [value, title, key] of item.kind === "pair" ? PAIR_VERDICTS : SINGLE_VERDICTS) {
    const button = el("button", { type: "button", "data-verdict": value, "aria-pressed": "false" }, `${title} (${key})`);
    button.addEventListener("click", () => chooseVerdict(value));
    verdicts.append(button);
  }
  $("strengths").hidden = item.kind !== "pair";
  updateStrengths();
  restoreDraft(item.assignment_id);
  say("");
  // The focused verdict button or flag went with the last item: a screen reader would be left at the page's top.
  // The new item's heading takes the focus then (never from a field the reviewer is in).
  const focused = document.activeElement;
  if (!focused || focused === document.body || !focused.isConnected) $("item").querySelector("h2").focus();
}

// Side by side, the two answers scroll together (same share of their length), so the reviewer reads the same
// part of both. Stacked on a narrow screen, each scrolls on its own.
function linkScrolling(boxes) {
  if (boxes.length !== 2) return;
  let echo = null;
  for (const [from, to] of [boxes, [...boxes].reverse()]) {
    from.addEventListener("scroll", () => {
      if (NARROW.matches) return;
      if (echo === from) {
        echo = null;
        return;
      }
      const range = from.scrollHeight - from.clientHeight;
      const share = range > 0 ? from.scrollTop / range : 0;
      const target = Math.round(share * (to.scrollHeight - to.clientHeight));
      if (to.scrollTop !== target) {
        echo = to;
        to.scrollTop = target;
      }
    });
  }
}

function chooseVerdict(value) {
  state.verdict = value;
  for (const button of $("verdicts").querySelectorAll("button")) {
    button.setAttribute("aria-pressed", String(button.dataset.verdict === value));
  }
  updateStrengths();
}

// A strength may be given before the verdict: it is kept, and sent only with A better or B better.
function updateStrengths() {
  const applies = state.verdict === null || state.verdict === "a" || state.verdict === "b";
  $("strengths").classList.toggle("inactive", !applies);
  $("strengths").setAttribute("aria-disabled", String(!applies)); // dimmed only, it read as in force
}

function chooseStrength(value) {
  const input = $("strengths").querySelector(`input[value="${value}"]`);
  if (input && !$("strengths").hidden) input.checked = true;
}

function toggleFlag(answer, flag) {
  const box = $("answers").querySelector(`input[data-answer="${answer}"][data-flag="${flag}"]`);
  if (box) box.checked = !box.checked;
}

// What the reviewer has typed and chosen on the item shown, kept when the page must leave it unjudged.
function keepDraft() {
  if (!state.item) return;
  const strength = $("strengths").querySelector("input:checked");
  const flags = [...$("answers").querySelectorAll("input[type=checkbox]:checked")].map(
    (box) => [box.dataset.answer, box.dataset.flag]);
  const draft = { comment: $("comment").value, verdict: state.verdict, strength: strength && strength.value, flags };
  if (draft.comment || draft.verdict || draft.strength || flags.length) {
    state.drafts.set(state.item.assignment_id, draft);
  }
}

function restoreDraft(assignmentId) {
  const draft = state.drafts.get(assignmentId);
  if (!draft) return;
  state.drafts.delete(assignmentId);
  $("comment").value = draft.comment;
  if (draft.verdict) chooseVerdict(draft.verdict);
  if (draft.strength) chooseStrength(draft.strength);
  for (const [answer, flag] of draft.flags) toggleFlag(answer, flag);
}

async function submitVerdict() {
  return exclusive(async () => {
    if (!state.item) return;
    if (!state.verdict) return say("Choose a verdict first.", true);
    const prefers = state.verdict === "a" || state.verdict === "b";
    const chosen = $("strengths").querySelector("input:checked");
    const strength = prefers && chosen ? Number(chosen.value) : null;
    if (prefers && !strength) return say("Say how much better, 1 to 4.", true);
    const flags = {};
    for (const box of $("answers").querySelectorAll("input[type=checkbox]:checked")) {
      (flags[box.dataset.answer] ||= []).push(box.dataset.flag);
    }
    const comment = $("comment").value.trim();
    say("Saving…");
    try {
      const result = await api("POST", "/review/api/verdicts", {
        assignment_id: state.item.assignment_id, verdict: state.verdict, strength, flags,
        comment: comment || null,
      });
      showProgress(result.progress);
      await moveOn("Saved.");
      loadStats().catch(failed); // a display refresh: the next verdict need not wait for it
    } catch (error) {
      failed(error);
    }
  });
}

// After a verdict or skip was stored: the item is done whatever happens next, and the reviewer is told so even
// when the next item cannot be loaded yet (the queue is polled until it can).
async function moveOn(done) {
  state.item = null;
  try {
    await loadNext();
    say(done);
  } catch (error) {
    if (error.status === 401) return failed(error);
    $("item").hidden = true;
    say(`${done} The next item could not be loaded (${error.message}); trying again.`, true);
    schedulePoll();
  }
}

async function skip() {
  return exclusive(async () => {
    if (!state.item) return;
    try {
      showProgress((await api("POST", "/review/api/skip", { assignment_id: state.item.assignment_id })).progress);
      await moveOn("Skipped.");
    } catch (error) {
      failed(error);
    }
  });
}

// Controls Enter presses rather than submits; a mouse click (detail above 0, not a key's click) leaves none focused
// (Skip and Undo blur on every click: their action moves to another item).
const BLURRED_ON_CLICK = "#skip, #undo, header button, summary";

function blurOnClick(event) {
  const control = event.target.closest?.(BLURRED_ON_CLICK);
  if (control && event.detail > 0) control.blur();
}

async function undo() {
  return exclusive(async () => {
    try {
      const result = await api("POST", "/review/api/undo");
      keepDraft(); // the item left unjudged comes back after the one taken back, with what was typed on it
      const taken = result.item.draft; // the verdict taken back, to change rather than give again from nothing
      if (taken) {
        const flags = Object.entries(taken.flags).flatMap(([answer, names]) => names.map((flag) => [answer, flag]));
        state.drafts.set(result.item.assignment_id, {
          comment: taken.comment || "", verdict: taken.verdict, strength: taken.strength && String(taken.strength),
          flags });
      }
      renderItem(result.item);
      showProgress(result.progress);
      say("Your last verdict or skip was taken back; judge this item again.");
      loadStats().catch(failed);
    } catch (error) {
      // A refused undo (nothing to take back, or another reviewer judged it since) leaves the item being judged
      // as it is: moving to the "current" item would reload it and clear the verdict, flags and comment typed.
      if (error.status === 404 || error.status === 409) say(error.message, true);
      else failed(error);
    }
  });
}

// A 401 means the sign-in ended (expired, signed out elsewhere, key removed): back to the sign-in form, saying
// why, with the comment being typed kept for the item. A 404 or 409 means the item shown is no longer this
// reviewer's to judge (judged in another tab, taken back, another key): the page moves to the current one.
function failed(error) {
  if (error.status === 401) {
    keepDraft();
    state.ended = error.message;
    return start();
  }
  say(error.message, true);
  if ((error.status === 404 || error.status === 409) && state.item) {
    loadNext().then(() => say(`${error.message} The page now shows your current item.`, true)).catch(() => {});
  }
}

async function loadNext() {
  const result = await api("GET", "/review/api/next");
  renderItem(result.item);
  showProgress(result.progress);
}

function schedulePoll() {
  clearTimeout(state.poll);
  state.poll = setTimeout(poll, POLL_MS);
}

async function poll() {
  if (!state.signedIn || state.item) return;
  // Asking claims the next item for the lease: a tab left open while nobody looks at it would hide items from
  // the other reviewers, so the page asks only while it is seen and has the focus.
  if (document.hidden || !document.hasFocus()) return schedulePoll();
  try {
    const result = await api("GET", "/review/api/next");
    // An undo may have brought an item back while this was asked: that one is being judged now.
    if (!state.signedIn || state.item) return;
    if (state.busy) return schedulePoll(); // the undo's answer decides what is shown
    renderItem(result.item);
    showProgress(result.progress);
    if (state.item) await loadStats();
  } catch (error) {
    if (error.status === 401) return failed(error);
    schedulePoll(); // the server or its database is away for a moment: keep asking
  }
}

// Guidelines -------------------------------------------------------------------------------------

async function loadGuidelines() {
  const body = $("guidelines-body");
  try {
    const guidelines = await api("GET", "/review/api/guidelines");
    setSanitizedHTML(body, guidelines.html);
  } catch (error) {
    body.replaceChildren(el("p", { class: "error" }, `The guidelines cannot be shown: ${error.message}`));
  }
}

// Statistics -------------------------------------------------------------------------------------

// Labels wrap rather than being cut: two models' names often differ only at their end ("m" and "m [T=1]").
function bars(container, rows, max, empty = "No verdicts yet.") {
  container.replaceChildren();
  if (!rows.length) {
    container.append(el("p", { class: "muted" }, empty));
    return;
  }
  for (const [label, value, shown] of rows) {
    const row = el("div", { class: "bar-row" });
    const bar = el("div", { class: "bar" });
    bar.style.width = `${max > 0 ? (100 * value) / max : 0}%`;
    const track = el("div", { class: "track" });
    track.append(bar);
    row.append(el("span", { class: "bar-label", title: label }, label), track, el("span", { class: "bar-value" }, shown));
    container.append(row);
  }
}

const fmt = (value, digits = 2) => (value === null || value === undefined ? "n/a" : Number(value).toFixed(digits));

async function loadStats() {
  let stats;
  try {
    stats = await api("GET", "/review/stats");
  } catch (error) {
    return;
  }
  $("stats").hidden = false;
  // Win rates count complete pairs with a majority (every reviewer an item waits for has judged it).
  const noWinRate = stats.win_rate === null ? "Shown to admins only: reviewers judge blind."
    : !stats.items.judged ? "No verdicts yet."
    : !stats.items.complete ? `No item has all ${stats.overlap} verdicts yet.`
      : "No complete pair with a majority yet.";
  bars($("chart-win"), (stats.win_rate || []).map((r) => [r.model, r.win_rate,
    `${Math.round(100 * r.win_rate)}% (${r.wins}/${r.items}, ${r.ties} ties)`]), 1, noWinRate);
  const identical = $("win-identical");
  identical.hidden = !stats.identical_pairs;
  identical.textContent = stats.identical_pairs
    ? `${stats.identical_pairs} pair${stats.identical_pairs === 1 ? "" : "s"} with one text as both answers left out.` : "";
  const strengths = Object.entries(stats.strength);
  bars($("chart-strength"), strengths.map(([s, n]) => [STRENGTH_NAMES[s] || s, n, String(n)]),
    Math.max(...strengths.map(([, n]) => n)));
  const flags = Object.entries(stats.flags);
  bars($("chart-flags"), flags.map(([f, n]) => [FLAG_NAMES[f] || f, n, String(n)]), Math.max(...flags.map(([, n]) => n)));
  bars($("chart-reviewers"), stats.reviewers.map((r) => [r.reviewer, r.judged, `${r.judged} (${r.skipped} skipped)`]),
    Math.max(0, ...stats.reviewers.map((r) => r.judged)));
  const agreement = stats.agreement;
  const dl = $("agreement");
  dl.replaceChildren();
  for (const [term, value] of [
    ["verdicts", String(stats.verdicts)],
    ["items judged / complete", `${stats.items.judged} / ${stats.items.complete} (overlap ${stats.overlap})`],
    ["raw pairwise agreement", `${fmt(agreement.raw)} over ${agreement.pairs} pairs`],
    ["Cohen's kappa (mean over reviewer pairs)", fmt(agreement.cohen_mean)],
    ["Fleiss' kappa", `${fmt(agreement.fleiss.kappa)} (${agreement.fleiss.items} items)`],
    ["answer A preferred", fmt(stats.left_preferred)],
  ]) {
    dl.append(el("dt", {}, term), el("dd", { "data-stat": term }, value));
  }
}

// Keyboard ---------------------------------------------------------------------------------------

const FLAG_KEYS = Object.fromEntries(FLAGS.map(([name, , key]) => [key, name]));

function toggleKeysHelp() {
  const dialog = $("keys-help");
  if (dialog.open) dialog.close();
  else dialog.showModal();
}

// The shortcut a key press names. A Latin letter by the character typed, in either case: Caps Lock turned `i` into
// "I", a flag on answer B (Shift, not the case, means B now). Another script's letter (Cyrillic, Greek) by the key's
// place, as a US keyboard reads it; a digit key's too where the digit needs Shift (AZERTY). Punctuation as typed.
function shortcutKey(event) {
  const typed = event.key.length === 1 ? event.key.toLowerCase() : event.key;
  if (/^[a-z0-9]$/.test(typed) || typed.length !== 1) return typed;
  const place = /^(?:Key([A-Z])|Digit([0-9]))$/.exec(event.code || "");
  if (place && place[1] && /\p{L}/u.test(typed) && !/\p{Script=Latin}/u.test(typed)) return place[1].toLowerCase();
  if (place && place[2] && typed !== "?") return place[2];
  return typed;
}

function onKey(event) {
  if (!state.signedIn) return; // signed out, the only thing to type is the key
  const target = event.target;
  if (target.matches("textarea, input[type=password], input[type=text]")) {
    if (event.key === "Escape") target.blur();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.repeat) return; // a held key is one action, not a skip or undo per repeat
  const key = shortcutKey(event);
  // Enter on a focused link opens it, and on Skip, Undo, a header button (Keys, Sign out) or a summary (the
  // guidelines, a long message folded) presses it: a mouse click blurs those (`blurOnClick`), so focused they were
  // reached by Tab (Enter there submitted a verdict, unread, or "Choose a verdict first"). Everywhere else it
  // submits, whatever kept the focus: a button clicked a moment ago matches :focus-visible as soon as a key is
  // pressed, so the focus cannot tell intent. On a verdict button it submits that verdict: clicked, it is the one
  // chosen; reached by Tab from another, it is the one meant.
  if (key === "Enter" && target.closest(`a, ${BLURRED_ON_CLICK}`)) return;
  const verdictButton = key === "Enter" && state.item && target.closest("#verdicts button[data-verdict]");
  if (verdictButton) chooseVerdict(verdictButton.dataset.verdict);
  if (key === "?") {
    toggleKeysHelp();
    event.preventDefault();
    return;
  }
  if ($("keys-help").open) return; // the dialog closes itself on Esc
  let handled = true;
  if (key === "h") $("guidelines").open = !$("guidelines").open;
  else if (key === "z") undo();
  else if (!state.item) handled = false;
  else {
    const kind = state.item.kind;
    const verdict = (kind === "single" ? SINGLE_VERDICTS : PAIR_VERDICTS).find(([, , k]) => k === key);
    if (verdict) chooseVerdict(verdict[0]);
    else if (["1", "2", "3", "4"].includes(key)) chooseStrength(key);
    else if (FLAG_KEYS[key] && event.shiftKey) {
      if (kind === "pair") toggleFlag("B", FLAG_KEYS[key]);
    } else if (FLAG_KEYS[key]) toggleFlag("A", FLAG_KEYS[key]);
    else if (key === "r") $("show-source").click();
    else if (key === "c") $("comment").focus();
    else if (key === "Enter") submitVerdict();
    else if (key === "s") skip();
    else handled = false;
  }
  if (handled) event.preventDefault();
}

// Start ------------------------------------------------------------------------------------------

async function start() {
  clearTimeout(state.poll);
  let me;
  try {
    me = await api("GET", "/review/api/me");
  } catch (error) {
    if (error.status !== 401) { // the server or its database is away: not a reason to sign in again
      $("sign-in-error").textContent = `${error.message}; trying again.`;
      state.poll = setTimeout(start, POLL_MS);
    } else {
      $("sign-in-error").textContent = state.ended ? `${state.ended}.` : "";
    }
    showSignIn();
    return;
  }
  state.signedIn = true;
  state.ended = "";
  $("reviewer").textContent = `reviewer ${me.reviewer}`;
  $("sign-in").hidden = true;
  $("whoami").hidden = false;
  $("review").hidden = false;
  await loadGuidelines();
  try {
    await loadNext();
    await loadStats();
  } catch (error) {
    if (error.status === 401) return failed(error);
    say(`${error.message}; trying again.`, true);
    schedulePoll();
  }
}

function showSignIn() {
  state.signedIn = false;
  state.item = null;
  state.verdict = null;
  // Students' words leave the page (a shared school machine), and no stale item shows again after the next
  // sign-in if the server cannot hand out one then (the comment being typed is kept as a draft already).
  $("verdict-form").reset();
  $("item").hidden = true;
  $("conversation").replaceChildren();
  $("answers").replaceChildren();
  $("whoami").hidden = true;
  $("review").hidden = true;
  $("stats").hidden = true;
  $("sign-in").hidden = false;
  if ($("keys-help").open) $("keys-help").close();
  $("key").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api("POST", "/review/session", { key: $("key").value });
      $("key").value = "";
      $("sign-in-error").textContent = "";
      await start();
    } catch (error) {
      $("sign-in-error").textContent = error.message;
    }
  });
  $("sign-out").addEventListener("click", async () => {
    try {
      await api("DELETE", "/review/session");
    } catch (error) {
      return say(`Not signed out: ${error.message}`, true);
    }
    state.drafts.clear();
    await start();
  });
  $("verdict-form").addEventListener("submit", (event) => {
    event.preventDefault();
    submitVerdict();
  });
  $("show-source").addEventListener("change", (event) => {
    document.body.classList.toggle("show-source", event.target.checked);
  });
  $("show-keys").addEventListener("click", toggleKeysHelp);
  // Clicked, a button keeps the focus, and Space would press it again: skip or undo once more. A double click's
  // second click (detail 2) would land on the next item, which the reviewer has not seen: one action a click.
  for (const [id, action] of [["skip", skip], ["undo", undo]]) {
    $(id).addEventListener("click", (event) => {
      event.currentTarget.blur(); // pressed by a key too: Enter on the next item submits, it does not skip again
      if (event.detail <= 1) action();
    });
  }
  // Before the click's own handlers: the Keys dialog gives the focus back on closing to what held it on opening.
  document.addEventListener("click", blurOnClick, true);
  $("submit").addEventListener("click", (event) => {
    if (event.detail > 1) event.preventDefault(); // no second submit of the next item, and no "choose a verdict"
  });
  document.addEventListener("keydown", onKey);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && state.signedIn && !state.item) poll();
  });
  start();
});
