// A session over NATS WebSocket, as consumers/_client.py Subscription: an ephemeral key pair,
// the inbox subscribed BEFORE the open request, keepalives, close. The connection follows
// the deployment's convention: NATS user = the session id (the key's RFC 7638 thumbprint),
// password = the access token, inbox prefix `_INBOX.<session id>`.

import { usernamePasswordAuthenticator, wsconnect } from "@nats-io/nats-core";
import { generateConsumerKey, prove } from "./crypto.js";
import { GroupMember } from "./group.js";
import { GroupHolds, Hold } from "./hold.js";
import { ConsumerSession } from "./session.js";
import {
  WireError,
  decodeReply,
  encodeOpenRequest,
  encodeResume,
  encodeSessionRef,
} from "./wire.js";

/** A refusal from the proxy (its error code: unauthorized, forbidden, ...). */
export class SessionError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {boolean} [retry] the proxy marked the refusal as passing (`"retry": true`)
   */
  constructor(code, message, retry = false) {
    super(message);
    this.name = "SessionError";
    this.code = code;
    this.retry = retry;
  }
}

/** NATS or the proxy cannot be reached or did not answer. */
export class BrokerError extends Error {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = "BrokerError";
  }
}

/**
 * The proxy's reply contradicts the request (an open answered for another session): a relay
 * that tampers, not one that is late, so never retried as passing.
 */
export class RelayError extends Error {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = "RelayError";
  }
}

/** No key envelope signed by a pinned cluster key came (others were refused). */
export class TrustError extends Error {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = "TrustError";
  }
}

/** how long a first open retries passing refusals by default (0: fail at once) */
export const DEFAULT_RETRY_MS = 30_000;
/** backoff between open attempts: exponential from 0.2 s to 5 s, with jitter (as Python's) */
const BACKOFF_FIRST_MS = 200;
const BACKOFF_MAX_MS = 5000;
/** the most envelopes a resume asks for: the proxy answers once it has published them */
const RESUME_PAGE = 1000;
/** a resume's answer may take this many request timeouts (its page is replayed first) */
const RESUME_WAIT = 3;

/**
 * @typedef {import("./session.js").Batch} Batch
 * @typedef {import("./wire.js").Notice} Notice
 * @typedef {import("./group.js").GroupEnvelope} GroupEnvelope
 * @typedef {ReturnType<ConsumerSession["parse"]> | GroupEnvelope} Item what a session's
 *   parse gives (a group member's: group batches too)
 * @typedef {import("./crypto.js").KeyKind} KeyKind
 * @typedef {object} Resumed a new session replaced one that ended (consumers/_subscription.py
 *   Resumed): session mode, rows sealed between the two were lost; group mode with a store,
 *   the groups' lines went on (`carried`): what was missed is read or counted in lost
 * @property {string} previous
 * @property {string} session
 * @property {string} reason
 * @property {number} attempts open attempts it took
 * @property {bigint | null} lastTs `ts` (Unix ns) of the previous session's last batch
 * @property {boolean} carried the new session went on with the groups' lines
 * @property {number} drained (session mode, with a store) batches of the ended session read
 *   from the store before the new one was opened
 * @typedef {object} SubscriptionOptions
 * @property {string} natsUrl NATS WebSocket URL (ws:// or wss://)
 * @property {{user: string, pass: string}} [natsAuth] static NATS credentials, for a server
 *   without the auth callout; by default user = the session id, password = the token
 * @property {string} [prefix] subject prefix (default sealstream)
 * @property {() => string | Promise<string>} token read again for every request
 * @property {string} cluster
 * @property {string[]} streams
 * @property {import("./session.js").TrustedKeys} trust
 * @property {import("./crypto.js").Identity} [identity] the user's long-term key: every open
 *   carries its proof (the cluster refuses an open without one, unless it trusts the relay)
 * @property {KeyKind} [keyKind] default x25519
 * @property {"session" | "group"} [keyMode] (per-message mode, without sender
 *   authentication, is not offered to a page)
 * @property {import("./session.js").Policy} [policy] default discard
 * @property {boolean} [allowZip]
 * @property {number} [requestTimeoutMs] also the key deadline: a key envelope signed by a
 *   pinned key is due this long after the open
 * @property {number} [queueSize] inbox messages waiting for verification before drops
 * @property {number} [retryMs] how long a first open retries passing refusals (busy, cluster
 *   unavailable, no proxy answering), with backoff and jitter (default 30 s; 0 fails at once)
 * @property {boolean} [resume] a session that ends for an infrastructure reason (expired,
 *   ended by the proxy, lost) is replaced by a new one with a fresh key
 * @property {number} [resumeTimeoutMs] how long a resume retries (default 120 s)
 * @property {(batch: Batch) => void} [onBatch]
 * @property {(notice: Notice) => void} [onNotice]
 * @property {(reason: string) => void} [onEnd] the producer ended the session (verified)
 * @property {(error: Error) => void} [onError] the session is over
 * @property {(error: Error, waitMs: number) => void} [onRetry] an open was refused as
 *   passing: tried again after waitMs
 * @property {(marker: Resumed) => void} [onResumed] a new session replaced the previous one
 * @property {() => void} [onChange] counters changed
 * @property {(connected: boolean) => void} [onConnection] the broker connection was lost
 *   (the client reconnects by itself) or is back
 */

/** @param {unknown} err @param {string} name */
function caused(err, name) {
  for (let e = err; e instanceof Error; e = /** @type {any} */ (e).cause) {
    if (e.name === name || e.constructor.name === name) return true;
  }
  return false;
}

/**
 * A refusal the same open may get past later: the proxy busy or out of reach, the cluster
 * unavailable (a producer restarting); not one about the request itself.
 * @param {unknown} err
 */
function passing(err) {
  if (err instanceof BrokerError) return true;
  return err instanceof SessionError && (err.retry || err.code === "cluster_unavailable");
}

/** @param {number} ms */
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
/** an ended session's drain gives up after an ask and this many more in a row that brought
 * nothing (as the Python client's pages) */
const DRAIN_STALLS = 3;
/** a failed drain ask is asked again after this long */
const DRAIN_RETRY_MS = 500;

export class Subscription {
  /** @param {SubscriptionOptions} options */
  constructor(options) {
    this.options = options;
    this.prefix = options.prefix ?? "sealstream";
    /** the current session's verification state @type {ConsumerSession | null} */
    this.session = null;
    /** @type {import("@nats-io/nats-core").NatsConnection | null} */
    this.nc = null;
    this.received = 0;
    this.batches = 0;
    this.rows = 0;
    this.dropped = 0;
    this.keepaliveS = 10;
    /** @type {string | null} */
    this.endReason = null;
    /** @type {Error | null} */
    this.error = null;
    this.pending = 0;
    /** @type {Promise<void>} */
    this.chain = Promise.resolve();
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this.timer = undefined;
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this.keyTimer = undefined;
    /** inbox messages received when the key deadline passed (null: not yet): only those may
     * still bring the key @type {number | null} */
    this.keyCutoff = null;
    this.opened = false;
    this.closed = false;
    this.resuming = false;
    /** an ended session's stored envelopes are being read (drainThenResume) */
    this.draining = false;
    /** batches the ended session's drain brought (the next Resumed marker says so) */
    this.drained = 0;
    /** (group mode, with a store) the ended session a resume's new one goes on from
     * @type {GroupMember | null} */
    this.carrying = null;
    /** every resume so far, oldest first @type {Resumed[]} */
    this.resumes = [];
    /** `ts` of the last batch @type {bigint | null} */
    this.lastTs = null;
    /** the token of the last request, for a close that cannot wait (the page is going) */
    this.lastToken = "";
    // lossless delivery (docs/protocol.md): with a store, what arrives past a gap is held
    // and the rest asked for (one request per gap; on every reconnect)
    this.hold = new Hold();
    this.store = false;
    this.asking = false;
    /** the last accepted seq the last resume asked after @type {bigint | null} */
    this.askedAfter = null;
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this.holdTimer = undefined;
    // (group mode) each group's batches past a gap, by gseq; the groups whose resume is in
    // flight, and the last gseq each group's last resume asked after
    this.groupHolds = new GroupHolds(() => null);
    /** @type {Set<string>} */
    this.groupAsking = new Set();
    /** @type {Map<string, bigint | null>} */
    this.groupAsked = new Map();
  }

  /** @returns {Promise<string>} */
  async token() {
    this.lastToken = await this.options.token();
    return this.lastToken;
  }

  get sessionId() {
    if (this.session === null) throw new Error("subscription not started");
    return this.session.session;
  }

  /** Open the first session, retrying passing refusals for `retryMs`. */
  async start() {
    await this.open(this.options.retryMs ?? DEFAULT_RETRY_MS);
  }

  /**
   * Open a session, retrying passing refusals with backoff and jitter for `budgetMs`; the
   * attempts it took.
   * @param {number} budgetMs
   * @returns {Promise<number>}
   */
  async open(budgetMs) {
    const deadline = Date.now() + budgetMs;
    let delay = BACKOFF_FIRST_MS;
    for (let attempts = 1; ; attempts += 1) {
      try {
        await this.startSession();
        return attempts;
      } catch (err) {
        await this.retire();
        const wait = delay / 2 + (Math.random() * delay) / 2;
        if (this.closed || !passing(err) || Date.now() + wait > deadline) throw err;
        this.options.onRetry?.(/** @type {Error} */ (err), wait);
        await sleep(wait);
        delay = Math.min(delay * 2, BACKOFF_MAX_MS);
      }
    }
  }

  /** Generate a key, connect, subscribe the inbox, open the session. */
  async startSession() {
    const o = this.options;
    const key = await generateConsumerKey(o.keyKind ?? "x25519");
    // group mode: a member of each stream's group (docs/protocol.md, Group mode)
    const session =
      o.keyMode === "group"
        ? new GroupMember(key, {
            cluster: o.cluster,
            streams: o.streams,
            trust: o.trust,
            policy: o.policy ?? "discard",
          })
        : new ConsumerSession(key, {
            cluster: o.cluster,
            trust: o.trust,
            keyMode: "session",
            allowZip: o.allowZip,
            policy: o.policy ?? "discard",
          });
    if (session instanceof GroupMember && this.carrying !== null) {
      session.carry(this.carrying); // its groups' lines go on: the gap between is counted
    }
    this.session = session;
    this.opened = false;
    this.keyCutoff = null;
    const duplicates = this.hold.duplicates + this.groupHolds.duplicates;
    this.hold = new Hold();
    this.hold.duplicates = duplicates;
    this.groupHolds = new GroupHolds(
      session instanceof GroupMember ? (group) => session.line(group) : () => null,
    );
    this.groupAsking = new Set();
    this.groupAsked = new Map();
    this.store = false;
    this.asking = false; // a request of the session replaced does not hold this one's
    this.askedAfter = null;
    await this.token();
    const auth = o.natsAuth;
    let nc;
    try {
      nc = await wsconnect({
        servers: o.natsUrl,
        // a reconnect presents the latest token (renewed by keepalives), not the first one
        authenticator: auth
          ? usernamePasswordAuthenticator(auth.user, auth.pass)
          : usernamePasswordAuthenticator(key.sessionId, () => this.lastToken),
        inboxPrefix: `_INBOX.${key.sessionId}`,
        name: "sealstream-web",
        maxReconnectAttempts: -1,
      });
    } catch (err) {
      if (caused(err, "AuthorizationError")) {
        throw new SessionError("unauthorized", "NATS refused the token");
      }
      throw new BrokerError(`cannot connect to NATS at ${o.natsUrl}`);
    }
    this.nc = nc;
    void this.watch(nc);
    // the inbox first: the producer's key envelope may arrive before the open reply
    nc.subscribe(`${this.prefix}.inbox.${key.sessionId}`, {
      callback: (_err, msg) => this.onMessage(session, msg.data),
    });
    await nc.flush();
    const keyMode = o.keyMode ?? "session";
    const zip = o.allowZip ?? false;
    /** @type {import("./wire.js").OpenRequest} */
    const open = {
      token: await this.token(),
      cluster: o.cluster,
      streams: o.streams,
      jwk: key.publicJwk,
      keyMode,
      zip,
    };
    if (o.identity !== undefined) {
      // made for this open only (fresh iat and jti): the relay forwards it untouched
      open.proof = await prove(o.identity, {
        cluster: o.cluster,
        session: key.sessionId,
        streams: o.streams,
        keyMode,
        zip,
      });
    }
    const reply = await this.request("open", encodeOpenRequest(open), "opened");
    if (reply.session !== key.sessionId) {
      throw new RelayError("the proxy answered for another session");
    }
    this.opened = true;
    this.store = reply.store;
    this.keyTimer = setTimeout(() => this.keyDue(session), o.requestTimeoutMs ?? 5000);
    this.setKeepalive(reply.keepaliveS);
    this.schedule();
  }

  /** @param {import("@nats-io/nats-core").NatsConnection} nc */
  async watch(nc) {
    for await (const status of nc.status()) {
      if (nc !== this.nc) return;
      if (status.type === "disconnect") this.options.onConnection?.(false);
      else if (status.type === "reconnect") {
        this.options.onConnection?.(true);
        void this.askResume(true); // what the inbox missed meanwhile
        const session = this.session;
        if (session instanceof GroupMember) {
          for (const group of session.groups.keys()) void this.askGroupResume(group, true);
        }
      }
    }
    // the iterator ends when the connection is closed: by us, or for good by the client
    if (nc === this.nc && this.opened) this.lost("the NATS connection was closed", true);
  }

  /** @param {number | null} seconds the proxy's interval (null: it did not say) */
  setKeepalive(seconds) {
    if (seconds !== null) this.keepaliveS = seconds;
  }

  schedule() {
    if (this.closed || this.draining) return;
    this.timer = setTimeout(() => void this.keepalive(), this.keepaliveS * 1000);
  }

  async keepalive() {
    const session = this.session;
    if (this.closed || session === null) return;
    try {
      const token = await this.token();
      const ref = { token, session: session.session };
      const reply = await this.request("keepalive", encodeSessionRef(ref), "keptAlive");
      this.setKeepalive(reply.keepaliveS);
    } catch (err) {
      // busy or passing (the proxy's "retry", its registry or the cluster out of reach): the
      // session stays, as in the Python client; anything else about it ends it
      const stays =
        err instanceof SessionError &&
        (err.retry || err.code === "limit_exceeded" || err.code === "cluster_unavailable");
      if (err instanceof SessionError && !stays && session === this.session) {
        // the proxy no longer knows it (resumable), or refuses the token (not)
        this.lost(`session lost: ${err.message}`, err.code === "bad_request");
        return;
      }
      // the broker may be reconnecting: try again at the next interval
    }
    if (session === this.session) this.schedule();
  }

  /**
   * A session API request (encoded by wire.js); the reply a refusal becomes SessionError.
   * @template {keyof import("./wire.js").Replies} K
   * @param {"open" | "keepalive" | "close" | "resume"} op
   * @param {Uint8Array} body
   * @param {K} kind what the reply answers with
   * @param {number} [times] how many request timeouts the answer may take
   * @returns {Promise<import("./wire.js").Replies[K]>}
   */
  async request(op, body, kind, times = 1) {
    if (this.nc === null) throw new BrokerError("not connected");
    let msg;
    try {
      msg = await this.nc.request(`${this.prefix}.api.session.${op}`, body, {
        timeout: (this.options.requestTimeoutMs ?? 5000) * times,
      });
    } catch (err) {
      if (caused(err, "NoRespondersError")) {
        throw new BrokerError("no sealstream proxy is serving this NATS server");
      }
      if (caused(err, "TimeoutError")) throw new BrokerError("the proxy did not answer in time");
      throw new BrokerError(`cannot send a session request: ${err}`);
    }
    let reply;
    try {
      reply = decodeReply(msg.data, kind);
    } catch (err) {
      if (err instanceof WireError) throw new BrokerError("malformed reply from the proxy");
      throw err;
    }
    if (reply.type === "refusal") throw new SessionError(reply.code, reply.message, reply.retry);
    return /** @type {import("./wire.js").Replies[K]} */ (reply);
  }

  /** @param {ConsumerSession} session @param {Uint8Array} data */
  onMessage(session, data) {
    this.received += 1;
    if (this.pending >= (this.options.queueSize ?? 10000)) {
      this.dropped += 1;
      return;
    }
    this.pending += 1;
    const index = this.received;
    this.chain = this.chain
      .then(() => this.handle(session, data, index))
      // a failing callback ends the subscription rather than silently stopping the queue
      .catch((/** @type {Error} */ err) => this.fail(err))
      .finally(() => (this.pending -= 1));
  }

  /**
   * Ask the proxy for what follows the last accepted seq: once per gap (`again` on a
   * reconnect), one at a time, only when the cluster keeps a store.
   * @param {boolean} [again]
   */
  async askResume(again = false) {
    const session = this.session;
    if (session === null || !this.store || this.asking || this.closed) return;
    const after = session.lastSeq;
    if (after === this.askedAfter && !again) return;
    this.askedAfter = after;
    this.asking = true;
    this.hold.waiting = true; // the hold's time runs from the answer
    try {
      const token = await this.token();
      const req = { token, session: session.session, after, limit: RESUME_PAGE };
      const reply = await this.request("resume", encodeResume(req), "replayed", RESUME_WAIT);
      // more stored: the next page once what this one brought went through the checks
      if (reply.more) this.chain = this.chain.then(() => void this.askResume());
    } catch (err) {
      // "no store": nothing will fill a gap, stop holding; otherwise the hold's time runs out
      if (session !== this.session) return; // the answer of a session replaced meanwhile
      if (err instanceof SessionError && err.message.startsWith("no store")) {
        this.store = false;
        this.hold.holdMs = 0;
      } else if (!(err instanceof SessionError) || err.retry || err.code === "cluster_unavailable") {
        this.askedAfter = null; // the store or the proxy out of reach a moment: ask again
      }
    } finally {
      if (session === this.session) this.asking = false;
    }
    if (session !== this.session) return;
    this.hold.waiting = false;
    this.hold.extend(Date.now());
    this.armHold(session);
  }

  /**
   * (A group member) ask the proxy for the batches of `group` that follow the last gseq
   * accepted of it: one at a time per group, once per last gseq unless `again`.
   * @param {string} group
   * @param {boolean} [again]
   */
  async askGroupResume(group, again = false) {
    const session = this.session;
    if (!(session instanceof GroupMember) || !this.store || this.closed) return;
    const line = session.line(group);
    if (line === null || this.groupAsking.has(group)) return;
    const after = line[0];
    if (this.groupAsked.get(group) === after && !again) return;
    this.groupAsked.set(group, after);
    this.groupAsking.add(group);
    try {
      const token = await this.token();
      const req = { token, session: session.session, after, limit: RESUME_PAGE, group };
      const reply = await this.request("resume", encodeResume(req), "replayed", RESUME_WAIT);
      if (reply.more) this.chain = this.chain.then(() => void this.askGroupResume(group));
    } catch (err) {
      if (session !== this.session) return; // the answer of a session replaced meanwhile
      if (err instanceof SessionError && err.message.startsWith("no store")) {
        this.store = false;
        this.groupHolds.stopHolding();
      } else if (!(err instanceof SessionError) || err.retry || err.code === "cluster_unavailable") {
        this.groupAsked.set(group, null); // out of reach a moment: the same gap may ask again
      }
    } finally {
      if (session === this.session) this.groupAsking.delete(group);
    }
    if (session !== this.session) return;
    this.groupHolds.holds.get(group)?.extend(Date.now());
    this.armHold(session);
  }

  /** The earliest time a held envelope goes to the checks whatever came. */
  holdDeadline() {
    const own = this.hold.deadline;
    const groups = this.groupHolds.deadline((group) => this.groupAsking.has(group));
    if (own === null) return groups;
    return groups === null ? own : Math.min(own, groups);
  }

  /** Open what the hold releases when its time comes. @param {ConsumerSession} session */
  armHold(session) {
    clearTimeout(this.holdTimer);
    const due = this.holdDeadline();
    if (due === null) return;
    this.holdTimer = setTimeout(
      () => {
        this.chain = this.chain
          .then(() => this.release(session, null))
          .catch((/** @type {Error} */ err) => this.fail(err));
      },
      Math.max(due - Date.now(), 0),
    );
  }

  /**
   * @param {ConsumerSession} session
   * @param {number | null} index the inbox message being handled (null: the hold's timer)
   */
  async release(session, index) {
    const asking = (/** @type {string} */ group) => this.groupAsking.has(group);
    while (session === this.session) {
      const env = this.hold.next(session.lastSeq, Date.now());
      if (env !== null) {
        if (env.seq <= session.lastSeq && (await this.hold.duplicate(env))) continue;
        await this.deliver(session, env, index);
        continue;
      }
      const batch = this.groupHolds.next(asking, Date.now());
      if (batch === null) break;
      await this.deliver(session, batch, index);
    }
    if (session === this.session) this.armHold(session);
  }

  /**
   * @param {ConsumerSession} session
   * @param {Uint8Array} data
   * @param {number} index its place among the inbox messages received
   */
  async handle(session, data, index) {
    if (session !== this.session || this.closed) return; // a replaced session's leftovers
    /** @type {Item | null} */
    let item;
    try {
      item = /** @type {Item | null} */ (await session.guard(() => session.parse(data)));
    } catch (err) {
      if (!this.checkTrust(session, true)) this.fail(/** @type {Error} */ (err));
      return;
    }
    if (item === null) {
      this.options.onChange?.();
      this.checkTrust(session, false, this.done(index));
      return;
    }
    if (item.type === "envelope" && this.store) {
      if (item.seq <= session.lastSeq && (await this.hold.duplicate(item))) return;
      if (item.seq > session.lastSeq + 1n) {
        this.hold.add(item, Date.now());
        this.armHold(session);
        void this.askResume();
        return;
      }
    } else if (item.type === "group" && this.store) {
      // held by gseq, per group (docs/protocol.md, "Lossless delivery", group mode)
      const taken = await this.groupHolds.take(item, Date.now());
      if (taken === "held") void this.askGroupResume(item.stream);
      if (taken !== "open") {
        this.armHold(session);
        return;
      }
    }
    await this.deliver(session, item, index);
    await this.release(session, index);
  }

  /**
   * The inbox messages verified so far, counted by arrival (for the key deadline).
   * @param {number | null} index the one being handled (null: none, the hold's timer)
   */
  done(index) {
    // the last one queued: every message received is done (later ones were dropped)
    if (index === null) return this.pending === 0 ? this.received : 0;
    return this.pending > 1 ? index : this.received;
  }

  /**
   * One parsed item through the session's checks, and what it brings to the page.
   * @param {ConsumerSession} session
   * @param {Item} item
   * @param {number | null} index the inbox message being handled (null: the hold's timer)
   */
  async deliver(session, item, index) {
    if (session !== this.session || this.closed) return;
    let result;
    try {
      // what this session's own parse gave (a member's group batch is not in its base type)
      result = await session.acceptItem(/** @type {any} */ (item));
      if (this.store && item.type === "envelope" && session.lastSeq === item.seq) {
        await this.hold.accepted(item);
      } else if (this.store && item.type === "group" && result?.type === "batch") {
        await this.groupHolds.hold(item.stream).accepted(item);
      }
    } catch (err) {
      // policy "fail": the one opaque error ends the subscription (the trust error says more)
      if (!this.checkTrust(session, true)) this.fail(/** @type {Error} */ (err));
      return;
    } finally {
      this.options.onChange?.();
    }
    if (this.checkTrust(session, false, this.done(index)) || result === null) return;
    if (result.type === "batch") {
      if (this.draining) this.drained += 1;
      this.batches += 1;
      this.rows += result.rows.length;
      this.lastTs = result.ts;
      this.options.onBatch?.(result);
    } else if (result.type === "end") {
      // authenticated: the end, never resumed
      this.endReason = result.reason;
      this.options.onEnd?.(result.reason);
      await this.close();
    } else {
      this.options.onNotice?.(result);
      if (result.code === "expired" || result.code === "ended") {
        // unauthenticated: with resume, a forged one costs a new session, never the end
        this.lost(`the proxy ended this session: ${result.message}`, true);
      }
    }
  }

  /**
   * The key deadline: the messages received by now are the last that may bring the key.
   * @param {ConsumerSession} session
   */
  keyDue(session) {
    if (session !== this.session) return;
    this.keyCutoff = this.received;
    this.checkTrust(session, false, this.pending === 0 ? this.received : 0);
  }

  /**
   * A key envelope whose signer is not pinned is counted and ignored (a relay can forge
   * one); the subscription ends only if none signed by a pinned key came by the key deadline
   * (the messages received by then all verified: a relay that keeps sending forged ones does
   * not hold the error off), or if it is `ending` anyway. True if it ended it.
   * @param {ConsumerSession} session
   * @param {boolean} [ending]
   * @param {number} [done] the inbox messages up to this one (by arrival) are verified
   */
  checkTrust(session, ending = false, done = 0) {
    const refused = session.rejected.untrusted_key ?? 0;
    if (session !== this.session || session.keyed || refused === 0) return false;
    if (!ending && (this.keyCutoff === null || done < this.keyCutoff)) return false;
    this.fail(
      new TrustError(
        `no key envelope signed by a key pinned for cluster ${session.cluster} arrived; ` +
          `${refused} refused, signed by keys this page does not pin (a relay can forge ` +
          "those: never pin a key a session offers). Check the cluster's key out of band: " +
          "its operator's 'sealstream-producer key' prints it; the keys this page pins are " +
          "listed above",
      ),
    );
    return true;
  }

  /**
   * The session is over without an authenticated end: replaced by a new one if `resume` and
   * `resumable`, else the subscription ends.
   * @param {string} reason
   * @param {boolean} resumable
   */
  lost(reason, resumable) {
    if (this.options.resume && resumable && !this.closed && this.error === null) {
      void this.drainThenResume(reason);
    } else {
      this.fail(new SessionError("ended", reason));
    }
  }

  /**
   * A session the proxy ended, with a store, in session mode: read what the store keeps of
   * it past the last accepted seq, page by page, before a new session replaces it
   * (docs/protocol.md, "Draining an ended session"; consumers/_session.py LiveSession.drain).
   * A group member's next session reads its groups instead (it carries them).
   * @param {string} reason
   */
  async drainThenResume(reason) {
    const session = this.session;
    if (this.resuming || this.draining) return;
    if (this.store && session !== null && !(session instanceof GroupMember)) {
      this.draining = true;
      clearTimeout(this.timer); // no keepalive any more
      try {
        await this.drain(session);
      } finally {
        this.draining = false;
      }
      if (session !== this.session || this.closed || this.error !== null) return;
    }
    await this.resumeAfter(reason);
  }

  /**
   * Ask the ended session's stored envelopes a page at a time until the store has no more,
   * or an ask and three more in a row bring nothing acceptable (refused, failed, or the proxy
   * no longer keeps the ended session).
   * @param {ConsumerSession} session
   */
  async drain(session) {
    for (let stalls = 0; stalls <= DRAIN_STALLS && session === this.session && !this.closed; ) {
      const after = session.lastSeq;
      let more = false;
      try {
        const token = await this.token();
        const req = { token, session: session.session, after, limit: RESUME_PAGE };
        const reply = await this.request("resume", encodeResume(req), "replayed", RESUME_WAIT);
        more = reply.more;
        await this.chain; // what the page brought (before its answer) went through the checks
      } catch {
        await sleep(DRAIN_RETRY_MS);
        stalls += 1;
        continue;
      }
      while (this.hold.count > 0 && session === this.session && !this.closed) {
        await sleep(100); // past a gap retention made: the hold counts it when its time is up
      }
      if (!more) return;
      stalls = session.lastSeq === after ? stalls + 1 : 0;
    }
  }

  /**
   * Replace the current session by a new one (fresh key), as consumers/_client.py does.
   * @param {string} reason
   */
  async resumeAfter(reason) {
    if (this.resuming) return;
    this.resuming = true;
    const previous = this.session?.session ?? "";
    // a group's line goes on only where the producer's groups go on across its restarts:
    // with a store (without one, a restarted producer's group starts again at 0)
    const ended = this.session;
    this.carrying = this.store && ended instanceof GroupMember ? ended : null;
    const carried = this.carrying !== null;
    try {
      await this.retire();
      const attempts = await this.open(this.options.resumeTimeoutMs ?? 120_000);
      this.carrying = null;
      /** @type {Resumed} */
      const marker = {
        previous,
        session: this.sessionId,
        reason,
        attempts,
        lastTs: this.lastTs,
        carried,
        drained: this.drained,
      };
      this.drained = 0;
      this.resumes.push(marker);
      this.options.onResumed?.(marker);
    } catch (err) {
      this.fail(/** @type {Error} */ (err));
    } finally {
      this.resuming = false;
    }
  }

  /** @param {Error} err */
  fail(err) {
    if (this.error !== null || this.closed) return;
    this.error = err;
    this.options.onError?.(err);
    void this.close();
  }

  /**
   * Close without waiting, for a page being unloaded: the close request goes out with the
   * last token, unanswered (nothing would be left to read the reply), then the connection.
   */
  closeNow() {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.timer);
    clearTimeout(this.keyTimer);
    const nc = this.nc;
    if (nc === null) return;
    if (this.session !== null && this.opened && this.lastToken) {
      const ref = { token: this.lastToken, session: this.session.session };
      nc.publish(`${this.prefix}.api.session.close`, encodeSessionRef(ref));
    }
    void nc.close();
  }

  /** Close the current session at the proxy and its connection (the subscription goes on). */
  async retire() {
    clearTimeout(this.timer);
    clearTimeout(this.keyTimer);
    clearTimeout(this.holdTimer);
    if (this.nc === null) return;
    if (this.session !== null && this.opened) {
      this.opened = false;
      try {
        const token = await this.token();
        const ref = { token, session: this.session.session };
        await this.request("close", encodeSessionRef(ref), "ok");
      } catch {
        // the proxy expires the session anyway
      }
    }
    const nc = this.nc;
    this.nc = null;
    await nc?.close();
  }

  /** Close the session at the proxy and the connection; idempotent. */
  async close() {
    if (this.closed) return;
    this.closed = true;
    await this.retire();
  }
}
