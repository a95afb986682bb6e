vcl 4.1;
# changefeed behind Varnish: many long-polls of one page, one request to the service.
#
# A thousand tabs long-polling one page all ask the same URL
# (/changes?slug=S&since=V&wait=25). Varnish puts every request for a URL
# that is being fetched on its waiting list and, the moment the one fetch
# answers (a save landed), hands that answer to all of them: 1,000 held
# requests cost about one request to the service per save, and hear of it
# at once (nginx's cache lock looks for the answer every 0.5 s).
#
# Use it where long-polling readers of one page number in the thousands
# (docs/production.md, "Many readers of one page"). Varnish speaks no TLS:
# put it behind nginx or another TLS terminator (proxy_pass to Varnish's
# port), or use it alone on a private network. Debian: apt-get install
# varnish, save this file as /etc/varnish/default.vcl, change the lines
# marked EDIT, `systemctl restart varnish` (it listens on :6081). Tested
# with Varnish 7.1 by tests/test_varnish.py.

import directors;
import std;

# The service says it is ready (200) or not (503: its database cannot be read).
probe ready {
    .url = "/readyz";
    .interval = 2s;
    .timeout = 1s;
    .window = 3;
    .threshold = 2;
}

# EDIT: one backend per gunicorn server (deploy/changefeed.service runs one on
# 127.0.0.1:8000), as nginx.conf's upstream lists them.
backend server_1 {
    .host = "127.0.0.1";
    .port = "8000";
    .host_header = "localhost";  # the probe's Host: one of CHANGEFEED_TRUSTED_HOSTS
    .probe = ready;
    .connect_timeout = 1s;
    .first_byte_timeout = 75s;    # a long-poll waits up to CHANGEFEED_MAX_WAIT_S (60 s) for its first byte
    .between_bytes_timeout = 75s;
}
backend server_2 {
    .host = "127.0.0.1";
    .port = "8001";
    .host_header = "localhost";
    .probe = ready;
    .connect_timeout = 1s;
    .first_byte_timeout = 75s;
    .between_bytes_timeout = 75s;
}

sub vcl_init {
    new servers = directors.round_robin();
    servers.add_backend(server_1);
    servers.add_backend(server_2);
}

sub vcl_recv {
    set req.backend_hint = servers.backend();
    # Prometheus scrapes each server directly (docs/operations.md: Metrics), never through here.
    if (req.url ~ "^/metrics") {
        return (synth(404));
    }
    # WebSockets and event streams: passed through as they are, each byte at once.
    if (req.http.Upgrade ~ "(?i)websocket" || req.url ~ "^/events") {
        return (pipe);
    }
    if (req.method != "GET" && req.method != "HEAD") {
        return (pass);  # saves, deletes, beats: the service's own
    }
    if (req.url ~ "^/changes\?") {
        # A request with a token (the header, or the read cookie of POST
        # /session) is its sender's alone: it is never shared, nor answered
        # from what another request fetched.
        if (req.http.Authorization || req.http.Cookie ~ "(^|;\s*)changefeed_read=") {
            return (pass);
        }
        unset req.http.Cookie;  # the service reads no other cookie
        set req.url = std.querysort(req.url);  # since=3&slug=a and slug=a&since=3: one URL
        if (req.restarts == 0) {
            set req.http.X-Changefeed-Came = std.time2real(now, 0.0);  # when it came in (vcl_hit)
        }
        return (hash);
    }
    return (pass);  # the page, the feed, the API document: not shared here
}

sub vcl_hash {
    # The next round of an unchanged long-poll: a key of its own (vcl_hit).
    if (req.http.X-Changefeed-Round) {
        hash_data(req.http.X-Changefeed-Round);
    }
    # Then the built-in key: the URL and the host.
}

sub vcl_hit {
    # An unchanged long-poll answer serves only the requests that came before
    # it was made: those that waited with its fetch. A request that comes
    # after it (a tab asking again at once, its wait over) must wait for the
    # next save, not be told "unchanged" again and again for a second: it
    # looks again under a key named after that answer, which every tab of
    # this round shares, so the round is one new request to the service.
    if (obj.http.X-Changefeed-Unchanged &&
        std.real(req.http.X-Changefeed-Came, 0.0) > std.real(obj.http.X-Changefeed-Unchanged, 0.0)) {
        set req.http.X-Changefeed-Round = obj.http.X-Changefeed-Unchanged;
        return (restart);
    }
}

sub vcl_pipe {
    if (req.http.Upgrade) {
        set bereq.http.Upgrade = req.http.Upgrade;
        set bereq.http.Connection = req.http.Connection;
    }
}

sub vcl_backend_response {
    if (bereq.url ~ "^/changes\?" && !bereq.uncacheable) {
        # No stale answers: an answer is new, or it is fetched again.
        set beresp.grace = 0s;
        set beresp.keep = 0s;
        unset beresp.http.X-Accel-Expires;  # nginx's
        # Every answer is kept 1 s: the service says s-maxage=1 (a reader a
        # second late at most; a changed answer serves any tab behind it),
        # or no-cache for an unchanged long-poll answer, which vcl_hit
        # serves only to the requests that waited for it (it is marked with
        # when it was made). An error is kept a second too: the service
        # says when to ask again. Never 0 s: Varnish serves no 0 s object,
        # not even to its waiting list, which would then ask one by one.
        if (beresp.status == 200 && beresp.http.Cache-Control ~ "no-cache") {
            set beresp.http.X-Changefeed-Unchanged = std.time2real(now, 0.0);
        }
        set beresp.ttl = 1s;
        # Deliver here, past the built-in rules, which would make a no-cache
        # answer "hit-for-miss": each waiting request sent to the service alone.
        return (deliver);
    }
}

sub vcl_deliver {
    unset resp.http.X-Changefeed-Unchanged;
    # HIT when the answer came from another request's fetch (the waiting list included): for your tests.
    if (obj.hits > 0) {
        set resp.http.X-Cache = "HIT";
    } else {
        set resp.http.X-Cache = "MISS";
    }
}
