/**
 * The demo page: an editor that saves, a viewer that follows the change feed.
 *
 * Knows the page's elements and POST /save; learns of new versions only
 * through subscribe() from changefeed.js, whatever transport that uses.
 */
import {subscribe} from "./changefeed.js";

const $ = (id) => document.getElementById(id);
const slug = document.body.dataset.slug;
const transport = document.body.dataset.transport;

const editor = {html: $("html"), data: $("data")};
let shown = null;        // the newest version shown in the viewer: {version, html, data, updated_at, epoch}
let baseVersion = 0;     // the version the editor's text started from
let dirty = false;       // the editor holds changes not yet saved
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
  else if (newDatabase || page.version > baseVersion) {
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

async function save(base = baseVersion) {
  const page = readEditor();
  if (!page) return;
  $("save").disabled = true;
  try {
    const response = await fetch("/save", {
      method: "POST",
      headers: {"Content-Type": "application/json", Accept: "application/json"},
      body: JSON.stringify({slug, ...page, base_version: base}),
    });
    const body = await response.json();
    if (response.status === 409) return showConflict(body.version);
    if (!response.ok) {
      const fields = Object.entries(body.fields || {}).map(([name, why]) => `${name}: ${why.join(" ")}`);
      return showMessage([body.message, ...fields].join(" "), "error");
    }
    hideConflict();
    dirty = false;
    setBase(body.version);
    showMessage(`Saved version ${body.version}.`, "ok");
    show({...page, version: body.version, updated_at: body.updated_at, epoch: body.epoch});
  } catch (error) {
    showMessage(`Could not reach the server, nothing was saved: ${error.message}`, "error");
  } finally {
    $("save").disabled = false;
  }
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

editor.html.addEventListener("input", () => { dirty = true; });
editor.data.addEventListener("input", () => { dirty = true; });
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
