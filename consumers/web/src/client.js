// A session over NATS WebSocket, as consumers/_client.py Subscription: an ephemeral key pair,
// the inbox subscribed BEFORE the open request, keepalives, close. The connection follows
// the deployment's convention: NATS user = the session id (the key's RFC 7638 thumbprint),
// password = the access token, inbox prefix `_INBOX.<session id>`.

import { usernamePasswordAuthenticator, wsconnect } from "@nats-io/nats-core";
import { generateConsumerKey, prove } from "./crypto.js";
import { GroupMember } from "./group.js";
import { ConsumerSession } from "./session.js";
import { WireError, decodeReply, encodeOpenRequest, encodeSessionRef } from "./wire.js";

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

/** The cluster signs with a key the page does not pin. */
export class TrustError extends Error {
  /** @param {string} message @param {string} kid */
  constructor(message, kid) {
    super(message);
    this.name = "TrustError";
    this.kid = kid;
  }
}

/**
 * @typedef {import("./session.js").Batch} Batch
 * @typedef {import("./wire.js").Notice} Notice
 * @typedef {import("./crypto.js").KeyKind} KeyKind
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
 * @property {import("./session.js").KeyMode | "group"} [keyMode]
 * @property {import("./session.js").Policy} [policy] default discard
 * @property {boolean} [allowZip]
 * @property {number} [requestTimeoutMs]
 * @property {number} [queueSize] inbox messages waiting for verification before drops
 * @property {(batch: Batch) => void} [onBatch]
 * @property {(notice: Notice) => void} [onNotice]
 * @property {(reason: string) => void} [onEnd] the producer ended the session (verified)
 * @property {(error: Error) => void} [onError] the session is over
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

export class Subscription {
  /** @param {SubscriptionOptions} options */
  constructor(options) {
    this.options = options;
    this.prefix = options.prefix ?? "sealstream";
    /** @type {ConsumerSession | null} */
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
    this.closed = false;
    /** the token of the last request, for a close that cannot wait (the page is going) */
    this.lastToken = "";
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

  /** Generate the key, connect, subscribe the inbox, open the session. */
  async start() {
    const o = this.options;
    const key = await generateConsumerKey(o.keyKind ?? "x25519");
    // group mode: a member of each stream's group (docs/protocol.md, Group mode)
    this.session =
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
            keyMode: o.keyMode,
            allowZip: o.allowZip,
            policy: o.policy ?? "discard",
          });
    await this.token();
    const auth = o.natsAuth;
    try {
      this.nc = await wsconnect({
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
    void this.watch(this.nc);
    // the inbox first: the producer's key envelope may arrive before the open reply
    this.nc.subscribe(`${this.prefix}.inbox.${key.sessionId}`, {
      callback: (_err, msg) => this.onMessage(msg.data),
    });
    await this.nc.flush();
    const keyMode = o.keyMode ?? "session";
    /** @type {import("./wire.js").OpenRequest} */
    const open = {
      token: await this.token(),
      cluster: o.cluster,
      streams: o.streams,
      jwk: key.publicJwk,
      keyMode,
      zip: o.allowZip ?? false,
    };
    if (o.identity !== undefined) {
      // made for this open only (fresh iat and jti): the relay forwards it untouched
      open.proof = await prove(o.identity, {
        cluster: o.cluster,
        session: key.sessionId,
        streams: o.streams,
        keyMode,
      });
    }
    const reply = await this.request("open", encodeOpenRequest(open), "opened");
    if (reply.session !== key.sessionId) {
      throw new BrokerError("the proxy answered for another session");
    }
    this.setKeepalive(reply.keepaliveS);
    this.schedule();
  }

  /** @param {import("@nats-io/nats-core").NatsConnection} nc */
  async watch(nc) {
    for await (const status of nc.status()) {
      if (status.type === "disconnect") this.options.onConnection?.(false);
      else if (status.type === "reconnect") this.options.onConnection?.(true);
    }
  }

  /** @param {number | null} seconds the proxy's interval (null: it did not say) */
  setKeepalive(seconds) {
    if (seconds !== null) this.keepaliveS = seconds;
  }

  schedule() {
    if (this.closed) return;
    this.timer = setTimeout(() => void this.keepalive(), this.keepaliveS * 1000);
  }

  async keepalive() {
    if (this.closed || this.session === null) return;
    try {
      const token = await this.token();
      const ref = { token, session: this.session.session };
      const reply = await this.request("keepalive", encodeSessionRef(ref), "keptAlive");
      this.setKeepalive(reply.keepaliveS);
    } catch (err) {
      // busy or passing (the proxy's "retry", its registry or the cluster out of reach): the
      // session stays, as in the Python client; anything else about it ends it
      const passing =
        err instanceof SessionError &&
        (err.retry || err.code === "limit_exceeded" || err.code === "cluster_unavailable");
      if (err instanceof SessionError && !passing) {
        this.fail(new SessionError("ended", `session lost: ${err.message}`));
        return;
      }
      // the broker may be reconnecting: try again at the next interval
    }
    this.schedule();
  }

  /**
   * A session API request (encoded by wire.js); the reply a refusal becomes SessionError.
   * @template {keyof import("./wire.js").Replies} K
   * @param {"open" | "keepalive" | "close"} op
   * @param {Uint8Array} body
   * @param {K} kind what the reply answers with
   * @returns {Promise<import("./wire.js").Replies[K]>}
   */
  async request(op, body, kind) {
    if (this.nc === null) throw new BrokerError("not connected");
    let msg;
    try {
      msg = await this.nc.request(`${this.prefix}.api.session.${op}`, body, {
        timeout: this.options.requestTimeoutMs ?? 5000,
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

  /** @param {Uint8Array} data */
  onMessage(data) {
    this.received += 1;
    if (this.pending >= (this.options.queueSize ?? 10000)) {
      this.dropped += 1;
      return;
    }
    this.pending += 1;
    this.chain = this.chain
      .then(() => this.handle(data))
      // a failing callback ends the subscription rather than silently stopping the queue
      .catch((/** @type {Error} */ err) => this.fail(err))
      .finally(() => (this.pending -= 1));
  }

  /** @param {Uint8Array} data */
  async handle(data) {
    const session = this.session;
    if (session === null || this.closed) return;
    let result;
    try {
      result = await session.accept(data);
    } catch (err) {
      // policy "fail": the one opaque error ends the subscription
      this.fail(/** @type {Error} */ (err));
      return;
    } finally {
      this.options.onChange?.();
    }
    if (!session.keyed && session.untrustedKid !== null) {
      this.fail(
        new TrustError(
          `cluster ${session.cluster} signs with key ${session.untrustedKid}, which this page ` +
            "does not pin: pin it with 'sealstream-consume trust add'",
          session.untrustedKid,
        ),
      );
      return;
    }
    if (result === null) return;
    if (result.type === "batch") {
      this.batches += 1;
      this.rows += result.rows.length;
      this.options.onBatch?.(result);
    } else if (result.type === "end") {
      this.endReason = result.reason;
      this.options.onEnd?.(result.reason);
      await this.close();
    } else {
      this.options.onNotice?.(result);
      if (result.code === "expired" || result.code === "ended") {
        this.fail(new SessionError("ended", `the proxy ended this session: ${result.message}`));
      }
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
    const nc = this.nc;
    if (nc === null) return;
    if (this.session !== null && this.lastToken) {
      const ref = { token: this.lastToken, session: this.session.session };
      nc.publish(`${this.prefix}.api.session.close`, encodeSessionRef(ref));
    }
    void nc.close();
  }

  /** Close the session at the proxy and the connection; idempotent. */
  async close() {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.timer);
    const nc = this.nc;
    if (nc === null) return;
    if (this.session !== null) {
      try {
        const token = await this.token();
        const ref = { token, session: this.session.session };
        await this.request("close", encodeSessionRef(ref), "ok");
      } catch {
        // the proxy expires the session anyway
      }
    }
    await nc.close();
  }
}
