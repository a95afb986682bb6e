/**
 * The dashboard: a live list of the pages under a prefix, on one connection.
 *
 * Follows the prefix with subscribe({prefix}) and payload "version": each
 * event names a page and its version, whatever the page weighs, and pages
 * created later show up too. Over "ws" each listed page's presence (who is
 * editing) comes on the same socket, as one more subscription of the tab's
 * one WebSocket; presence is per page, so over the other transports it would
 * cost a connection per page, and the dashboard goes without it there.
 */
import {BASE, subscribe} from "./changefeed.js";

const $ = (id) => document.getElementById(id);
const prefix = document.body.dataset.prefix;
const transport = document.body.dataset.transport;
// A socket follows at most CHANGEFEED_WS_MAX_SLUGS (100) pages and prefixes: presence for the first 90 pages.
const MAX_PRESENCE = 90;

const rows = new Map();  // slug -> {row, version, saved, editing, presence: its unsubscribe function or null}

/** The row of a page, made (in slug order) the first time the page shows up. */
function rowOf(slug) {
  const known = rows.get(slug);
  if (known) return known;
  const row = document.createElement("tr");
  row.dataset.slug = slug;
  const [name, version, saved, editing] = ["slug-cell", "version", "saved", "editing"].map((kind) => {
    const cell = row.insertCell();
    cell.className = kind;
    return cell;
  });
  const link = document.createElement("a");
  link.href = `${BASE}/?slug=${encodeURIComponent(slug)}&transport=${encodeURIComponent(transport)}`;
  link.textContent = slug;
  name.append(link);
  editing.textContent = transport === "ws" ? "–" : "";
  const entry = {row, version, saved, editing, presence: null};
  const body = $("pages").tBodies[0];
  const next = [...rows.keys()].sort().find((other) => other > slug);
  body.insertBefore(row, next === undefined ? null : rows.get(next).row);
  rows.set(slug, entry);
  $("count").textContent = String(rows.size);
  $("empty").hidden = true;
  if (transport === "ws" && rows.size <= MAX_PRESENCE) {
    entry.presence = subscribe(slug, {transport, payload: "version", onPresence: (list) => showEditing(entry, list)});
  }
  return entry;
}

function showChange({slug, version, updated_at: updatedAt, deleted}) {
  const entry = rowOf(slug);
  entry.version.textContent = String(version);
  entry.saved.textContent = new Date(updatedAt || Date.now()).toLocaleTimeString();
  entry.saved.title = updatedAt || "";
  entry.row.dataset.version = String(version);
  entry.row.dataset.deleted = String(Boolean(deleted));
  entry.row.classList.remove("fresh");
  void entry.row.offsetWidth;  // restart the highlight
  entry.row.classList.add("fresh");
}

/** Who of the people on the page edits it: their names, or how many when names are not sent. */
function showEditing(entry, {editing = 0, editors}) {
  const names = (editors || []).filter((person) => person.state === "editing").map((person) => person.name || "someone");
  entry.editing.textContent = names.length ? names.join(", ") : editing ? `${editing} editing` : "–";
  entry.row.dataset.editing = String(editing);
}

/** Another database (restored, replaced): forget every row; what follows is its whole state. */
function forget() {
  for (const entry of rows.values()) {
    if (entry.presence) entry.presence();
    entry.row.remove();
  }
  rows.clear();
  $("count").textContent = "0";
  $("empty").hidden = false;
}

function showStatus({state, retryInMs, transport: active}) {
  $("badge").dataset.state = state;
  $("state").textContent = state === "retrying" ? `retrying in ${Math.ceil(retryInMs / 1000)} s`
    : state === "unauthorized" ? "not allowed to read" : state;
  $("transport").textContent = active;
}

subscribe({prefix}, {transport, payload: "version", onChange: showChange, onReset: forget, onStatus: showStatus});
