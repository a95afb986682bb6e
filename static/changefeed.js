/**
 * changefeed client: the one place that knows how a page learns of new versions.
 *
 *   const unsubscribe = subscribe(slug, {since, onChange, onStatus});
 *
 * - onChange({version, html, data, updated_at}) runs once for each newer
 *   version seen (a slow client may skip versions: it always ends at the newest).
 * - onStatus({state, ...}) reports the connection: "connecting", "live",
 *   "retrying" (with retryInMs) or "offline".
 *
 * This is the swap point. This version polls GET /changes every 2 s; a push
 * transport (Server-Sent Events, WebSocket, Pusher, Ably, Centrifugo) replaces
 * the body of subscribe() and keeps its signature, and nothing else in the
 * page, nor the save side, changes. The README shows how.
 */

export const POLL_INTERVAL_MS = 2000;
export const MAX_BACKOFF_MS = 30000;

/** Delay before retry number `failures` (1, 2, ...): doubling from the poll interval, with jitter. */
export function backoffMs(failures, retryAfterMs = 0) {
  const ceiling = Math.min(MAX_BACKOFF_MS, POLL_INTERVAL_MS * 2 ** (failures - 1));
  // Equal jitter: half fixed, half random, so a crowd of tabs does not retry in step.
  return Math.max(retryAfterMs, ceiling / 2 + Math.random() * (ceiling / 2));
}

export function subscribe(slug, {since = 0, onChange, onStatus = () => {}, intervalMs = POLL_INTERVAL_MS} = {}) {
  let version = since;
  let failures = 0;
  let timer = null;
  let inFlight = null;
  let stopped = false;

  const url = () => `/changes?slug=${encodeURIComponent(slug)}&since=${version}`;

  function schedule(delayMs) {
    clearTimeout(timer);
    timer = setTimeout(poll, delayMs);
  }

  async function poll() {
    timer = null;
    // A hidden tab does not poll at all; it asks at once when shown again.
    if (stopped || inFlight || document.visibilityState === "hidden") return;
    inFlight = new AbortController();
    try {
      // The browser revalidates with If-None-Match: an unchanged answer is a bodiless 304.
      const response = await fetch(url(), {signal: inFlight.signal, headers: {Accept: "application/json"}});
      if (!response.ok) throw new PollError(response);
      const body = await response.json();
      failures = 0;
      onStatus({state: "live"});
      if (body.changed && body.version > version) {
        version = body.version;
        onChange(body);
      }
      inFlight = null;
      schedule(intervalMs);
    } catch (error) {
      inFlight = null;
      if (stopped) return;
      failures += 1;
      const retryInMs = backoffMs(failures, error.retryAfterMs);
      const offline = navigator.onLine === false || retryInMs >= MAX_BACKOFF_MS / 2;
      onStatus({state: offline ? "offline" : "retrying", retryInMs, error: String(error.message || error)});
      schedule(retryInMs);
    }
  }

  function pollNow() {
    if (document.visibilityState !== "hidden") schedule(0);
  }

  document.addEventListener("visibilitychange", pollNow);
  window.addEventListener("online", pollNow);
  onStatus({state: "connecting"});
  poll();

  return function unsubscribe() {
    stopped = true;
    clearTimeout(timer);
    if (inFlight) inFlight.abort();
    document.removeEventListener("visibilitychange", pollNow);
    window.removeEventListener("online", pollNow);
  };
}

class PollError extends Error {
  constructor(response) {
    super(`GET /changes answered ${response.status}`);
    const seconds = Number(response.headers.get("Retry-After"));
    this.retryAfterMs = Number.isFinite(seconds) ? seconds * 1000 : 0;
  }
}
