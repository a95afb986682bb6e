/**
 * changefeed client: the one place that knows how a page learns of new versions.
 *
 *   const unsubscribe = subscribe(slug, {since, onChange, onStatus, transport});
 *
 * - onChange({version, html, data, updated_at}) runs once for each newer
 *   version seen (a slow client may skip versions: it always ends at the newest).
 * - onStatus({state, transport, retryInMs, shared, leader}) reports the
 *   connection: state is "connecting", "live", "retrying" or "offline".
 * - transport: "poll" (GET /changes every 2 s, the default), "longpoll"
 *   (GET /changes?wait=, answered the moment a save lands) or "sse"
 *   (an EventSource on /events; falls back to long-poll when the stream
 *   cannot be opened but the server answers).
 *
 * This is the swap point: a hosted channel (Pusher, Ably, Centrifugo) or a
 * WebSocket replaces the body of subscribe() and keeps its signature; nothing
 * else in the page, nor the save side, changes. The README shows how.
 *
 * The push transports are shared between the tabs of one browser: one
 * leader tab, elected with the Web Locks API, holds the connection for a slug
 * and relays what it hears to the others over a BroadcastChannel; when it
 * closes, another tab takes over. Ten tabs cost the server one connection
 * and stay clear of the browser's six connections per origin.
 */

export const TRANSPORTS = ["poll", "longpoll", "sse"];
export const POLL_INTERVAL_MS = 2000;
export const LONG_POLL_WAIT_S = 25;
export const BACKOFF_BASE_MS = 2000;
export const MAX_BACKOFF_MS = 30000;

/** Delay before retry number `failures` (1, 2, ...): full jitter under a doubling ceiling. */
export function backoffMs(failures, retryAfterMs = 0) {
  const ceiling = Math.min(MAX_BACKOFF_MS, BACKOFF_BASE_MS * 2 ** (failures - 1));
  // A random point under the ceiling, so a crowd of tabs never retries in step.
  return Math.max(retryAfterMs, Math.random() * ceiling);
}

export function subscribe(slug, options = {}) {
  const {transport = "poll"} = options;
  if (!TRANSPORTS.includes(transport)) throw new Error(`unknown transport ${transport}: use ${TRANSPORTS.join(", ")}`);
  // Polling stays per tab: a hidden tab stops polling, so a hidden leader would starve the others.
  const shareable = transport !== "poll" && "locks" in navigator && "BroadcastChannel" in window;
  return shareable && options.shared !== false ? shareAcrossTabs(slug, options) : connect(slug, options);
}

/** Open one real connection of the chosen transport; return its unsubscribe function. */
function connect(slug, {since = 0, onChange, onStatus = () => {}, transport = "poll"}) {
  const feed = {
    slug,
    version: since,
    transport,
    failures: 0,
    stopped: false,
    deliver(body) {
      if (body.changed && body.version > this.version) {
        this.version = body.version;
        onChange(body);
      }
    },
    live() {
      this.failures = 0;
      onStatus({state: "live", transport: this.transport});
    },
    /** Count a failure, report it, and return how long to wait before trying again. */
    failed(error) {
      this.failures += 1;
      const retryInMs = backoffMs(this.failures, error.retryAfterMs);
      const atCeiling = BACKOFF_BASE_MS * 2 ** (this.failures - 1) >= MAX_BACKOFF_MS;
      const state = navigator.onLine === false || atCeiling ? "offline" : "retrying";
      onStatus({state, retryInMs, transport: this.transport, error: String(error.message || error)});
      return retryInMs;
    },
  };
  let stop = null;
  feed.switchTo = (other) => {
    feed.transport = other;
    onStatus({state: "connecting", transport: other});
    stop = OPENERS[other](feed);
  };
  feed.switchTo(transport);
  return () => {
    feed.stopped = true;
    stop();
  };
}

/** GET /changes for the feed's version, waiting up to `waitS` seconds for a newer one. */
async function getChanges(feed, waitS, signal) {
  const wait = waitS ? `&wait=${waitS}` : "";
  const response = await fetch(`/changes?slug=${encodeURIComponent(feed.slug)}&since=${feed.version}${wait}`, {
    signal,
    headers: {Accept: "application/json"},
    // Polls revalidate with If-None-Match (an unchanged answer is a bodiless 304);
    // a long-poll is never worth keeping.
    cache: waitS ? "no-store" : "no-cache",
  });
  if (!response.ok) throw new RequestError(response);
  return response.json();
}

const OPENERS = {
  /** Ask every 2 s; not at all while the tab is hidden, and at once when it is shown again. */
  poll(feed) {
    let timer = null;
    let inFlight = null;

    function schedule(delayMs) {
      clearTimeout(timer);
      timer = setTimeout(poll, delayMs);
    }

    async function poll() {
      timer = null;
      if (feed.stopped || inFlight || document.visibilityState === "hidden") return;
      inFlight = new AbortController();
      let delayMs = POLL_INTERVAL_MS;
      try {
        const body = await getChanges(feed, 0, inFlight.signal);
        feed.live();
        feed.deliver(body);
      } catch (error) {
        if (feed.stopped) return;
        delayMs = feed.failed(error);
      } finally {
        inFlight = null;
      }
      schedule(delayMs);
    }

    function pollNow() {
      if (document.visibilityState !== "hidden") schedule(0);
    }

    document.addEventListener("visibilitychange", pollNow);
    window.addEventListener("online", pollNow);
    poll();
    return () => {
      clearTimeout(timer);
      if (inFlight) inFlight.abort();
      document.removeEventListener("visibilitychange", pollNow);
      window.removeEventListener("online", pollNow);
    };
  },

  /** Hold a request until a save lands (or 25 s pass), then ask again at once. */
  longpoll(feed) {
    const controller = new AbortController();
    let wake = null;
    const pause = (ms) => new Promise((resolve) => { wake = resolve; setTimeout(resolve, ms); });

    (async () => {
      let waitS = 0;  // the first answer comes at once, so the state is known at once
      while (!feed.stopped) {
        try {
          const body = await getChanges(feed, waitS, controller.signal);
          feed.live();
          feed.deliver(body);
          waitS = LONG_POLL_WAIT_S;
        } catch (error) {
          if (feed.stopped) return;
          await pause(feed.failed(error));
          waitS = 0;
        }
      }
    })();

    const retryNow = () => wake && wake();
    window.addEventListener("online", retryNow);
    return () => {
      controller.abort();
      retryNow();
      window.removeEventListener("online", retryNow);
    };
  },

  /** An EventSource on /events; this module, not the browser, decides when to reconnect. */
  sse(feed) {
    let source = null;
    let timer = null;
    let stopped = false;

    function open() {
      let opened = false;
      source = new EventSource(`/events?slug=${encodeURIComponent(feed.slug)}&since=${feed.version}`);
      source.onopen = () => {
        opened = true;
        feed.live();
      };
      source.addEventListener("change", (event) => feed.deliver(JSON.parse(event.data)));
      source.onerror = async () => {
        // Close it: EventSource would retry at a fixed pace; we back off with jitter,
        // and resume from the version we hold (the since= of the next URL).
        source.close();
        if (stopped) return;
        if (!opened && await serverAnswers(feed)) {
          stopped = true;  // the server is up but the stream cannot be opened: long-poll instead
          feed.switchTo("longpoll");
          return;
        }
        timer = setTimeout(open, feed.failed(new Error("event stream lost")));
      };
    }

    open();
    return () => {
      stopped = true;
      clearTimeout(timer);
      if (source) source.close();
    };
  },
};

/** Whether a plain GET /changes gets an answer: tells "the stream is refused" from "the server is down". */
async function serverAnswers(feed) {
  try {
    await getChanges(feed, 0);
    return true;
  } catch {
    return false;
  }
}

/** One connection for all the tabs of this browser on `slug`: a leader holds it, the others listen. */
function shareAcrossTabs(slug, {since = 0, onChange, onStatus = () => {}, transport}) {
  const name = `changefeed:${transport}:${slug}`;
  const channel = new BroadcastChannel(name);
  const abandon = new AbortController();
  let version = since;
  let latest = null;       // the newest change this tab has seen, for tabs that join later
  let lastStatus = null;   // what the leader last said of its connection
  let leaderStop = null;   // set while this tab is the leader
  let releaseLock = null;

  function deliver(body) {
    if (!latest || body.version > latest.version) latest = body;
    if (body.changed && body.version > version) {
      version = body.version;
      onChange(body);
    }
  }

  channel.onmessage = ({data}) => {
    if (data.type === "change") deliver(data.change);
    else if (data.type === "status") onStatus({...data.status, shared: true, leader: false});
    else if (data.type === "hello" && leaderStop) {
      if (latest) channel.postMessage({type: "change", change: latest});
      if (lastStatus) channel.postMessage({type: "status", status: lastStatus});
    }
  };

  onStatus({state: "connecting", transport, shared: true, leader: false});
  channel.postMessage({type: "hello"});  // a leader, if there is one, answers with what it has

  navigator.locks.request(name, {signal: abandon.signal}, () => new Promise((release) => {
    releaseLock = release;
    leaderStop = connect(slug, {
      since: version,
      transport,
      onChange(body) {
        deliver(body);
        channel.postMessage({type: "change", change: body});
      },
      onStatus(status) {
        lastStatus = status;
        onStatus({...status, shared: true, leader: true});
        channel.postMessage({type: "status", status});
      },
    });
  })).catch(() => {});  // AbortError: unsubscribed before this tab became the leader

  return () => {
    abandon.abort();
    if (leaderStop) leaderStop();
    if (releaseLock) releaseLock();
    channel.close();
  };
}

class RequestError extends Error {
  constructor(response) {
    super(`GET /changes answered ${response.status}`);
    const seconds = Number(response.headers.get("Retry-After"));
    this.retryAfterMs = Number.isFinite(seconds) ? seconds * 1000 : 0;
  }
}
