/**
 * changefeed client: the one place that knows how a page learns of new versions.
 *
 *   const unsubscribe = subscribe(slug, {since, epoch, onChange, onStatus, onPresence, transport});
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
 *   (an EventSource on /events; falls back to long-poll when the server
 *   refuses streams, but not for a 503 or 429 with Retry-After: "later") or
 *   "ws" (a WebSocket on /ws; falls back to long-poll when /ws does not
 *   exist, as behind a proxy that does not pass upgrades).
 * - since and epoch: the position already held (0 and null: none).
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
 * connection for a slug and relays what it hears (changes, presence lists,
 * its state) to the others over a BroadcastChannel; when it closes, or goes
 * silent (a frozen tab keeps its lock), another tab takes over. Ten tabs cost
 * the server one connection and stay clear of the browser's six connections
 * per origin.
 */

export const TRANSPORTS = ["poll", "longpoll", "sse", "ws"];
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

export function subscribe(slug, options = {}) {
  const {transport = "poll"} = options;
  if (!TRANSPORTS.includes(transport)) throw new Error(`unknown transport ${transport}: use ${TRANSPORTS.join(", ")}`);
  // Polling stays per tab: a hidden tab stops polling, so a hidden leader would starve the others.
  const shareable = transport !== "poll" && "locks" in navigator && "BroadcastChannel" in window;
  return shareable && options.shared !== false ? shareAcrossTabs(slug, options) : connect(slug, options);
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

/** Open one real connection of the chosen transport; return its unsubscribe function. */
function connect(slug, {since = 0, epoch = null, presence = 0, presenceForm = null, onChange, onStatus = () => {},
  onPresence = null, transport = "poll"}) {
  const feed = {
    slug,
    position: new Position(since, epoch),
    presence: onPresence ? new PresenceHeld(presence, presenceForm) : null,  // null: presence not asked for
    transport,
    failures: 0,
    stopped: false,
    /** Pass on what is news (a version, a presence list in the answer); return whether there was any. */
    deliver(body) {
      if (this.stopped) return false;
      const {presence: list, ...change} = body;
      const seen = list ? this.present(list) : false;
      if (!this.position.take(change)) return seen;
      onChange(change);
      return true;
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
    live() {
      this.failures = 0;
      onStatus({state: "live", transport: this.transport});
    },
    /** Count a failure, report it, and return how long to wait before trying again. */
    failed(error) {
      if (error.status === 401 || error.status === 403) {
        // A refused or expired token: asking again cannot help. Stop and say so.
        this.stopped = true;
        onStatus({state: "unauthorized", transport: this.transport, error: String(error.message || error),
          ...(error.reason ? {reason: error.reason} : {})});
        return 0;
      }
      this.failures += 1;
      const retryInMs = backoffMs(this.failures, error.retryAfterMs);
      // "offline" is the browser's word for having no network; a server that does not answer is "retrying".
      const state = navigator.onLine === false ? "offline" : "retrying";
      onStatus({state, retryInMs, transport: this.transport, error: String(error.message || error)});
      return retryInMs;
    },
  };
  let stop = null;
  feed.switchTo = (other) => {
    if (feed.stopped) return;
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

/** GET /changes for the feed's position, waiting up to `waitS` seconds for a newer version. */
async function getChanges(feed, waitS, signal) {
  const wait = waitS ? `&wait=${waitS}` : "";
  const response = await fetch(`${BASE}/changes?slug=${encodeURIComponent(feed.slug)}&${feed.query()}${wait}`, {
    signal,
    headers: {Accept: "application/json"},
    // Polls revalidate with If-None-Match (an unchanged answer is a bodiless 304);
    // a long-poll is never worth keeping.
    cache: waitS ? "no-store" : "no-cache",
  });
  if (!response.ok) throw new RequestError(response);
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
        const body = await getChanges(feed, 0, inFlight.signal);
        if (feed.stopped) return;
        feed.live();
        feed.deliver(body);
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
          const body = await getChanges(feed, waitS, controller.signal);
          if (feed.stopped) return;
          feed.live();
          const news = feed.deliver(body);
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

  /** An EventSource on /events; this module, not the browser, decides when to reconnect. */
  sse(feed) {
    let source = null;
    let timer = null;
    let stopped = false;
    const asking = new AbortController();  // the probe of probeStream(), cut by unsubscribe

    function open() {
      timer = null;
      if (stopped || feed.stopped) return;
      let opened = false;
      const url = `${BASE}/events?slug=${encodeURIComponent(feed.slug)}&${feed.query()}`;
      source = new EventSource(url);
      source.onopen = () => {
        opened = true;
        feed.live();
      };
      source.addEventListener("change", (event) => feed.deliver(JSON.parse(event.data)));
      source.addEventListener("presence", (event) => feed.present(JSON.parse(event.data)));
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

  /**
   * A WebSocket on /ws: subscribe on open, then change and presence frames.
   *
   * Reconnects with the same backoff, from the position held. A close with
   * 1008 (no valid token, another site's page) or 4001 (the token expired) is
   * never retried: asking again cannot help. A socket that never opens is
   * explained by a plain GET /ws (a browser never tells why): a 404, 405 or
   * 501 means this server or a proxy has no WebSocket, and the feed long-polls;
   * so does a third socket in a row that did not open though the server
   * answers (a proxy that does not pass the upgrade).
   */
  ws(feed) {
    let socket = null;
    let timer = null;
    let pinger = null;
    let stopped = false;
    let unopened = 0;  // sockets in a row that never opened though the server answered GET /ws
    const asking = new AbortController();  // the probe, cut by unsubscribe
    const url = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}${BASE}/ws`;

    function open() {
      timer = null;
      if (stopped || feed.stopped) return;
      let opened = false;
      let subscribed = false;
      let heardAt = Date.now();
      let pingedAt = 0;
      const current = socket = new WebSocket(url);

      function send(message) {
        if (current.readyState === WebSocket.OPEN) current.send(JSON.stringify(message));
      }

      /** Let go of this socket; return whether it was still the one in use. */
      function drop() {
        if (socket !== current) return false;
        socket = null;
        clearInterval(pinger);
        current.onopen = current.onmessage = current.onclose = null;
        if (current.readyState !== WebSocket.CLOSED) current.close();
        return !(stopped || feed.stopped);
      }

      /** Let go of this socket and try again after the backoff (or never, when feed.failed() says stop). */
      function lost(error) {
        if (!drop()) return;
        const delayMs = feed.failed(error);
        if (!feed.stopped) timer = setTimeout(open, delayMs);
      }

      current.onopen = () => {
        opened = true;
        unopened = 0;
        send({type: "subscribe", slug: feed.slug, since: feed.position.version, epoch: feed.position.epoch,
          ...(feed.presence ? {presence: feed.presence.version, presence_form: feed.presence.form || "list"} : {})});
        // The server pings too; this ping tells the page when the network went away without a close.
        pinger = setInterval(() => {
          if (pingedAt && heardAt < pingedAt && Date.now() - pingedAt > WS_PONG_WAIT_MS) {
            lost(new Error("the WebSocket went silent"));
          } else if (!pingedAt || heardAt >= pingedAt) {
            pingedAt = Date.now();
            send({type: "ping"});
          }
        }, WS_PING_MS);
      };

      current.onmessage = ({data}) => {
        heardAt = Date.now();
        let message;
        try {
          message = JSON.parse(data);
        } catch {
          return;
        }
        if (!message || ("slug" in message && message.slug !== feed.slug)) return;
        const {type, slug: _, ...body} = message;
        if (type === "subscribed") {
          subscribed = true;
          feed.live();
        } else if (type === "change") {
          feed.deliver(body);
        } else if (type === "presence") {
          feed.present(body);
        } else if (type === "error" && !subscribed && message.slug === feed.slug) {
          // The subscription was refused: no right to read this slug, or come back later.
          const error = new Error(body.message || body.error || "subscription refused");
          if (/scope|forbidden|right|token|auth/i.test(`${body.error} ${body.message}`)) error.status = 403;
          error.retryAfterMs = body.retry_after_ms || 0;
          lost(error);
        }
      };

      current.onclose = async (event) => {
        if (socket !== current) return;
        const error = new Error(`the WebSocket closed (${event.code}${event.reason ? `: ${event.reason}` : ""})`);
        if (event.code === 1008) error.status = 403;  // a policy violation: no valid token, or another site
        if (event.code === 4001) {
          error.status = 401;
          error.reason = "expired";
        }
        if (!opened && event.code === 1006) {
          const probe = await probeSocket(asking.signal);
          if (stopped || feed.stopped || socket !== current) return;
          // An answer that is neither "not allowed" nor "later", three times in a row: the server is
          // there but the upgrade never gets through (a proxy that does not pass it).
          if (probe.answered) unopened += 1;
          if (probe.refused || unopened >= WS_UNOPENED_TRIES) {
            // The server answers, but has no WebSocket here (or a proxy does not pass it): long-poll instead.
            if (drop()) {
              stopped = true;
              feed.switchTo("longpoll");
            }
            return;
          }
          Object.assign(error, probe);
        }
        lost(error);
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
      clearInterval(pinger);
      asking.abort();
      if (socket) {
        socket.onopen = socket.onmessage = socket.onclose = null;
        socket.close(1000);
      }
      socket = null;
      window.removeEventListener("online", openNow);
    };
  },
};

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
 * One connection for all the tabs of this browser on `slug`: a leader holds it, the others listen.
 *
 * The leader beats on the channel every second. A tab frozen by the browser
 * keeps its Web Lock but goes silent, so a visible follower that hears
 * nothing for a few beats steals the lock and connects; the old leader,
 * when it wakes, finds its lock stolen and becomes a follower.
 */
function shareAcrossTabs(slug, {since = 0, epoch = null, presence = 0, presenceForm = null, onChange,
  onStatus = () => {}, onPresence = null, transport}) {
  // Tabs that ask for presence (and in which form) share a connection that asks for it too.
  const name = `changefeed:${transport}:${slug}` + (onPresence ? `:presence:${presenceForm || "list"}` : "");
  const channel = new BroadcastChannel(name);
  const position = new Position(since, epoch);
  const held = new PresenceHeld(presence, presenceForm);
  let latest = null;       // the newest change this tab has seen, for tabs that join later
  let latestPresence = null;  // the newest presence list, likewise
  let lastStatus = null;   // what the leader last said of its connection
  let leader = null;       // while this tab leads: {stop, release}
  let queued = null;       // the AbortController of this tab's place in the queue for the lock
  let heardAt = Date.now();
  let closed = false;

  function deliver(body) {
    if (!position.take(body)) return;
    latest = body;
    onChange(body);
  }

  function present(list) {
    if (!onPresence || !held.take(list)) return;
    latestPresence = list;
    onPresence(list);
  }

  channel.onmessage = ({data}) => {
    if (data.type === "hello") {
      if (leader && latest) channel.postMessage({type: "change", change: latest});
      if (leader && latestPresence) channel.postMessage({type: "presence", presence: latestPresence});
      if (leader && lastStatus) channel.postMessage({type: "status", status: lastStatus});
      return;
    }
    heardAt = Date.now();  // a beat, a change or a status: a leader is alive
    if (data.type === "change") deliver(data.change);
    else if (data.type === "presence") present(data.presence);
    else if (data.type === "status" && !leader) onStatus({...data.status, shared: true, leader: false});
  };

  /** Hold the connection for every tab until released, or until another tab steals the lock. */
  function lead(release) {
    const stop = connect(slug, {
      since: position.version,
      epoch: position.epoch,
      presence: held.version,
      presenceForm,
      transport,
      onChange(body) {
        deliver(body);
        channel.postMessage({type: "change", change: body});
      },
      onPresence: onPresence && ((list) => {
        present(list);
        channel.postMessage({type: "presence", presence: list});
      }),
      onStatus(status) {
        lastStatus = status;
        onStatus({...status, shared: true, leader: true});
        channel.postMessage({type: "status", status});
      },
    });
    const beat = () => channel.postMessage({type: "beat"});
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
    navigator.locks.request(name, options, () => new Promise((release) => {
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

class RequestError extends Error {
  constructor(response) {
    super(`GET /changes answered ${response.status}`);
    this.status = response.status;
    const seconds = Number(response.headers.get("Retry-After"));
    this.retryAfterMs = Number.isFinite(seconds) ? seconds * 1000 : 0;
  }
}
