// The review page. Every piece of model or student text is set with textContent, never as HTML.
"use strict";

const FLAGS = [
  ["incorrect", "incorrect", "i"],
  ["unsafe", "unsafe", "u"],
  ["gives_answer", "gives the answer away", "v"],
  ["off_topic", "off-topic", "o"],
];
const PAIR_VERDICTS = [["a", "A better", "a"], ["b", "B better", "b"], ["tie", "Tie", "t"], ["both_bad", "Both bad", "x"]];
const SINGLE_VERDICTS = [["good", "Good", "g"], ["bad", "Bad", "x"]];

const state = { item: null, verdict: null };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 204) return null;
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error((data.error && data.error.message) || `HTTP ${response.status}`);
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

// Item ------------------------------------------------------------------------------------------

function renderItem(item) {
  state.item = item;
  state.verdict = null;
  $("verdict-form").reset();
  $("item").hidden = !item;
  $("empty").hidden = !!item;
  if (!item) return;
  $("item").dataset.itemId = item.item_id;

  const conversation = $("conversation");
  conversation.replaceChildren();
  for (const message of item.conversation) {
    const li = el("li", { class: `turn ${message.role}` });
    li.append(el("span", { class: "role" }, message.role), el("div", { class: "text" }, message.content));
    conversation.append(li);
  }

  const answers = $("answers");
  answers.replaceChildren();
  answers.classList.toggle("single", item.kind === "single");
  for (const answer of item.answers) {
    const box = el("section", { class: "answer", "data-label": answer.label });
    box.append(el("h3", {}, item.kind === "pair" ? `Answer ${answer.label}` : "Answer"));
    box.append(el("div", { class: "text", "data-testid": `answer-${answer.label}` }, answer.text));
    const flags = el("div", { class: "flags" });
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

  const verdicts = $("verdicts");
  verdicts.querySelectorAll("button").forEach((b) => b.remove());
  for (const [value, title, key] of item.kind === "pair" ? PAIR_VERDICTS : SINGLE_VERDICTS) {
    const button = el("button", { type: "button", "data-verdict": value, "aria-pressed": "false" }, `${title} (${key})`);
    button.addEventListener("click", () => chooseVerdict(value));
    verdicts.append(button);
  }
  $("strengths").hidden = item.kind !== "pair";
  updateStrengths();
  say("");
}

function chooseVerdict(value) {
  state.verdict = value;
  for (const button of $("verdicts").querySelectorAll("button")) {
    button.setAttribute("aria-pressed", String(button.dataset.verdict === value));
  }
  updateStrengths();
}

function updateStrengths() {
  const needed = state.verdict === "a" || state.verdict === "b";
  for (const input of $("strengths").querySelectorAll("input")) {
    input.disabled = !needed;
    if (!needed) input.checked = false;
  }
}

function chooseStrength(value) {
  const input = $("strengths").querySelector(`input[value="${value}"]`);
  if (input && !input.disabled) input.checked = true;
}

function toggleFlag(answer, flag) {
  const box = $("answers").querySelector(`input[data-answer="${answer}"][data-flag="${flag}"]`);
  if (box) box.checked = !box.checked;
}

async function submitVerdict() {
  if (!state.item) return;
  if (!state.verdict) return say("Choose a verdict first.", true);
  const chosen = $("strengths").querySelector("input:checked");
  const strength = chosen ? Number(chosen.value) : null;
  if ((state.verdict === "a" || state.verdict === "b") && !strength) {
    return say("Say how much better, 1 to 4.", true);
  }
  const flags = {};
  for (const box of $("answers").querySelectorAll("input[type=checkbox]:checked")) {
    (flags[box.dataset.answer] ||= []).push(box.dataset.flag);
  }
  const comment = $("comment").value.trim();
  try {
    const result = await api("POST", "/review/api/verdicts", {
      assignment_id: state.item.assignment_id, verdict: state.verdict, strength, flags,
      comment: comment || null,
    });
    showProgress(result.progress);
    await loadNext();
    say("Saved.");
    await loadStats();
  } catch (error) {
    say(error.message, true);
  }
}

async function skip() {
  if (!state.item) return;
  try {
    showProgress((await api("POST", "/review/api/skip", { assignment_id: state.item.assignment_id })).progress);
    await loadNext();
    say("Skipped.");
  } catch (error) {
    say(error.message, true);
  }
}

async function undo() {
  try {
    const result = await api("POST", "/review/api/undo");
    renderItem(result.item);
    showProgress(result.progress);
    say("Your last verdict was taken back; judge this item again.");
    await loadStats();
  } catch (error) {
    say(error.message, true);
  }
}

async function loadNext() {
  const result = await api("GET", "/review/api/next");
  renderItem(result.item);
  showProgress(result.progress);
}

// Statistics -------------------------------------------------------------------------------------

function bars(container, rows, max) {
  container.replaceChildren();
  if (!rows.length) {
    container.append(el("p", { class: "muted" }, "No verdicts yet."));
    return;
  }
  for (const [label, value, shown] of rows) {
    const row = el("div", { class: "bar-row" });
    const bar = el("div", { class: "bar" });
    bar.style.width = `${max > 0 ? (100 * value) / max : 0}%`;
    const track = el("div", { class: "track" });
    track.append(bar);
    row.append(el("span", { class: "bar-label" }, label), track, el("span", { class: "bar-value" }, shown));
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
  bars($("chart-win"), stats.win_rate.map((r) => [r.model, r.win_rate,
    `${Math.round(100 * r.win_rate)}% (${r.wins}/${r.items}, ${r.ties} ties)`]), 1);
  const strengths = Object.entries(stats.strength);
  bars($("chart-strength"), strengths.map(([s, n]) => [s, n, String(n)]), Math.max(...strengths.map(([, n]) => n)));
  const flags = Object.entries(stats.flags);
  bars($("chart-flags"), flags.map(([f, n]) => [f.replace("_", " "), n, String(n)]), Math.max(...flags.map(([, n]) => n)));
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

function onKey(event) {
  const target = event.target;
  if (target.matches("textarea, input[type=password], input[type=text]")) {
    if (event.key === "Escape") target.blur();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey || !state.item && event.key !== "z") return;
  const key = event.key;
  const kind = state.item && state.item.kind;
  const verdicts = kind === "single" ? SINGLE_VERDICTS : PAIR_VERDICTS;
  const verdict = verdicts.find(([, , k]) => k === key);
  let handled = true;
  if (verdict) chooseVerdict(verdict[0]);
  else if (["1", "2", "3", "4"].includes(key)) chooseStrength(key);
  else if (FLAG_KEYS[key]) toggleFlag("A", FLAG_KEYS[key]);
  else if (FLAG_KEYS[key.toLowerCase()] && key !== key.toLowerCase() && kind === "pair") toggleFlag("B", FLAG_KEYS[key.toLowerCase()]);
  else if (key === "c") $("comment").focus();
  else if (key === "Enter") submitVerdict();
  else if (key === "s") skip();
  else if (key === "z") undo();
  else handled = false;
  if (handled) event.preventDefault();
}

// Start ------------------------------------------------------------------------------------------

async function start() {
  try {
    const me = await api("GET", "/review/api/me");
    $("reviewer").textContent = `reviewer ${me.reviewer}`;
    $("sign-in").hidden = true;
    $("whoami").hidden = false;
    $("review").hidden = false;
    await loadNext();
    await loadStats();
  } catch (error) {
    $("whoami").hidden = true;
    $("review").hidden = true;
    $("stats").hidden = true;
    $("sign-in").hidden = false;
    if (error.status !== 401) $("sign-in-error").textContent = error.message;
  }
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
    await api("DELETE", "/review/session");
    await start();
  });
  $("verdict-form").addEventListener("submit", (event) => {
    event.preventDefault();
    submitVerdict();
  });
  $("skip").addEventListener("click", skip);
  $("undo").addEventListener("click", undo);
  document.addEventListener("keydown", onKey);
  start();
});
