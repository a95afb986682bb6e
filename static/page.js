/**
 * The demo page: an editor that saves, a viewer that follows the change feed.
 *
 * Knows the page's elements and POST /save; learns of new versions only
 * through subscribe() from changefeed.js, whatever transport that uses.
 */
import {backoffMs, subscribe} from "./changefeed.js";

const $ = (id) => document.getElementById(id);
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

function showStatus({state, retryInMs, transport: active, shared, leader}) {
  $("badge").dataset.state = state;
  $("state").textContent = state === "retrying" ? `retrying in ${Math.ceil(retryInMs / 1000)} s` : state;
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
  const response = await fetch("/save", {
    method: "POST",
    headers: {"Content-Type": "application/json", Accept: "application/json", "Idempotency-Key": attempt.key},
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
  const response = await fetch(`/changes?slug=${encodeURIComponent(slug)}&since=0`);
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
}

editor.html.addEventListener("input", edited);
editor.data.addEventListener("input", edited);
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
subscribe(slug, {since: 0, onChange: show, onStatus: showStatus, transport});
