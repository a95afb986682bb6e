/**
 * changefeed client: the one place that knows how a page learns of new versions.
 *
 *   const unsubscribe = subscribe(slug, {since, epoch, onChange, onStatus, onPresence, transport, payload});
 *   const unsubscribe = subscribe({prefix}, {since, onChange, onReset, onStatus, transport, payload});
 *
 * - onChange({version, html, data, updated_at, epoch}) runs once for each
 *   newer version seen (a slow client may skip versions: it always ends at
 *   the newest). When the database is replaced or restored (a new epoch), the
 *   version may be lower than the last one: it is the newest all the same.
 * - onStatus({state, transport, retryInMs, shared, leader, error, reason})
 *   reports the connection: state is "connecting", "live", "retrying" (the
 *   server does not answer; retryInMs says when the next try is), "offline"
 *   (the browser has no network) or "unauthorized" (a 401/403, or a WebSocket
 *   closed with 1008 or 4001, reason "expired": nothing is retried).
 * - onPresence({version, count, editing, editors?}), when given, asks every
 *   transport for the page's presence list too (who has it open, who of them
 *   edits) and runs with each new list. Tabs tell they are there with
 *   present(), in presence.js.
 * - transport: "poll" (GET /changes every 2 s, the default), "longpoll"
 *   (GET /changes?wait=, answered the moment a save lands), "sse"
 *   (an EventSource on /events, one for all the tab's pages without presence;
 *   falls back to long-poll when the server refuses streams, but not for a
 *   503 or 429 with Retry-After: "later") or
 *   "ws" (the tab's one WebSocket on /ws, whatever it follows; falls back to
 *   long-poll when /ws does not exist, as behind a proxy that does not pass
 *   upgrades).
 * - payload: "full" (the default: events carry the page) or "version"
 *   (events carry the version only, and the page is fetched through the
 *   cacheable GET /changes before onChange: for large pages and many readers).
 * - since and epoch: the position already held (0 and null: none).
 *
 * A prefix follows every page whose slug starts with it (GET /feed,
 * /events?prefix=, or a prefix frame on the socket), pages created later
 * included: onChange({slug, version, updated_at, epoch, html?, data?,
 * deleted?}) runs for each new version of any of them (with payload
 * "version", slug and version only), and from since "0" (the default) first
 * for every page there is. since is a feed cursor; onReset({epoch}) says the
 * database is another one: forget every page, what follows is its state.
 *
 * After unsubscribe() nothing stays open and no callback runs.
 *
 * This is the swap point: a hosted channel (Pusher, Ably, Centrifugo)
 * replaces the body of subscribe() and keeps its signature, as the "ws"
 * transport here is one more opener behind it; nothing else in the page, nor
 * the save side, changes. docs/transports.md shows how.
 *
 * The push transports (longpoll, sse, ws) are shared between the tabs of one
 * browser: one leader tab, elected with the Web Locks API, holds the
 * connection for a slug (or a prefix) and relays what it hears (changes, presence lists,
 * its state) to the others over a BroadcastChannel; when it closes, or goes
 * silent (a frozen tab keeps its lock), another tab takes over. Ten tabs cost
 * the server one connection and stay clear of the browser's six connections
 * per origin.
 */

export const TRANSPORTS = ["poll", "longpoll", "sse", "ws"];
export const PAYLOADS = ["full", "version"];
export const FEED_LIMIT = 1000;  // entries per GET /feed of a prefix (it reads on while answers come full)
/**
 * Where the API answers: beside this file's folder (/static/changefeed.js: the root; a service
 * embedded under /feed serves /feed/static/changefeed.js and answers /feed/changes).
 */
export const BASE = new URL("..", import.meta.url).pathname.replace(/\/$/, "");
export const POLL_INTERVAL_MS = 2000;
export const LONG_POLL_WAIT_S = 25;
export const MIN_GAP_MS = 1000;
export const BACKOFF_BASE_MS = 2000;
export const MAX_BACKOFF_MS = 30000;
export const BEAT_MS = 1000;
export const MISSED_BEATS = 4;
export const WS_PING_MS = 25000;   // a WebSocket asks for a pong this often...
export const WS_PONG_WAIT_MS = 10000;  // ...and counts the socket lost when none comes in this time
export const WS_UNOPENED_TRIES = 3;  // sockets that never open, though the server answers, before long-polling

/** A pause of 1 to 2 s: the least time between two requests that brought no news. */
export function gapMs() {
  return MIN_GAP_MS * (1 + Math.random());
}

/** Delay before retry number `failures` (1, 2, ...): full jitter under a doubling ceiling, never under the gap. */
export function backoffMs(failures, retryAfterMs = 0) {
  const ceiling = Math.min(MAX_BACKOFF_MS, BACKOFF_BASE_MS * 2 ** (failures - 1));
  // A random point under the ceiling, so a crowd of tabs never retries in step.
  return Math.max(retryAfterMs, gapMs(), Math.random() * ceiling);
}

/**
 * Where a subscriber stands: the version it holds, of which database (epoch).
 *
 * A database replaced or restored from a backup has a new epoch, and its
 * versions may be lower than the ones held: they are taken all the same.
 */
export class Position {
  constructor(version = 0, epoch = null) {
    this.version = version;
    this.epoch = epoch;
  }

  /** Take in an answer or event; return whether it brings a version to show. */
  take(body) {
    if (body.epoch && this.epoch && body.epoch !== this.epoch) {
      this.epoch = body.epoch;
      // Unchanged: this database holds nothing we have seen; start from its beginning.
      this.version = body.changed ? body.version : 0;
      return Boolean(body.changed);
    }
    if (body.epoch) this.epoch = body.epoch;
    if (body.changed && body.version > this.version) {
      this.version = body.version;
      return true;
    }
    return false;
  }

  /** The query that asks for what comes after this position. */
  query() {
    return `since=${this.version}` + (this.epoch ? `&epoch=${encodeURIComponent(this.epoch)}` : "");
  }
}

export function subscribe(target, options = {}) {
  const {transport = "poll", payload = "full"} = options;
  if (!TRANSPORTS.includes(transport)) throw new Error(`unknown transport ${transport}: use ${TRANSPORTS.join(", ")}`);
  if (!PAYLOADS.includes(payload)) throw new Error(`unknown payload ${payload}: use ${PAYLOADS.join(" or ")}`);
  const prefix = typeof target === "string" ? null : target?.prefix;
  if (prefix !== null && typeof prefix !== "string") throw new Error('subscribe() follows a slug, or {prefix: "..."}');
  // Polling stays per tab: a hidden tab stops polling, so a hidden leader would starve the others.
  const shareable = transport !== "poll" && "locks" in navigator && "BroadcastChannel" in window;
  if (shareable && options.shared !== false) {
    return shareAcrossTabs(prefix === null ? pageRelay(target, options) : prefixRelay(prefix, options), options);
  }
  return connect(prefix === null ? pageFeed(target, options) : prefixFeed(prefix, options), options);
}

/** The presence a subscriber holds: the version of the last list seen (0: none), and which form it asks for. */
export class PresenceHeld {
  constructor(version = 0, form = null) {
    this.version = version;
    this.form = form;
  }

  /** Take in a presence list; return whether it is another one than the one held (versions are used once). */
  take(list) {
    if (!list || typeof list.version !== "number" || list.version === this.version) return false;
    this.version = list.version;
    return true;
  }

  /** The query that asks for presence after this list. */
  query() {
    return `&presence=${this.version}` + (this.form ? `&presence_form=${encodeURIComponent(this.form)}` : "");
  }
}

/**
 * Open one connection of the chosen transport for one subscription (`specific`: pageFeed() or prefixFeed());
 * return its unsubscribe function. Over "ws" the connection is the tab's one socket (SocketHub).
 */
function connect(specific, {onStatus = () => {}, transport = "poll"}) {
  const feed = Object.assign(specific, {
    transport,
    failures: 0,
    stopped: false,
    subscribed: false,  // over "ws": the server has answered this subscription's subscribe frame
    live() {
      this.failures = 0;
      onStatus({state: "live", transport: this.transport});
    },
    /** Count a failure, report it, and return how long to wait before trying again (`retryInMs`, when given). */
    failed(error, retryInMs) {
      if (error.status === 401 || error.status === 403) {
        // A refused or expired token: asking again cannot help. Stop and say so.
        this.stopped = true;
        onStatus({state: "unauthorized", transport: this.transport, error: String(error.message || error),
          ...(error.reason ? {reason: error.reason} : {})});
        return 0;
      }
      this.failures += 1;
      retryInMs ??= backoffMs(this.failures, error.retryAfterMs);
      // "offline" is the browser's word for having no network; a server that does not answer is "retrying".
      const state = navigator.onLine === false ? "offline" : "retrying";
      onStatus({state, retryInMs, transport: this.transport, error: String(error.message || error)});
      return retryInMs;
    },
  });
  let stop = null;
  feed.switchTo = (other) => {
    if (feed.stopped) return;
    if (stop) stop();  // the transport given up (it stopped itself already: this only lets go of a hub)
    feed.transport = other;
    onStatus({state: "connecting", transport: other});
    stop = OPENERS[other](feed);
  };
  const wentOffline = () => onStatus({state: "offline", transport: feed.transport});
  window.addEventListener("offline", wentOffline);
  feed.switchTo(transport);
  return () => {
    feed.stopped = true;
    window.removeEventListener("offline", wentOffline);
    stop();
  };
}

/**
 * What one page's subscription knows: the version held, presence if asked for, and how each transport asks
 * for and reads the page (GET /changes, /events?slug=, a subscribe frame on the socket).
 *
 * With payload "version" the events carry the version alone; the page itself is then fetched through
 * GET /changes, the same URL for every reader of that version, which the server's micro-cache (or a CDN)
 * answers once for all of them.
 */
function pageFeed(slug, {since = 0, epoch = null, presence = 0, presenceForm = null, onChange = null,
  onPresence = null, payload = "full"}) {
  const notified = payload === "version";
  return {
    slug,
    payload,
    key: `slug:${slug}`,
    position: new Position(since, epoch),
    presence: onPresence ? new PresenceHeld(presence, presenceForm) : null,  // null: presence not asked for
    fetching: false,  // payload "version": a GET /changes of the newest version is under way...
    again: false,     // ...and another notification came meanwhile
    fetchFailures: 0,
    eventTypes: ["change", "presence"],
    /** Pass on what is news (a version, a presence list in the answer); return whether there was any. */
    deliver(body) {
      if (this.stopped) return false;
      const {presence: list, ...change} = body;
      const seen = list ? this.present(list) : false;
      if (notified && onChange && change.changed && !("html" in change)) {
        // A notification only: fetch that version, then pass it on.
        if (!new Position(this.position.version, this.position.epoch).take(change)) return seen;
        this.fetchNewest();
        return true;
      }
      if (!this.position.take(change)) return seen;
      if (onChange) onChange(change);
      return true;
    },
    /** Fetch the newest version through GET /changes and pass it on; again if a notification came meanwhile. */
    async fetchNewest() {
      if (this.fetching) {
        this.again = true;
        return;
      }
      this.fetching = true;
      try {
        do {
          this.again = false;
          const body = await getJson(`${BASE}/changes?slug=${encodeURIComponent(slug)}&${this.position.query()}`, 0);
          if (this.stopped) return;
          const {presence: _, ...change} = body;
          if (this.position.take(change)) onChange(change);
        } while (this.again && !this.stopped);
        this.fetchFailures = 0;
      } catch (error) {
        if (this.stopped) return;
        this.fetchFailures += 1;
        const delayMs = error.status === 401 || error.status === 403 ? this.failed(error)
          : backoffMs(this.fetchFailures, error.retryAfterMs);
        if (!this.stopped) setTimeout(() => this.fetchNewest(), delayMs);
      } finally {
        this.fetching = false;
      }
    },
    /** Pass on a presence list when it is another one; return whether it was. */
    present(list) {
      if (this.stopped || !this.presence || !this.presence.take(list)) return false;
      onPresence(list);
      return true;
    },
    /** The query of a read from the position held: since, epoch and, when asked for, presence. */
    query() {
      return this.position.query() + (this.presence ? this.presence.query() : "");
    },
    /** GET /changes from the position held, waiting up to `waitS` seconds; return whether it brought news. */
    async read(waitS, signal) {
      const wait = waitS ? `&wait=${waitS}` : "";
      const body = await getJson(`${BASE}/changes?slug=${encodeURIComponent(slug)}&${this.query()}${wait}`, waitS,
        signal);
      if (this.stopped) return false;
      this.live();
      return this.deliver(body);
    },
    eventsUrl() {
      return `${BASE}/events?slug=${encodeURIComponent(slug)}&${this.query()}${notified ? "&payload=version" : ""}`;
    },
    hear(type, data) {
      if (type === "change") this.deliver(JSON.parse(data));
      else if (type === "presence") this.present(JSON.parse(data));
    },
    subscription() {
      return {type: "subscribe", slug, since: this.position.version, epoch: this.position.epoch,
        ...(this.presence ? {presence: this.presence.version, presence_form: this.presence.form || "list"} : {}),
        ...(notified ? {payload} : {})};
    },
    unsubscription() {
      return {type: "unsubscribe", slug};
    },
    hearFrame({type, slug: _, ...body}) {
      if (type === "change") this.deliver(body);
      else if (type === "presence") this.present(body);
    },
  };
}

/**
 * What one prefix's subscription knows: the feed cursor held, the version seen of each page under it,
 * and how each transport reads the feed (GET /feed, /events?prefix=, a subscribe frame on the socket).
 *
 * onChange({slug, version, updated_at, epoch, html?, data?, deleted?}) runs once per new version of any
 * page under the prefix, pages created later included; from `since` "0" (the default) it first runs for
 * every page there is, each at its newest version. onReset({epoch}) says the database is another one
 * (restored, replaced): forget every page; what follows is its whole state.
 */
function prefixFeed(prefix, {since = "0", onChange = () => {}, onReset = () => {}, payload = "full"}) {
  const content = payload === "full";
  return {
    prefix,
    key: `prefix:${prefix}`,
    cursor: String(since || "0"),
    epoch: null,
    versions: new Map(),  // slug -> the newest version passed on
    eventTypes: ["change", "reset"],
    /** Pass on an entry of the feed when it is a newer version of its page; return whether it was. */
    deliver(entry, cursor) {
      if (this.stopped) return false;
      if (cursor) this.cursor = cursor;
      if (entry.epoch) this.epoch = entry.epoch;
      if ((this.versions.get(entry.slug) ?? -1) >= entry.version) return false;
      this.versions.set(entry.slug, entry.version);
      onChange(entry);
      return true;
    },
    reset(epoch) {
      if (this.stopped) return;
      this.versions.clear();
      this.cursor = "0";
      this.epoch = epoch || null;
      onReset({epoch: this.epoch});
    },
    query() {
      return `prefix=${encodeURIComponent(prefix)}&since=${encodeURIComponent(this.cursor)}`;
    },
    /** GET /feed after the cursor held (reading on while answers come full); return whether it brought news. */
    async read(waitS, signal) {
      let news = false;
      for (;;) {
        const wait = waitS ? `&wait=${waitS}` : "";
        const url = `${BASE}/feed?${this.query()}&limit=${FEED_LIMIT}${content ? "&include=content" : ""}${wait}`;
        const response = await fetch(url, {signal, headers: {Accept: "application/json"},
          cache: waitS ? "no-store" : "no-cache"});
        if (response.status === 410) {  // a cursor of another database: start over from its beginning
          const {epoch = null} = await response.json().catch(() => ({}));
          this.reset(epoch);
          news = true;
          waitS = 0;
          continue;
        }
        if (!response.ok) throw new RequestError(response, "/feed");
        const body = await response.json();
        if (this.stopped) return false;
        this.live();
        for (const entry of body.changes) news = this.deliver({...entry, epoch: body.epoch}) || news;
        this.cursor = body.next;
        if (body.changes.length < FEED_LIMIT) return news;
        waitS = 0;  // a full answer: read on at once
      }
    },
    eventsUrl() {
      return `${BASE}/events?${this.query()}${content ? "" : "&payload=version"}`;
    },
    hear(type, data, id) {
      if (type === "reset") this.reset(JSON.parse(data).epoch);
      else if (type === "change") this.deliver(JSON.parse(data), id);
    },
    subscription() {
      return {type: "subscribe", prefix, since: this.cursor, ...(content ? {} : {payload})};
    },
    unsubscription() {
      return {type: "unsubscribe", prefix};
    },
    hearFrame({type, prefix: _, cursor, ...body}) {
      if (type === "change") this.deliver(body, cursor);
      else if (type === "reset") this.reset(body.epoch);
    },
  };
}

/** GET a JSON answer; waiting answers (`waitS`) are never kept, polls revalidate with If-None-Match (a 304). */
async function getJson(url, waitS, signal) {
  const response = await fetch(url, {signal, headers: {Accept: "application/json"},
    cache: waitS ? "no-store" : "no-cache"});
  if (!response.ok) throw new RequestError(response, new URL(url, location.href).pathname);
  return response.json();
}

/** A promise of `ms` milliseconds that `cut()` ends early (on unsubscribe, or when the network is back). */
function sleeper() {
  let cut = () => {};
  return {
    sleep: (ms) => new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      cut = () => { clearTimeout(timer); resolve(); };
    }),
    cut: () => cut(),
  };
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
        await feed.read(0, inFlight.signal);
      } catch (error) {
        if (feed.stopped) return;
        delayMs = feed.failed(error);
      } finally {
        inFlight = null;
      }
      if (!feed.stopped) schedule(delayMs);
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

  /**
   * Hold a request until a save lands (or 25 s pass), then ask again at once.
   *
   * An unchanged answer that comes early (a server shutting down, a proxy
   * cutting the wait) is followed by a pause, never by a tight loop.
   */
  longpoll(feed) {
    const controller = new AbortController();
    const pause = sleeper();

    (async () => {
      let waitS = 0;  // the first answer comes at once, so the state is known at once
      while (!feed.stopped) {
        const askedAt = Date.now();
        let delayMs = 0;
        try {
          const news = await feed.read(waitS, controller.signal);
          if (feed.stopped) return;
          if (!news && waitS && Date.now() - askedAt < (waitS - 1) * 1000) delayMs = gapMs();
          waitS = LONG_POLL_WAIT_S;
        } catch (error) {
          if (feed.stopped) return;
          delayMs = feed.failed(error);  // honours Retry-After
          waitS = 0;
        }
        if (delayMs) await pause.sleep(delayMs);
      }
    })();

    window.addEventListener("online", pause.cut);
    return () => {
      controller.abort();
      pause.cut();
      window.removeEventListener("online", pause.cut);
    };
  },

  /**
   * Server-Sent Events: the tab's pages (without presence) share one stream (StreamHub); a prefix, or a
   * page with presence (which follows one page), has a stream of its own.
   */
  sse(feed) {
    if (!feed.slug || feed.presence) return OPENERS.stream(feed);
    streamHubs[feed.payload] ??= new StreamHub(feed.payload);
    return streamHubs[feed.payload].join(feed);
  },

  /** An EventSource on /events; this module, not the browser, decides when to reconnect. */
  stream(feed) {
    let source = null;
    let timer = null;
    let stopped = false;
    const asking = new AbortController();  // the probe of probeStream(), cut by unsubscribe

    function open() {
      timer = null;
      if (stopped || feed.stopped) return;
      let opened = false;
      const url = feed.eventsUrl();
      source = new EventSource(url);
      source.onopen = () => {
        opened = true;
        feed.live();
      };
      for (const type of feed.eventTypes) {
        source.addEventListener(type, (event) => feed.hear(type, event.data, event.lastEventId));
      }
      source.onerror = async () => {
        // Close it: EventSource would retry at a fixed pace; we back off with jitter,
        // and resume from the position we hold (the since= and epoch= of the next URL).
        source.close();
        if (stopped) return;
        const probe = opened ? {} : await probeStream(url, asking.signal);
        if (stopped) return;  // unsubscribed while we asked: open nothing more
        if (probe.refused) {
          stopped = true;  // the server is up but the stream cannot be opened: long-poll instead
          feed.switchTo("longpoll");
          return;
        }
        const error = new Error(probe.error || "event stream lost");
        error.retryAfterMs = probe.retryAfterMs;
        error.status = probe.status;
        timer = setTimeout(open, feed.failed(error));
      };
    }

    function openNow() {
      if (timer === null) return;
      clearTimeout(timer);
      open();
    }

    window.addEventListener("online", openNow);
    open();
    return () => {
      stopped = true;
      clearTimeout(timer);
      asking.abort();
      if (source) source.close();
      window.removeEventListener("online", openNow);
    };
  },

  /** The tab's one WebSocket on /ws (SocketHub): this subscription's frames on it. */
  ws(feed) {
    socketHub ??= new SocketHub();
    return socketHub.join(feed);
  },
};

let socketHub = null;  // the tab's WebSocket, opened by the first subscription over "ws"
const streamHubs = {};  // payload -> the tab's one event stream of its pages over "sse"

/**
 * The tab's pages over "sse" on one stream: GET /events?slug=a&slug=b... (the feed form).
 *
 * A lone page keeps the page's own stream (its since and epoch, as ever);
 * from two on, one stream names them all, and each event names its page.
 * The set changes in bursts (a dashboard subscribes to all its pages at
 * once), so a change waits for the end of the burst, then opens the stream
 * again from the beginning of the feed: each page's newest version once,
 * which each page's position takes or leaves. A lost stream reconnects from
 * the cursor of the last event (its id), with the usual backoff; a stream
 * the server refuses makes every page long-poll, as for a lone page.
 */
class StreamHub {
  constructor(payload) {
    this.payload = payload;
    this.members = new Map();  // slug -> the subscriptions of it in this tab
    this.lone = null;          // while one page: {feed, stop} of its own stream
    this.source = null;
    this.cursor = "0";         // where the stream of the whole set resumes
    this.timer = null;         // the next open: after a burst of changes, or after a backoff
    this.failures = 0;
    this.asking = null;
  }

  join(feed) {
    const members = this.members.get(feed.slug) || new Set();
    this.members.set(feed.slug, members.add(feed));
    this.changed();
    return () => this.leave(feed);
  }

  leave(feed) {
    if (this.remove(feed)) this.changed();
  }

  remove(feed) {
    if (!this.members.get(feed.slug)?.delete(feed)) return false;
    if (!this.members.get(feed.slug).size) this.members.delete(feed.slug);
    return true;
  }

  all() {
    return [...this.members.values()].flatMap((members) => [...members]);
  }

  /** The set changed: open again once the burst is over (a lone page at once). */
  changed() {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.arrange(), 0);
  }

  arrange() {
    this.timer = null;
    const feeds = this.all();
    if (this.lone && (feeds.length !== 1 || feeds[0] !== this.lone.feed)) {
      this.lone.stop();
      this.lone = null;
    }
    this.close();
    if (feeds.length === 1 && !this.lone) this.lone = {feed: feeds[0], stop: OPENERS.stream(feeds[0])};
    if (feeds.length > 1) {
      this.cursor = "0";
      this.open();
    }
  }

  close() {
    this.asking?.abort();
    if (this.source) this.source.close();
    this.source = null;
  }

  open() {
    this.timer = null;
    this.close();
    const slugs = [...this.members.keys()];
    if (slugs.length < 2) return;
    const url = `${BASE}/events?${slugs.map((slug) => `slug=${encodeURIComponent(slug)}`).join("&")}`
      + `&since=${encodeURIComponent(this.cursor)}${this.payload === "version" ? "&payload=version" : ""}`;
    let opened = false;
    const source = this.source = new EventSource(url);
    source.onopen = () => {
      opened = true;
      this.failures = 0;
      for (const feed of this.all()) feed.live();
    };
    source.addEventListener("change", (event) => {
      const {slug, deleted, ...entry} = JSON.parse(event.data);
      this.cursor = event.lastEventId || this.cursor;
      // An entry of the feed, as the page's own stream says it: a tombstone has an empty page.
      const change = {changed: true, ...entry, ...(deleted ? {deleted: true} : {})};
      if (deleted && this.payload !== "version") Object.assign(change, {html: "", data: null});
      for (const feed of this.members.get(slug) || []) feed.deliver(change);
    });
    source.addEventListener("reset", () => {
      this.cursor = "0";  // another database: its whole state follows, each page's position takes it
    });
    source.onerror = async () => {
      source.close();
      if (this.source !== source) return;
      this.asking = new AbortController();
      const probe = opened ? {} : await probeStream(url, this.asking.signal);
      if (this.source !== source) return;  // the set changed meanwhile: a new stream is on its way
      this.source = null;
      const feeds = this.all();
      if (probe.refused) {  // the server is up but the stream cannot be opened: long-poll instead
        for (const feed of feeds) feed.switchTo("longpoll");  // each leaves this hub first
        return;
      }
      const error = new Error(probe.error || "event stream lost");
      error.retryAfterMs = probe.retryAfterMs;
      error.status = probe.status;
      this.failures += 1;
      const delayMs = backoffMs(this.failures, error.retryAfterMs);
      for (const feed of feeds) {
        feed.failed(error, delayMs);
        if (feed.stopped) this.remove(feed);
      }
      // Two pages or more: the same stream again; one left: its own stream.
      if (this.members.size) this.timer = setTimeout(() => (this.members.size > 1 ? this.open() : this.arrange()), delayMs);
    };
  }
}

/**
 * The tab's one WebSocket on /ws, shared by every subscription of the tab over "ws".
 *
 * Each subscription (a page, a prefix) sends its own subscribe frame, and
 * the frames that come back name their slug or prefix: a dashboard of fifty
 * pages costs one socket, and stays clear of the browser's six connections
 * per origin. The socket reconnects with the usual backoff, and each
 * subscription subscribes again from the position it holds; it closes when
 * the last one leaves. A close with 1008 (no valid token, another site's
 * page) or 4001 (the token expired) is never retried: asking again cannot
 * help. A socket that never opens is explained by a plain GET /ws (a browser
 * never tells why): a 404, 405 or 501 means this server or a proxy has no
 * WebSocket, and every subscription long-polls; so does a third socket in a
 * row that did not open though the server answers (a proxy that does not
 * pass the upgrade).
 */
class SocketHub {
  constructor() {
    this.members = new Map();  // key ("slug:S", "prefix:P") -> the subscriptions of it in this tab
    this.socket = null;
    this.timer = null;    // the next try, while backing off
    this.pinger = null;
    this.failures = 0;
    this.unopened = 0;    // sockets in a row that never opened though the server answered GET /ws
    this.asking = null;   // the probe under way, cut when the last subscription leaves
    this.openNow = () => {
      if (this.timer === null) return;
      clearTimeout(this.timer);
      this.open();
    };
  }

  /** Add a subscription: subscribe now if the socket is open, else when it opens. Return how to leave. */
  join(feed) {
    if (!this.members.size) window.addEventListener("online", this.openNow);
    const members = this.members.get(feed.key) || new Set();
    this.members.set(feed.key, members.add(feed));
    if (this.socket?.readyState === WebSocket.OPEN) this.subscribe(feed);
    else if (!this.socket && this.timer === null) this.open();
    return () => this.leave(feed);
  }

  /** Remove a subscription: unsubscribe when no other of this tab follows the same; close after the last. */
  leave(feed) {
    const members = this.members.get(feed.key);
    if (!members?.delete(feed)) return;
    clearTimeout(feed.resubscribing);
    if (members.size) return;
    this.members.delete(feed.key);
    this.send(feed.unsubscription());
    if (this.members.size) return;
    window.removeEventListener("online", this.openNow);
    clearTimeout(this.timer);
    this.timer = null;
    this.asking?.abort();
    this.drop(1000);
  }

  all() {
    return [...this.members.values()].flatMap((members) => [...members]);
  }

  send(message) {
    if (this.socket?.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(message));
  }

  /**
   * Send one subscription's subscribe frame. The server keeps one subscription per page per socket, and
   * the last frame sets it: after one without presence, one that asks for it goes again.
   */
  subscribe(feed) {
    feed.subscribed = false;
    this.send(feed.subscription());
    if (feed.presence) return;
    const asking = [...this.members.get(feed.key)].find((other) => other !== feed && other.presence);
    if (asking) this.send(asking.subscription());
  }

  open() {
    this.timer = null;
    if (!this.members.size) return;
    let opened = false;
    let heardAt = Date.now();
    let pingedAt = 0;
    const current = this.socket = new WebSocket(`${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}${BASE}/ws`);

    current.onopen = () => {
      opened = true;
      this.unopened = 0;
      // Those that ask for presence last, so that no other frame of the same page takes it away.
      for (const feed of this.all().sort((a, b) => Boolean(a.presence) - Boolean(b.presence))) {
        feed.subscribed = false;
        this.send(feed.subscription());
      }
      // The server pings too; this ping tells the page when the network went away without a close.
      this.pinger = setInterval(() => {
        if (pingedAt && heardAt < pingedAt && Date.now() - pingedAt > WS_PONG_WAIT_MS) {
          this.lost(new Error("the WebSocket went silent"));
        } else if (!pingedAt || heardAt >= pingedAt) {
          pingedAt = Date.now();
          this.send({type: "ping"});
        }
      }, WS_PING_MS);
    };

    current.onmessage = ({data}) => {
      heardAt = Date.now();
      this.hear(data);
    };

    current.onclose = async (event) => {
      if (this.socket !== current) return;
      const error = new Error(`the WebSocket closed (${event.code}${event.reason ? `: ${event.reason}` : ""})`);
      if (event.code === 1008) error.status = 403;  // a policy violation: no valid token, or another site
      if (event.code === 4001) {
        error.status = 401;
        error.reason = "expired";
      }
      if (!opened && event.code === 1006) {
        this.asking = new AbortController();
        const probe = await probeSocket(this.asking.signal);
        if (this.socket !== current) return;  // every subscription left meanwhile
        // An answer that is neither "not allowed" nor "later", three times in a row: the server is
        // there but the upgrade never gets through (a proxy that does not pass it).
        if (probe.answered) this.unopened += 1;
        if (probe.refused || this.unopened >= WS_UNOPENED_TRIES) {
          // The server answers, but has no WebSocket here (or a proxy does not pass it): long-poll instead.
          const feeds = this.all();
          for (const feed of feeds) this.leave(feed);
          for (const feed of feeds) feed.switchTo("longpoll");
          return;
        }
        Object.assign(error, probe);
      }
      this.lost(error);
    };
  }

  /** Route a frame to the subscriptions it names (its prefix, or its slug). */
  hear(data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return;
    }
    if (!message || typeof message !== "object") return;
    const key = "prefix" in message ? `prefix:${message.prefix}` : "slug" in message ? `slug:${message.slug}` : null;
    if (key === null && message.type !== "error") return;  // a pong, a beat
    // An error that names nothing answers a subscribe frame the server could not read: those not answered yet.
    const feeds = key === null ? this.all().filter((feed) => !feed.subscribed) : [...(this.members.get(key) || [])];
    for (const feed of feeds) {
      if (message.type === "subscribed") {
        this.failures = 0;
        feed.subscribed = true;
        feed.live();
      } else if (message.type === "error") {
        if (!feed.subscribed) this.refused(feed, message);
      } else {
        feed.hearFrame(message);
      }
    }
  }

  /** A subscription was refused: stop it (no right to read this), or subscribe again after the backoff. */
  refused(feed, body) {
    const error = new Error(body.message || body.error || "subscription refused");
    if (/scope|forbidden|right|token|auth/i.test(`${body.error} ${body.message}`)) error.status = 403;
    error.retryAfterMs = body.retry_after_ms || 0;
    const delayMs = feed.failed(error);
    if (feed.stopped) {
      this.leave(feed);
      return;
    }
    clearTimeout(feed.resubscribing);
    feed.resubscribing = setTimeout(() => this.subscribe(feed), delayMs);
  }

  /** Let go of the socket, and every subscription waits for the next try (or stops, when told to). */
  lost(error) {
    this.drop();
    this.failures += 1;
    const delayMs = backoffMs(this.failures, error.retryAfterMs);
    for (const feed of this.all()) {
      feed.subscribed = false;
      feed.failed(error, delayMs);
      if (feed.stopped) this.leave(feed);
    }
    if (this.members.size) this.timer = setTimeout(() => this.open(), delayMs);
  }

  drop(code) {
    const current = this.socket;
    if (!current) return;
    this.socket = null;
    clearInterval(this.pinger);
    current.onopen = current.onmessage = current.onclose = null;
    if (current.readyState !== WebSocket.CLOSED) current.close(code);
  }
}

/**
 * Ask /events why the stream would not open (EventSource never tells).
 *
 * A 503 or 429 with Retry-After (a server shutting down, a database not
 * readable yet, too many streams open) or a stream that opens now means "later"; another answer means this
 * server or a proxy refuses streams ({refused: true}); no answer, the server is down.
 */
async function probeStream(url, signal) {
  const probe = new AbortController();
  const cut = () => probe.abort();
  signal.addEventListener("abort", cut);
  try {
    const response = await fetch(url, {signal: probe.signal, headers: {Accept: "text/event-stream"}, cache: "no-store"});
    const type = response.headers.get("Content-Type") || "";
    if (response.ok && type.startsWith("text/event-stream")) return {};
    if (response.status === 401 || response.status === 403) {
      return {status: response.status, error: `GET /events answered ${response.status}`};
    }
    const seconds = Number(response.headers.get("Retry-After"));
    const later = response.status === 503 || response.status === 429;  // 429: this client holds too many streams
    if (later && response.headers.has("Retry-After") && Number.isFinite(seconds)) {
      return {retryAfterMs: seconds * 1000, error: `GET /events answered ${response.status}`};
    }
    return {refused: true};
  } catch {
    return {error: "the server does not answer"};
  } finally {
    probe.abort();  // the probe is never read: a stream that opened is closed at once
    signal.removeEventListener("abort", cut);
  }
}

/**
 * Ask /ws, without an upgrade, why the WebSocket would not open (a browser never tells).
 *
 * 401/403: not allowed (stop); 404, 405 or 501: this server or a proxy has no
 * WebSocket ({refused: true}); a 503 or 429 with Retry-After: later; any other
 * answer (400 or 426 "use a WebSocket"): it is there, try again; no answer: the server is down.
 */
async function probeSocket(signal) {
  try {
    const response = await fetch(`${BASE}/ws`, {signal, headers: {Accept: "application/json"}, cache: "no-store"});
    response.body?.cancel().catch(() => {});
    if (response.status === 401 || response.status === 403) {
      return {status: response.status, message: `GET /ws answered ${response.status}`};
    }
    if ([404, 405, 501].includes(response.status)) return {refused: true};
    const seconds = Number(response.headers.get("Retry-After"));
    const later = response.headers.has("Retry-After") && Number.isFinite(seconds);
    return {retryAfterMs: later ? seconds * 1000 : 0, answered: !later,
      message: `the WebSocket did not open (GET /ws answered ${response.status})`};
  } catch {
    return {message: "the server does not answer"};
  }
}

/**
 * One connection for all the tabs of this browser on what `relay` follows: a leader holds it, the others listen.
 *
 * The leader beats on the channel every second. A tab frozen by the browser
 * keeps its Web Lock but goes silent, so a visible follower that hears
 * nothing for a few beats steals the lock and connects; the old leader,
 * when it wakes, finds its lock stolen and becomes a follower. A tab that
 * joins says hello, and the leader replays what it holds (relay.replay()).
 */
function shareAcrossTabs(relay, {onStatus = () => {}, transport}) {
  const channel = new BroadcastChannel(relay.name);
  let lastStatus = null;   // what the leader last said of its connection
  let leader = null;       // while this tab leads: {stop, release}
  let queued = null;       // the AbortController of this tab's place in the queue for the lock
  let heardAt = Date.now();
  let closed = false;

  channel.onmessage = ({data}) => {
    if (data.type === "hello") {
      if (!leader) return;
      for (const message of relay.replay()) channel.postMessage(message);
      if (lastStatus) channel.postMessage({type: "status", status: lastStatus});
      return;
    }
    heardAt = Date.now();  // a beat, a change or a status: a leader is alive
    if (data.type === "status") {
      if (!leader) onStatus({...data.status, shared: true, leader: false});
    } else {
      relay.hear(data);
    }
  };

  /** Hold the connection for every tab until released, or until another tab steals the lock. */
  function lead(release) {
    const stop = relay.connect((message) => channel.postMessage(message), (status) => {
      lastStatus = status;
      onStatus({...status, shared: true, leader: true});
      channel.postMessage({type: "status", status});
    });
    const beat = () => channel.postMessage({type: "beat", ...relay.beat()});
    const beats = setInterval(beat, BEAT_MS);
    beat();
    return {release, stop() { clearInterval(beats); stop(); }};
  }

  function stepDown() {
    if (!leader) return;
    leader.stop();
    leader.release();
    leader = null;
  }

  /** Ask for the lock: wait in line, or (steal) take it from a leader that went silent. */
  function campaign(steal) {
    if (closed) return;
    let mine = null;
    queued = steal ? null : new AbortController();
    const options = steal ? {steal: true} : {signal: queued.signal};
    navigator.locks.request(relay.name, options, () => new Promise((release) => {
      queued = null;
      if (closed) return release();
      leader = mine = lead(release);
    })).catch(() => {
      // Aborted while in line (unsubscribed, or about to steal), or stolen while leading.
      if (!mine || leader !== mine) return;
      leader.stop();
      leader = null;
      lastStatus = null;
      heardAt = Date.now();
      onStatus({state: "connecting", transport, shared: true, leader: false});
      channel.postMessage({type: "hello"});
      campaign(false);
    });
  }

  function checkLeader() {
    if (leader || closed || document.visibilityState === "hidden") return;
    if (Date.now() - heardAt < MISSED_BEATS * BEAT_MS) return;
    heardAt = Date.now();  // one try per silence
    if (queued) queued.abort();
    campaign(true);
  }

  onStatus({state: "connecting", transport, shared: true, leader: false});
  channel.postMessage({type: "hello"});  // a leader, if there is one, answers with what it has
  campaign(false);
  const watchdog = setInterval(checkLeader, BEAT_MS * (0.5 + Math.random() / 2));
  document.addEventListener("visibilitychange", checkLeader);

  return () => {
    closed = true;
    clearInterval(watchdog);
    document.removeEventListener("visibilitychange", checkLeader);
    if (queued) queued.abort();
    stepDown();
    channel.close();
  };
}

/** What the tabs sharing one page's connection hold and tell each other: its newest version and presence list. */
function pageRelay(slug, {since = 0, epoch = null, presence = 0, presenceForm = null, onChange = null,
  onPresence = null, transport, payload = "full"}) {
  const position = new Position(since, epoch);
  const held = new PresenceHeld(presence, presenceForm);
  let latest = null;          // the newest change this tab has seen, for tabs that join later
  let latestPresence = null;  // the newest presence list, likewise

  function deliver(body) {
    if (!position.take(body)) return;
    latest = body;
    if (onChange) onChange(body);
  }

  function present(list) {
    if (!onPresence || !held.take(list)) return;
    latestPresence = list;
    onPresence(list);
  }

  return {
    // Tabs that ask for presence (and in which form) share a connection that asks for it too; tabs that
    // follow presence alone (no onChange), one of their own, which fetches no page.
    name: `changefeed:${transport}:${slug}` + (onPresence ? `:presence:${presenceForm || "list"}` : "")
      + (onChange ? "" : ":presence-only"),
    replay: () => [latest && {type: "change", change: latest},
      latestPresence && {type: "presence", presence: latestPresence}].filter(Boolean),
    hear(data) {
      if (data.type === "change") deliver(data.change);
      else if (data.type === "presence") present(data.presence);
    },
    beat: () => ({}),
    connect(post, onStatus) {
      const options = {
        since: position.version, epoch: position.epoch, presence: held.version, presenceForm, transport, payload,
        onStatus,
        // Without an onChange, a notification-only subscription fetches no page (it follows presence).
        onChange: onChange && ((body) => {
          deliver(body);
          post({type: "change", change: body});
        }),
        onPresence: onPresence && ((list) => {
          present(list);
          post({type: "presence", presence: list});
        }),
      };
      return connect(pageFeed(slug, options), options);
    },
  };
}

/**
 * What the tabs sharing one prefix's connection hold and tell each other: the newest entry of each page
 * (replayed to a tab that joins), and the leader's cursor (where a follower that takes over goes on from).
 */
function prefixRelay(prefix, {since = "0", onChange = () => {}, onReset = () => {}, transport, payload = "full"}) {
  let cursor = String(since || "0");
  const latest = new Map();  // slug -> the newest entry passed on

  function take(entry) {
    if ((latest.get(entry.slug)?.version ?? -1) >= entry.version) return;
    latest.set(entry.slug, entry);
    onChange(entry);
  }

  function reset(epoch) {
    latest.clear();
    cursor = "0";
    onReset({epoch});
  }

  return {
    name: `changefeed:${transport}:prefix:${payload}:${prefix}`,
    replay: () => [...latest.values()].map((entry) => ({type: "change", change: entry})),
    hear(data) {
      if (data.type === "change") take(data.change);
      else if (data.type === "reset") reset(data.epoch);
      if (data.cursor) cursor = data.cursor;
    },
    beat: () => ({cursor}),
    connect(post, onStatus) {
      const options = {
        since: cursor, transport, payload, onStatus,
        onChange(entry) {
          take(entry);
          cursor = feed.cursor;
          post({type: "change", change: entry, cursor});
        },
        onReset({epoch}) {
          reset(epoch);
          post({type: "reset", epoch});
        },
      };
      const feed = prefixFeed(prefix, options);
      return connect(feed, options);
    },
  };
}

class RequestError extends Error {
  constructor(response, path) {
    super(`GET ${path} answered ${response.status}`);
    this.status = response.status;
    const seconds = Number(response.headers.get("Retry-After"));
    this.retryAfterMs = Number.isFinite(seconds) ? seconds * 1000 : 0;
  }
}
