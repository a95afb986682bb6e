/**
 * Presence, the sending side: this tab tells the server it has a page open, and whether it edits.
 *
 *   const here = present(slug, {name, token, onYou, onStatus});
 *   here.touch();          // the user typed: "editing" for the next 5 s, then "viewing" again
 *   here.setName("Ada");   // sent with the next beat
 *   here.stop();           // "gone" at once, and no more beats
 *
 * - Beats POST /presence {slug, client_id, name, state} every beat_ms (5 s,
 *   as the server's answer says), and at once when the state changes, but
 *   never sooner than min_interval_ms (1 s) after the last one; a 429 waits
 *   its Retry-After. When the page lists as many tabs as it may ("limit":
 *   "presence_entries"), this tab waits quietly and asks again later.
 * - client_id is random, one per tab (per page load), never shown to others.
 * - onYou(id) gives this tab's user's id in presence lists (from the first
 *   answer), so the page can leave itself out. onStatus({state}) says
 *   "present", "full", "retrying" or "unauthorized".
 * - On `pagehide` (the tab closes, or goes to the back-forward cache) a
 *   `navigator.sendBeacon` says "gone", so others see it leave at once and
 *   not after the 15 s the entry lives without beats; `pageshow` from the
 *   back-forward cache beats again. sendBeacon sends no header: with access
 *   control on it relies on the read cookie of POST /session.
 *
 * Who is there comes back through subscribe(slug, {onPresence}) in
 * changefeed.js, on whatever transport the page uses.
 */
import {BASE, backoffMs} from "./changefeed.js";

export const PRESENCE_BEAT_MS = 5000;       // until the server says otherwise
export const PRESENCE_MIN_INTERVAL_MS = 1000;
export const EDITING_MS = 5000;             // "editing" lasts this long after the last keystroke

/** A random id for this tab: 22 characters of [A-Za-z0-9_-]. */
export function newClientId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

export function present(slug, {name = "", token = null, onYou = () => {}, onStatus = () => {}} = {}) {
  const clientId = newClientId();
  let state = "viewing";
  let beatMs = PRESENCE_BEAT_MS;
  let minIntervalMs = PRESENCE_MIN_INTERVAL_MS;
  let sentAt = -Infinity;  // when the last beat left
  let notBefore = 0;       // no beat before this time (a 429's Retry-After)
  let sentState = null;    // the state the server last accepted
  let you = null;
  let failures = 0;
  let timer = null;
  let idle = null;         // turns "editing" back to "viewing"
  let inFlight = null;     // the AbortController of the beat under way
  let again = false;       // something changed while a beat was under way
  let stopped = false;
  let hidden = false;      // after pagehide, until pageshow

  // No name, no `name`: the server refuses a blank one, and calls the tab "Guest".
  const body = (beatState) => JSON.stringify({slug, client_id: clientId, ...(name ? {name} : {}), state: beatState});

  function schedule(delayMs) {
    clearTimeout(timer);
    timer = setTimeout(beat, Math.max(0, delayMs));
  }

  /** Beat as soon as the server allows: a change to tell. */
  function soon() {
    if (stopped || hidden) return;
    if (inFlight) {
      again = true;
      return;
    }
    schedule(Math.max(sentAt + minIntervalMs, notBefore) - Date.now());
  }

  async function beat() {
    timer = null;
    if (stopped || hidden || inFlight) return;
    const controller = inFlight = new AbortController();
    again = false;
    sentAt = Date.now();
    const beatState = state;
    let delayMs = beatMs;
    try {
      const response = await fetch(`${BASE}/presence`, {
        method: "POST",
        signal: controller.signal,
        headers: {"Content-Type": "application/json", Accept: "application/json",
          ...(token ? {Authorization: `Bearer ${token}`} : {})},
        body: body(beatState),
      });
      const answer = await response.json().catch(() => ({}));
      if (controller.signal.aborted) return;
      if (response.ok) {
        failures = 0;
        sentState = beatState;
        beatMs = answer.beat_ms > 0 ? answer.beat_ms : beatMs;
        minIntervalMs = answer.min_interval_ms >= 0 ? answer.min_interval_ms : minIntervalMs;
        delayMs = beatMs;
        if (answer.you && answer.you !== you) onYou(you = answer.you);
        onStatus({state: "present"});
      } else if (response.status === 429) {
        const seconds = Number(response.headers.get("Retry-After"));
        delayMs = answer.retry_after_ms > 0 ? answer.retry_after_ms
          : Number.isFinite(seconds) && seconds > 0 ? seconds * 1000 : beatMs;
        notBefore = Date.now() + delayMs;
        // The page lists as many tabs as it may: wait quietly for some to leave.
        if (answer.limit === "presence_entries") onStatus({state: "full", retryInMs: delayMs});
      } else if (response.status === 401 || response.status === 403) {
        stopped = true;  // not allowed to read this page: beating again cannot help
        onStatus({state: "unauthorized", error: answer.message || `POST /presence answered ${response.status}`});
        return;
      } else {
        failures += 1;
        const seconds = Number(response.headers.get("Retry-After"));
        delayMs = backoffMs(failures, Number.isFinite(seconds) ? seconds * 1000 : 0);
        onStatus({state: "retrying", retryInMs: delayMs});
      }
    } catch (error) {
      if (controller.signal.aborted) return;
      failures += 1;
      delayMs = backoffMs(failures);
      onStatus({state: "retrying", retryInMs: delayMs, error: String(error.message || error)});
    } finally {
      if (inFlight === controller) inFlight = null;
    }
    if (stopped || hidden) return;
    // A state that changed meanwhile goes as soon as allowed, unless the server is failing.
    if (!failures && (again || state !== sentState)) soon();
    else schedule(delayMs);
  }

  function setState(next) {
    if (next === state) return;
    state = next;
    soon();
  }

  /** Say "gone" in a way that survives the page going away. */
  function leave() {
    clearTimeout(timer);
    timer = null;
    if (inFlight) inFlight.abort();
    inFlight = null;
    const gone = new Blob([body("gone")], {type: "application/json"});
    if (!(navigator.sendBeacon && navigator.sendBeacon(`${BASE}/presence`, gone))) {
      fetch(`${BASE}/presence`, {method: "POST", keepalive: true, body: body("gone"),
        headers: {"Content-Type": "application/json", ...(token ? {Authorization: `Bearer ${token}`} : {})}})
        .catch(() => {});
    }
    sentState = "gone";
  }

  function pagehide() {
    if (stopped || hidden) return;
    hidden = true;
    leave();
  }

  function pageshow(event) {
    if (stopped || !hidden || !event.persisted) return;
    hidden = false;  // back from the back-forward cache: here again
    sentAt = -Infinity;
    soon();
  }

  window.addEventListener("pagehide", pagehide);
  window.addEventListener("pageshow", pageshow);
  schedule(0);

  return {
    clientId,
    /** The user typed: "editing" now, "viewing" again EDITING_MS after the last keystroke. */
    touch() {
      clearTimeout(idle);
      idle = setTimeout(() => setState("viewing"), EDITING_MS);
      setState("editing");
    },
    setEditing(editing) {
      clearTimeout(idle);
      setState(editing ? "editing" : "viewing");
    },
    /** The display name, sent with the next beat. */
    setName(value) {
      name = value;
    },
    stop() {
      if (stopped) return;
      if (!hidden) leave();
      stopped = true;
      clearTimeout(idle);
      window.removeEventListener("pagehide", pagehide);
      window.removeEventListener("pageshow", pageshow);
    },
  };
}
