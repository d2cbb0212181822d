// The page: reads /config.json from the machine that serves it (the user's own), loads its
// long-term identity (IndexedDB) and shows its fingerprint for registration, opens one
// session in the browser (every open carries the identity's proof) and hands the decrypted
// rows to the view (view.js: a tab per stream, its charts and table).

import { thumbprint } from "./crypto.js";
import { BrokerError, RelayError, SessionError, Subscription, TrustError } from "./client.js";
import { loadIdentity } from "./identity.js";
import { View } from "./view.js";

const RATE_WINDOW_MS = 5000;

/**
 * @typedef {object} PageConfig
 * @property {string} nats_ws_url
 * @property {string} prefix
 * @property {string} token
 * @property {string} cluster
 * @property {string[]} streams
 * @property {Record<string, Record<string, unknown>[]>} trusted_keys
 * @property {import("./crypto.js").KeyKind} [key]
 * @property {string} [key_mode] session or group (anything else is refused)
 * @property {string} [nats_user] static NATS credentials (a server without the auth callout)
 * @property {string} [nats_password]
 * @property {string} [policy_file] the cluster's policy file, when the server runs beside it
 *   (`sealstream demo` and `up`): the operator's command names it
 * @property {boolean} [register] the local server can authorize this page's key in the
 *   cluster's own policy (`sealstream demo` and `up` only): POST authorize
 */

/** the file name the page's public JWK is downloaded as, and the command names */
export const JWK_FILE = "sealstream-web-identity.jwk";

/**
 * A word as a POSIX shell reads it back unchanged (quoted unless it is plain).
 * @param {string} word
 * @returns {string}
 */
function shellWord(word) {
  return /^[\w@%+=:,./-]+$/.test(word) ? word : `'${word.replaceAll("'", "'\\''")}'`;
}

/**
 * The operator's command that authorizes this page's identity for the streams, complete:
 * the cluster's policy file when the server knows it, else the cluster's signing key for the
 * operator to name (`sealstream-producer authorize` refuses to guess either).
 * @param {string[]} streams
 * @param {string} [policyFile]
 * @returns {string}
 */
export function authorizeCommand(streams, policyFile) {
  const where = policyFile ? `--policy-file ${shellWord(policyFile)}` : "--key-file CLUSTER-KEY";
  const each = streams.map((s) => ` --stream ${shellWord(s)}`).join("");
  return `sealstream-producer authorize add ${where} --jwk-file ${JWK_FILE}${each}`;
}

// The page's key: a secret of the server's run, in the fragment of the URL it printed (never
// sent in a request line); the server wants it back for config.json and authorize.
const PAGE_KEY = new URLSearchParams(location.hash.slice(1)).get("key") ?? "";
const PAGE_KEY_HEADER = "X-Sealstream-Page-Key";

/** @returns {Promise<PageConfig>} */
async function loadConfig() {
  const res = await fetch("config.json", {
    cache: "no-store",
    headers: { [PAGE_KEY_HEADER]: PAGE_KEY },
  });
  if (res.status === 403) {
    throw new Error("this page's key is missing or wrong: open the address the command printed");
  }
  if (!res.ok) throw new Error(`config.json: HTTP ${res.status}`);
  return res.json();
}

const HINTS = /** @type {Record<string, string>} */ ({
  unauthorized: "token refused: it is missing, invalid or expired",
  forbidden: "token refused: it does not allow this cluster",
  cluster_unavailable: "cluster unavailable: no producer serves it (unknown, or down)",
  limit_exceeded: "a proxy limit was reached",
  bad_request: "the proxy or the cluster refused the request",
});

/**
 * One line for an error. A `forbidden` that is not about the token is the cluster's refusal
 * of this page's identity: the line names the identity and the command that authorizes it.
 * @param {unknown} err
 * @param {{kid: string, streams: string[], policy?: string}} [who]
 * @returns {string}
 */
export function describe(err, who) {
  if (err instanceof TrustError) return `untrusted signer: ${err.message}`;
  if (err instanceof SessionError && err.code === "forbidden" && !/^token\b/.test(err.message)) {
    const identity = who ? who.kid : "unknown";
    const how = who ? `; authorize it with: ${authorizeCommand(who.streams, who.policy)}` : "";
    return `not authorized by the cluster (${err.message}): this page's identity ${identity}${how}`;
  }
  if (err instanceof SessionError) {
    const hint = HINTS[err.code];
    return hint ? `${hint} (${err.message})` : `session ${err.code}: ${err.message}`;
  }
  if (err instanceof BrokerError) return `broker unavailable: ${err.message}`;
  if (err instanceof RelayError) return `relay not trusted: ${err.message}`;
  return String(/** @type {any} */ (err)?.message ?? err);
}

/** what the page says of a mode other than session or group (a link can carry anything) */
export const MODE_REFUSED =
  "this page opens session or group mode only (both authenticate the sender); the link " +
  "asked for another mode, which would let the relay forge rows";

/**
 * The page's key mode from a link or its configuration: session or group (the cluster signs
 * every key), anything else null. Per-message mode has no sender authentication: a bench
 * baseline, never the page's.
 * @param {unknown} value
 * @returns {"session" | "group" | null}
 */
export function pageMode(value) {
  return value === "session" || value === "group" ? value : null;
}

/** @param {string} id @param {string} text */
function setText(id, text) {
  const node = document.getElementById(id);
  if (node) node.textContent = text;
}

/**
 * Show the identity for registration: its fingerprint, the operator's command, the public JWK
 * with a copy button and a download link.
 * @param {Record<string, string>} publicJwk
 * @param {string} kid
 * @param {string[]} streams
 * @param {string} [policyFile]
 */
function showIdentity(publicJwk, kid, streams, policyFile) {
  const text = `${JSON.stringify(publicJwk)}\n`;
  setText("identity", kid);
  setText("identity-jwk", text.trim());
  setText("authorize-command", authorizeCommand(streams, policyFile));
  const link = /** @type {HTMLAnchorElement} */ (document.getElementById("download-jwk"));
  link.href = URL.createObjectURL(new Blob([text], { type: "application/json" }));
  link.download = JWK_FILE;
  const copy = /** @type {HTMLButtonElement} */ (document.getElementById("copy-jwk"));
  copy.onclick = async () => {
    try {
      await navigator.clipboard.writeText(text);
      copy.textContent = "copied";
    } catch {
      copy.textContent = "copy refused: select the text";
    }
  };
}

/**
 * The visible marker of a resume: when, and which rows were lost (those sealed between the
 * previous session's last batch and the new session; in group mode with a store the group's
 * line goes on instead, and the batches it could not get are counted in "gaps", see
 * docs/protocol.md "A member's next session").
 * @param {HTMLElement} status
 * @param {import("./client.js").Resumed} marker
 */
function showResumed(status, marker) {
  let line = document.getElementById("resumed");
  if (line === null) {
    line = document.createElement("p");
    line.id = "resumed";
    status.after(line);
  }
  const now = new Date().toLocaleTimeString();
  const since =
    marker.lastTs === null
      ? "the previous session's start"
      : new Date(Number(marker.lastTs / 1_000_000n)).toLocaleTimeString();
  line.dataset.count = String(Number(line.dataset.count ?? 0) + 1);
  line.textContent = marker.carried
    ? `resumed at ${now}: what the group sealed since ${since} is read from the store, what it no longer has is counted in gaps (${marker.reason})`
    : `resumed at ${now}, rows between ${since} and ${now} lost (${marker.reason})`;
}

/**
 * Ask the local server (`sealstream demo`/`up`) to authorize this page's public key in the
 * cluster's policy; what happened, in one line.
 * @param {Record<string, string>} publicJwk
 * @returns {Promise<string>}
 */
async function register(publicJwk) {
  try {
    const res = await fetch("authorize", {
      method: "POST",
      headers: { "Content-Type": "application/json", [PAGE_KEY_HEADER]: PAGE_KEY },
      body: JSON.stringify({ jwk: publicJwk }),
      cache: "no-store",
    });
    if (!res.ok) return `registration refused by this machine's server: HTTP ${res.status}`;
    const answer = await res.json();
    return `authorized by this machine's cluster for ${answer.streams.join(", ")}`;
  } catch (err) {
    return `cannot register with this machine's server: ${describe(err)}`;
  }
}

export async function main() {
  const status = /** @type {HTMLElement} */ (document.getElementById("status"));
  /** @param {string} state @param {string} text */
  const setStatus = (state, text) => {
    status.dataset.state = state;
    status.textContent = text;
  };
  setStatus("starting", "starting…");
  /** @type {PageConfig} */
  let config;
  try {
    config = await loadConfig();
  } catch (err) {
    setStatus("error", `cannot read the page's configuration: ${describe(err)}`);
    return;
  }
  const params = new URLSearchParams(location.search);
  const keyKind = /** @type {import("./crypto.js").KeyKind} */ (params.get("key") ?? config.key ?? "x25519");
  // ?mode=group: one batch sealed for every member of the stream's group (default: session)
  const keyMode = pageMode(params.get("mode") ?? config.key_mode ?? "session");
  if (keyMode === null) {
    setStatus("error", `refused: ${MODE_REFUSED}`);
    return;
  }
  /** @type {import("./session.js").TrustedKeys} */
  const trust = {};
  for (const [cluster, jwks] of Object.entries(config.trusted_keys)) {
    trust[cluster] = {};
    for (const jwk of jwks) trust[cluster][await thumbprint(jwk)] = jwk;
  }
  let identity;
  try {
    identity = await loadIdentity();
  } catch (err) {
    setStatus("error", `cannot keep this page's identity key (IndexedDB): ${describe(err)}`);
    return;
  }
  const who = { kid: identity.kid, streams: config.streams, policy: config.policy_file };
  showIdentity(identity.publicJwk, identity.kid, config.streams, config.policy_file);
  if (config.register) {
    setText("authorization", "registering with this machine's cluster…");
    setText("authorization", await register(identity.publicJwk));
  } else {
    const ask = "give the fingerprint or the public JWK below to the cluster's operator";
    setText("authorization", ask);
  }
  setText("cluster", config.cluster);
  setText("pinned", Object.keys(trust[config.cluster] ?? {}).join(", ") || "none");
  const view = new View(config.streams, {
    tabs: /** @type {HTMLElement} */ (document.getElementById("tabs")),
    panels: /** @type {HTMLElement} */ (document.getElementById("tables")),
    pause: /** @type {HTMLButtonElement} */ (document.getElementById("pause")),
  });
  /** @type {{t: number, n: number}[]} */
  const recent = [];
  let dirty = true;
  let firstRowMs = -1;

  const sub = new Subscription({
    natsUrl: config.nats_ws_url,
    natsAuth:
      config.nats_user === undefined
        ? undefined
        : { user: config.nats_user, pass: config.nats_password ?? "" },
    prefix: config.prefix,
    // read again for every request, so a renewed token keeps a long session
    token: async () => (await loadConfig()).token,
    cluster: config.cluster,
    streams: config.streams,
    trust,
    identity,
    keyKind,
    keyMode,
    policy: "discard",
    // as sealstream-consume: an expiry, an outage or a restarted cluster opens a new session
    resume: true,
    onBatch(batch) {
      view.add(batch.stream, batch.rows, Date.now());
      recent.push({ t: performance.now(), n: batch.rows.length });
      if (firstRowMs < 0) {
        // since navigation start: page load, key generation, connect, open, first batch
        firstRowMs = performance.now();
        document.body.dataset.firstRowMs = String(Math.round(firstRowMs));
      }
      dirty = true;
    },
    onChange() {
      dirty = true;
    },
    onNotice(notice) {
      setText("notice", `proxy notice (unauthenticated): ${notice.code}: ${notice.message}`);
    },
    onEnd(reason) {
      setStatus("ended", `session ended by the cluster: ${reason}`);
    },
    onError(err) {
      setStatus("error", describe(err, who));
    },
    onRetry(err, waitMs) {
      const wait = (waitMs / 1000).toFixed(1);
      setStatus("retrying", `${describe(err, who)}; trying again in ${wait} s`);
    },
    onResumed(marker) {
      setText("session", marker.session);
      showResumed(status, marker);
      setStatus("connected", "resumed: new session, waiting for the cluster's signed key");
      dirty = true;
    },
    onConnection(connected) {
      if (status.dataset.state === "error" || status.dataset.state === "ended") return;
      if (connected) setStatus("connected", "connected again");
      else setStatus("reconnecting", "broker connection lost: reconnecting…");
    },
  });
  /** @type {any} */ (window).sealstream = { subscription: sub, identity };
  try {
    await sub.start();
  } catch (err) {
    setStatus("error", describe(err, who));
    if (err instanceof SessionError && err.code === "forbidden") {
      /** @type {HTMLDetailsElement} */ (document.getElementById("register")).open = true;
    }
    await sub.close();
    return;
  }
  setText("session", sub.sessionId);
  setText("key", keyKind);
  if (sub.error === null) {
    // the cluster's key envelope may have been refused before the open reply came back
    setStatus("connected", "connected, waiting for the cluster's signed key");
  }

  const render = () => {
    const s = sub.session;
    if (s !== null && dirty) {
      dirty = false;
      const now = performance.now();
      while (recent.length && now - recent[0].t > RATE_WINDOW_MS) recent.shift();
      const rate = recent.reduce((a, r) => a + r.n, 0) / (RATE_WINDOW_MS / 1000);
      if (s.signerKid !== null && status.dataset.state === "connected") {
        setStatus("verified", "connected · every key envelope signature verified");
        if (!config.register) {
          setText("authorization", "authorized by the cluster (proof accepted)");
        }
      }
      setText("signer", s.signerKid ?? "not yet");
      setText("epoch", s.epoch < 0n ? "-" : s.epoch.toString());
      setText("rows", String(sub.rows));
      setText("rate", rate.toFixed(1));
      setText("gaps", `${s.gaps} (${s.lost} lost)`);
      setText("rejected", String(s.rejectedTotal));
      setText(
        "reasons",
        Object.entries(s.rejected)
          .map(([k, v]) => `${k}: ${v}`)
          .join(", "),
      );
      setText("dropped", String(sub.dropped));
    }
    view.render(performance.now());
    requestAnimationFrame(render);
  };
  requestAnimationFrame(render);
  setInterval(() => (dirty = true), 1000); // the rate decays without new rows
  addEventListener("pagehide", () => sub.closeNow());
}

void main();
