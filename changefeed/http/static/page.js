/**
 * The demo page: an editor that saves, a viewer that follows the change feed.
 *
 * Knows the page's elements and POST /save; learns of new versions only
 * through subscribe() from changefeed.js, whatever transport that uses, and
 * of who else has the page open through its onPresence; tells the others
 * this tab is here (and editing) with present() from presence.js.
 */
import {BASE, backoffMs, subscribe} from "./changefeed.js";
import {present} from "./presence.js";

const $ = (id) => document.getElementById(id);
const token = takeToken();
const slug = document.body.dataset.slug;
const transport = document.body.dataset.transport;

const editor = {html: $("html"), data: $("data")};
const SAVE_ATTEMPTS = 5;  // one save, then up to four automatic retries with the same key
const RETRIED = new Set([502, 503, 504]);  // the server (or a proxy) may answer again; nothing was refused

let shown = null;        // the newest version shown in the viewer: {version, html, data, updated_at, epoch}
let baseVersion = 0;     // the version the editor's text started from
let dirty = false;       // the editor holds changes not yet saved
let edits = 0;           // counts the edits, to tell whether one came in while a save was under way
let saving = false;
let unsettled = null;    // {body, key}: the last save whose outcome is not known, retried with its key
let conflictVersion = null;
let here = null;         // this tab's presence beats: present()
let presence = null;     // the newest presence list: {version, count, editing, editors?}
let you = null;          // this tab's user's id in presence lists, left out of the "Here now" bar

function showMessage(text, kind = "info") {
  $("message").textContent = text;
  $("message").dataset.kind = kind;
  $("message").hidden = !text;
}

function setBase(version) {
  baseVersion = version;
  $("base").textContent = version ? `editing version ${version}` : "new page";
}

function fillEditor(page) {
  editor.html.value = page.html;
  editor.data.value = page.data === null ? "" : JSON.stringify(page.data, null, 2);
  dirty = false;
  setBase(page.version);
}

function show(page) {
  // A new epoch is another database (replaced, or restored from a backup): its versions start over.
  const newDatabase = Boolean(shown && page.epoch && shown.epoch && page.epoch !== shown.epoch);
  if (shown && !newDatabase && page.version <= shown.version) return;
  shown = page;
  $("frame").srcdoc = page.html;
  $("viewer-data").textContent = JSON.stringify(page.data, null, 2);
  $("version").textContent = String(page.version);
  renderAge();
  if (!dirty) fillEditor(page);
  // While this tab's own save is under way, the new version may be that very save:
  // its answer says so, or a 409 says someone else's landed first.
  else if (!saving && (newDatabase || page.version > baseVersion)) {
    showMessage(`Version ${page.version} was saved elsewhere; your edits are based on version ${baseVersion}.`, "warn");
  }
  // A delete is a version too (a tombstone: html "" and data null); saving again re-creates the page.
  if (page.deleted) showMessage(`This page was deleted (version ${page.version}); saving re-creates it.`, "warn");
}

function renderAge() {
  if (!shown) return;
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(shown.updated_at)) / 1000));
  let age = `${seconds} s ago`;
  if (seconds >= 3600) age = `${Math.floor(seconds / 3600)} h ago`;
  else if (seconds >= 60) age = `${Math.floor(seconds / 60)} min ago`;
  $("updated").textContent = `updated ${age}`;
  $("updated").title = shown.updated_at;
}

function showStatus({state, retryInMs, transport: active, shared, leader, reason}) {
  $("badge").dataset.state = state;
  $("state").textContent = state === "retrying" ? `retrying in ${Math.ceil(retryInMs / 1000)} s`
    : state === "unauthorized" ? "not allowed to read" : state;
  if (state === "unauthorized" && reason === "expired") {
    showMessage("Your token expired: open the page again with a fresh #token=... at the end of the address.", "error");
  } else if (state === "unauthorized") {
    showMessage(token ? "Your token may not read this page, or it expired: open the page again with a fresh "
      + "#token=..." : "Reading this page needs a token: open it with #token=<your token> at the end of the address.",
    "error");
  }
  $("transport").textContent = active + (shared && !leader ? " via another tab" : "");
}

/** Read the editor, or say what is wrong with it and return null. */
function readEditor() {
  const text = editor.data.value.trim();
  if (!text) return {html: editor.html.value, data: null};
  try {
    return {html: editor.html.value, data: JSON.parse(text)};
  } catch (error) {
    showMessage(`Data is not valid JSON, so nothing was saved: ${error.message}`, "error");
    editor.data.focus();
    return null;
  }
}

/** A fresh Idempotency-Key (crypto.randomUUID() needs a secure context; getRandomValues does not). */
function newKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** POST /save once; return {response, body}, or throw when no answer came. */
async function postSave(attempt) {
  const response = await fetch(`${BASE}/save`, {
    method: "POST",
    headers: {"Content-Type": "application/json", Accept: "application/json", "Idempotency-Key": attempt.key,
      ...(token ? {Authorization: `Bearer ${token}`} : {})},
    body: attempt.body,
  });
  const body = await response.json().catch(() => ({}));  // a proxy's 502 page is not JSON
  return {response, body};
}

/**
 * Save the editor. The save carries an Idempotency-Key: when its answer is
 * lost (network error, 503), it is sent again with the same key, so the
 * server stores it once at most. A new edit is a new save with a new key.
 */
async function save(base = baseVersion) {
  if (saving) return;
  const page = readEditor();
  if (!page) return;
  const body = JSON.stringify({slug, ...page, base_version: base});
  // The same save again (after one whose outcome is unknown) keeps its key.
  if (!unsettled || unsettled.body !== body) unsettled = {body, key: newKey()};
  const attempt = unsettled;
  const editsBefore = edits;
  saving = true;
  $("save").disabled = true;
  try {
    for (let tries = 1; ; tries++) {
      let answer = null;
      let why = null;
      let retryAfterMs = 0;
      try {
        answer = await postSave(attempt);
      } catch (error) {
        why = `The server did not answer (${error.message}).`;
      }
      if (answer && !RETRIED.has(answer.response.status)) {
        unsettled = null;  // a definite outcome: stored, or refused
        return settle(answer, page, editsBefore);
      }
      if (answer) {
        why = answer.body.message || `The server answered ${answer.response.status}.`;
        retryAfterMs = 1000 * (Number(answer.response.headers.get("Retry-After")) || 0);
      }
      if (tries >= SAVE_ATTEMPTS) {
        return showMessage(`Not saved yet. ${why} Press Save to try again: it is never stored twice.`, "error");
      }
      const delayMs = backoffMs(tries, retryAfterMs);
      showMessage(`Saving… ${why} Trying again in ${Math.ceil(delayMs / 1000)} s.`, "warn");
      await new Promise((resolve) => setTimeout(resolve, delayMs));
    }
  } finally {
    saving = false;
    $("save").disabled = false;
  }
}

/** Show what a save's definite answer says. */
function settle({response, body}, page, editsBefore) {
  if (response.status === 409) return showConflict(body.version);
  if (!response.ok) {
    const fields = Object.entries(body.fields || {}).map(([name, why]) => `${name}: ${why.join(" ")}`);
    return showMessage([body.message, ...fields].join(" "), "error");
  }
  hideConflict();
  dirty = edits !== editsBefore;  // typed while the save was under way: still unsaved
  setBase(body.version);
  showMessage(`Saved version ${body.version}.`, "ok");
  show({...page, version: body.version, updated_at: body.updated_at, epoch: body.epoch});
}

function showConflict(version) {
  conflictVersion = version;
  showMessage("");
  $("conflict-text").textContent =
    `Another tab saved version ${version} while you edited version ${baseVersion}. ` +
    "Load their version (your edits are discarded) or overwrite it with yours.";
  $("conflict").hidden = false;
}

function hideConflict() {
  conflictVersion = null;
  $("conflict").hidden = true;
}

async function loadTheirs() {
  const response = await fetch(`${BASE}/changes?slug=${encodeURIComponent(slug)}&since=0`);
  const page = await response.json();
  hideConflict();
  if (page.changed) {
    show(page);
    fillEditor(page);
    showMessage(`Loaded version ${page.version}.`, "ok");
  }
}

function edited() {
  dirty = true;
  edits += 1;
  if (here) here.touch();  // others see "<name> is editing" for the next few seconds
}

function showPresence(list) {
  presence = list;
  renderPresence();
}

/** A hue of its own for each person, the same in every tab. */
function hueOf(id) {
  let hash = 0;
  for (const char of String(id)) hash = (hash * 31 + char.codePointAt(0)) >>> 0;
  return hash % 360;
}

/** The "Here now" bar: everyone else on this page, one chip each. Names are untrusted: text only. */
function renderPresence() {
  if (!presence) return;
  const {count = 0, editors} = presence;
  const others = (editors || []).filter((person) => person.id !== you);
  // Is this tab's user among `count`? Named, or (past the named ones) surely counted once it beat.
  const counted = you !== null && (editors ? others.length < editors.length || editors.length < count : count > 0);
  const otherCount = Math.max(0, count - (counted ? 1 : 0));
  $("presence").replaceChildren(...others.map((person) => {
    const chip = document.createElement("li");
    const name = person.name || "Someone";
    chip.dataset.id = person.id;
    chip.dataset.state = person.state;
    chip.style.setProperty("--hue", hueOf(person.id));
    chip.title = person.state === "editing" ? `${name} is editing` : `${name} is viewing`;
    const initial = document.createElement("span");
    initial.className = "initial";
    initial.setAttribute("aria-hidden", "true");
    initial.textContent = Array.from(name)[0].toUpperCase();
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    chip.append(initial, label);
    if (person.state === "editing") {
      const doing = document.createElement("span");
      doing.className = "doing";
      doing.textContent = " is editing";
      chip.append(doing);
    }
    return chip;
  }));
  const unnamed = otherCount - others.length;
  $("presence-count").textContent = !editors ? `${otherCount} ${otherCount === 1 ? "other" : "others"} here`
    : unnamed > 0 ? `+${unnamed} more` : "";
  $("presence-count").dataset.count = String(otherCount);
  $("presence-empty").hidden = otherCount > 0;
}

/** A name as the server takes it: at most 40 characters, none of them a control character. */
function cleanName(text) {
  return Array.from(String(text || "").replace(/[\u0000-\u001f\u007f-\u009f]/g, "").trim()).slice(0, 40).join("");
}

/** The name others see: kept in localStorage, a random "Guest 123" until the user gives one. */
function displayName() {
  let name = cleanName(localStorage.getItem("changefeed-name"));
  if (!name) {
    name = `Guest ${100 + Math.floor(Math.random() * 900)}`;
    localStorage.setItem("changefeed-name", name);
  }
  return name;
}

function renamed() {
  const name = cleanName($("name").value);
  if (!name) return;
  localStorage.setItem("changefeed-name", name);
  if (here) here.setName(name);  // sent with the next beat
}

editor.html.addEventListener("input", edited);
editor.data.addEventListener("input", edited);
$("name").value = displayName();
$("name").addEventListener("input", renamed);
$("save").addEventListener("click", () => save());
$("load-theirs").addEventListener("click", loadTheirs);
$("overwrite").addEventListener("click", () => save(conflictVersion));
document.addEventListener("keydown", (event) => {
  if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "s") {
    event.preventDefault();
    save();
  }
});
setInterval(renderAge, 1000);
setBase(0);
/**
 * The token this tab uses, if any: given once in the address as #token=...
 * (a fragment never reaches the server or its logs), kept in this tab's
 * sessionStorage, and taken out of the address so it is not shared or bookmarked.
 */
function takeToken() {
  const given = new URLSearchParams(location.hash.slice(1)).get("token");
  if (given) {
    sessionStorage.setItem("changefeed-token", given);
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("changefeed-token");
}

/** The slugs a token lets its holder write, read from its payload (the server checks; this only informs). */
function mayWrite(jwt) {
  try {
    const payload = JSON.parse(atob(jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    const patterns = (payload.changefeed && payload.changefeed.write) || [];
    return patterns.some((p) => p === "*" || p === slug || (p.endsWith("*") && slug.startsWith(p.slice(0, -1))));
  } catch {
    return false;
  }
}

async function start() {
  if (token) {
    // EventSource cannot send a header: trade the token for a read-only, HttpOnly, SameSite=Strict cookie.
    const answer = await fetch(`${BASE}/session`, {method: "POST", headers: {Authorization: `Bearer ${token}`}})
      .catch(() => null);
    if (answer && (answer.status === 401 || answer.status === 403)) {
      const body = await answer.json().catch(() => ({}));
      showMessage(`Your token was refused: ${body.message || answer.status}`, "error");
    } else if (!mayWrite(token)) {
      $("save").disabled = true;
      $("save").dataset.readOnly = "true";
      showMessage("You may read this page but not save it: your token has no write right on it.", "warn");
    }
  }
  subscribe(slug, {since: 0, onChange: show, onStatus: showStatus, onPresence: showPresence, transport});
  here = present(slug, {name: displayName(), token, onYou: (id) => {
    you = id;
    renderPresence();
  }});
}

start();
