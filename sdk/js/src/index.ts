/**
 * chatd's TypeScript client (docs/PROTOCOL.md): what each app would
 * otherwise get wrong.
 *
 * - A message is kept in an Outbox until the server's PUBACK and sent
 *   again, with the same id, after a reconnect or an app restart; the
 *   server drops the duplicate of one it stored.
 * - A delivery the server makes again (after a reconnect) is told once,
 *   by (kind, sender, id).
 * - The connection comes back on its own, asking the token provider for
 *   a token at every connect (an expired or refused one is replaced).
 *
 * MQTT 5 by default (3.1.1 with protocolVersion: 4), over TCP (mqtt://,
 * mqtts://) or WebSocket (ws://, wss://), on MQTT.js.
 */
import mqtt from "mqtt";
import type { IClientOptions, MqttClient } from "mqtt";
import { MemoryOutbox, type Outbox } from "./outbox.js";

export { MemoryOutbox, KeyValueOutbox, type Outbox, type Pending } from "./outbox.js";
export { IndexedDBOutbox } from "./idb.js";
export { ChatApi, ApiError, type Group, type Upload, type Device } from "./api.js";

/** How a ChatClient connects. */
export interface ChatClientOptions {
  /** The MQTT URL: mqtt://host:1883, mqtts://..., ws://host:8083/mqtt. */
  url: string;
  /** The user ID. */
  user: string;
  /** The device's name; "" or absent for the bare user client ID. */
  device?: string;
  /** Returns a valid token for user; called at every connect. */
  token: () => Promise<string>;
  /** Keeps unacknowledged messages; a MemoryOutbox when absent. */
  outbox?: Outbox;
  /** 5 (default) or 4 (MQTT 3.1.1). */
  protocolVersion?: 4 | 5;
  /** Wait between connection attempts, in ms; 1000 when absent. */
  reconnectMs?: number;
  /** The least time between two typing signals to one peer, in ms; 3000 when absent. */
  typingEveryMs?: number;
}

/** A message (kind msg), or the copy of one a device of the user sent (sent). */
export interface MessageEvent {
  /** Tells a message. */
  type: "message";
  /** msg: to this user or a group of it; sent: the copy of one another device of this user sent. */
  kind: "msg" | "sent";
  /** The sender (for sent, this user). */
  from: string;
  /** The recipient: a user, or the group ID. */
  to: string;
  /** The group, for a group message. */
  group?: string;
  /** The message's id, as its sender gave it. */
  id: string;
  /** Set for a message the app's backend sent. */
  server: boolean;
  /** The server's time, Unix milliseconds. */
  ts: number;
  /** The message object as its sender wrote it. */
  msg: Record<string, unknown>;
}

/** A delivered or read receipt of messages this user sent. */
export interface ReceiptEvent {
  /** Tells a receipt. */
  type: "receipt";
  /** delivered: a device of the recipient took them; read: the recipient read them. */
  status: "delivered" | "read";
  /** The user who received or read them. */
  by: string;
  /** The ids of the messages. */
  ids: string[];
  /**
   * Set on a read receipt one of this user's own devices sent: the user
   * whose messages it read (clear that conversation's unread count).
   */
  peer?: string;
}

/** A user's presence: online, or when last seen. */
export interface PresenceEvent {
  /** Tells a presence change. */
  type: "presence";
  /** Whose presence. */
  user: string;
  /** Whether a device of the user is connected. */
  online: boolean;
  /** When last seen, Unix milliseconds, for a user offline. */
  lastSeen?: number;
}

/** A user is typing to this one (never stored; shown for a few seconds). */
export interface TypingEvent {
  /** Tells a typing signal. */
  type: "typing";
  /** Who is typing. */
  from: string;
}

/**
 * The server refused a message sent over MQTT 3.1.1 or to part of a group
 * (PROTOCOL.md section 5): the error it queued to this user's inbox.
 */
export interface ErrorEvent {
  /** Tells an error the server queued. */
  type: "error";
  /** The id of the message refused. */
  ref: string;
  /** not_authorized, bad_topic, too_large, bad_payload, queue_full, rate_limited, unknown_group, rejected. */
  code: string;
  /** Why, for people. */
  reason: string;
}

/** The server stored a message sent (its PUBACK). */
export interface StoredEvent {
  /** Tells a PUBACK. */
  type: "stored";
  /** The id of the message stored. */
  id: string;
}

/** The server refused a message sent; it is not sent again. */
export interface RefusedEvent {
  /** Tells a negative PUBACK (MQTT 5). */
  type: "refused";
  /** The id of the message refused. */
  id: string;
  /** PROTOCOL.md section 5: not_authorized, bad_topic, too_large, ... */
  code: string;
}

/** The connection's state changed. */
export interface ConnectionEvent {
  /** online: connected and subscribed; offline: the connection is gone and being retried. */
  type: "online" | "offline";
}

/** Everything a ChatClient tells of. */
export type ChatEvent =
  | MessageEvent
  | ReceiptEvent
  | StoredEvent
  | RefusedEvent
  | ConnectionEvent
  | PresenceEvent
  | TypingEvent
  | ErrorEvent;

const reasonNames: Record<number, string> = {
  0x87: "not_authorized",
  0x90: "bad_topic",
  0x95: "too_large",
  0x97: "queue_full_or_rate_limited",
  0x99: "bad_payload",
};

/** Names an MQTT 5 PUBACK reason code as PROTOCOL.md section 5 does. */
export function reasonName(code: number): string {
  return reasonNames[code] ?? `reason_0x${code.toString(16)}`;
}

/** One device of one user, connected (and reconnected) to chatd. */
export class ChatClient {
  private readonly outbox: Outbox;
  private readonly listeners = new Set<(e: ChatEvent) => void>();
  private readonly seen = new Seen(10000);
  private mqtt?: MqttClient;
  private closed = false;
  private sending = false;
  private again = false;
  private timer?: ReturnType<typeof setTimeout>;
  private readonly watched = new Set<string>();
  private readonly typed = new Map<string, number>();

  constructor(private readonly opts: ChatClientOptions) {
    this.outbox = opts.outbox ?? new MemoryOutbox();
  }

  /** The client ID: user, or user/device. */
  get clientId(): string {
    return this.opts.device ? `${this.opts.user}/${this.opts.device}` : this.opts.user;
  }

  /** Calls f with every event; returns a function that stops it. */
  on(f: (e: ChatEvent) => void): () => void {
    this.listeners.add(f);
    return () => this.listeners.delete(f);
  }

  /** Starts connecting; messages sent before the first connect wait. */
  start(): void {
    void this.connect();
  }

  /**
   * Keeps msg in the outbox for user `to`, giving it a random id if it
   * has none, and resolves with that id once it is kept; it goes as soon
   * as the client is connected. A stored or refused event tells what
   * became of it.
   */
  send(to: string, msg: Record<string, unknown>): Promise<string> {
    return this.queue(`inbox/${to}`, msg);
  }

  /** send to every member of a group. */
  sendGroup(group: string, msg: Record<string, unknown>): Promise<string> {
    return this.queue(`group/${group}`, msg);
  }

  /** Tells the sender of messages ids that this user read them. */
  async markRead(from: string, ids: string[]): Promise<void> {
    await this.queue(`receipt/${from}`, { status: "read", ids }, false);
  }

  /**
   * Tells the online devices of user `to` that this user is typing, at
   * most once per typingEveryMs per peer; never stored, dropped offline.
   */
  typing(to: string): void {
    const now = Date.now();
    if (now - (this.typed.get(to) ?? -Infinity) < (this.opts.typingEveryMs ?? 3000)) return;
    const c = this.mqtt;
    if (!c?.connected) return;
    this.typed.set(to, now);
    c.publish(`typing/${to}`, "{}", { qos: 0 });
  }

  /** Tells presence events of users, now and after every reconnect. */
  watchPresence(...users: string[]): void {
    const fresh = users.filter((u) => !this.watched.has(u));
    for (const u of fresh) this.watched.add(u);
    const c = this.mqtt;
    if (c?.connected && fresh.length) c.subscribe(fresh.map((u) => `presence/${u}`), { qos: 0 });
  }

  /** Stops telling presence events of users. */
  unwatchPresence(...users: string[]): void {
    for (const u of users) this.watched.delete(u);
    const c = this.mqtt;
    if (c?.connected && users.length) c.unsubscribe(users.map((u) => `presence/${u}`));
  }

  /** Whether the client is connected now. */
  get connected(): boolean {
    return this.mqtt?.connected ?? false;
  }

  /** How many messages wait for the server's PUBACK. */
  async pending(): Promise<number> {
    return (await this.outbox.list()).length;
  }

  /** Disconnects and stops; what is pending stays in the outbox. */
  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.timer);
    const c = this.mqtt;
    this.mqtt = undefined;
    if (c) await c.endAsync();
  }

  private async queue(topic: string, msg: Record<string, unknown>, withId = true): Promise<string> {
    let id = typeof msg.id === "string" ? msg.id : "";
    const body = { ...msg };
    if (withId && !id) {
      id = newId();
      body.id = id;
    }
    await this.outbox.add({ topic, id, payload: JSON.stringify(body) });
    void this.drain();
    return id;
  }

  private emit(e: ChatEvent): void {
    for (const f of this.listeners) f(e);
  }

  /** One connection attempt; a new one follows whenever it ends. */
  private async connect(): Promise<void> {
    if (this.closed) return;
    let password: string;
    try {
      password = await this.opts.token();
    } catch {
      this.retry();
      return;
    }
    if (this.closed) return;
    const v5 = (this.opts.protocolVersion ?? 5) === 5;
    const options: IClientOptions = {
      clientId: this.clientId,
      username: this.opts.user,
      password,
      protocolVersion: v5 ? 5 : 4,
      clean: false,
      // Reconnects are this client's own, each with a fresh token.
      reconnectPeriod: 0,
      connectTimeout: 10_000,
      properties: v5 ? { sessionExpiryInterval: 30 * 24 * 3600 } : undefined,
    };
    const c = mqtt.connect(this.opts.url, options);
    this.mqtt = c;
    c.on("connect", () => {
      this.emit({ type: "online" });
      c.subscribe(`inbox/${this.opts.user}`, { qos: 1 });
      if (this.watched.size) c.subscribe([...this.watched].map((u) => `presence/${u}`), { qos: 0 });
      void this.drain();
    });
    c.on("message", (topic, payload) => this.received(topic, payload));
    c.on("error", () => {
      // A refused CONNECT (an expired token) or a network error: the
      // close that follows reconnects.
    });
    c.on("close", () => {
      if (this.mqtt !== c) return;
      this.mqtt = undefined;
      c.removeAllListeners();
      c.end(true);
      this.emit({ type: "offline" });
      this.retry();
    });
  }

  private retry(): void {
    if (this.closed) return;
    this.timer = setTimeout(() => void this.connect(), this.opts.reconnectMs ?? 1000);
  }

  /** Publishes the outbox in order, one message at a time, each until answered. */
  private async drain(): Promise<void> {
    if (this.sending) {
      this.again = true;
      return;
    }
    this.sending = true;
    try {
      do {
        this.again = false;
        for (;;) {
          const c = this.mqtt;
          if (!c || !c.connected || this.closed) return;
          const [p] = await this.outbox.list();
          if (!p) break;
          let code = 0;
          try {
            const pkt = await c.publishAsync(p.topic, p.payload, { qos: 1 });
            code = (pkt as { reasonCode?: number } | undefined)?.reasonCode ?? 0;
          } catch (err) {
            const rc = (err as { code?: number }).code;
            if (typeof rc !== "number" || rc < 0x80) {
              return; // not answered: the connection went down; again on the next
            }
            code = rc;
          }
          await this.outbox.remove(p.seq);
          if (p.id) {
            this.emit(code >= 0x80 ? { type: "refused", id: p.id, code: reasonName(code) } : { type: "stored", id: p.id });
          }
        }
      } while (this.again);
    } finally {
      this.sending = false;
    }
  }

  private received(topic: string, payload: Uint8Array): void {
    let e: Record<string, unknown>;
    try {
      e = JSON.parse(decoder.decode(payload));
    } catch {
      return;
    }
    if (typeof e !== "object" || e === null) return;
    if (topic.startsWith("presence/")) {
      const lastSeen = typeof e.last_seen === "number" ? e.last_seen : undefined;
      this.emit({ type: "presence", user: String(e.user), online: e.online === true, lastSeen });
      return;
    }
    switch (e.kind) {
      case "msg":
      case "sent": {
        const msg = (e.msg ?? {}) as Record<string, unknown>;
        const id = typeof msg.id === "string" ? msg.id : "";
        if (id && !this.seen.first(`${e.kind}\u0000${e.from}\u0000${id}`)) return;
        this.emit({
          type: "message", kind: e.kind, from: String(e.from), to: String(e.to),
          group: typeof e.group === "string" ? e.group : undefined,
          id, server: e.server === true, ts: Number(e.ts), msg,
        });
        return;
      }
      case "receipt":
        this.emit({
          type: "receipt", status: e.status as "delivered" | "read", by: String(e.by),
          ids: Array.isArray(e.ids) ? e.ids.map(String) : [],
          peer: typeof e.peer === "string" ? e.peer : undefined,
        });
        return;
      case "typing":
        this.emit({ type: "typing", from: String(e.from) });
        return;
      case "error":
        this.emit({ type: "error", ref: String(e.ref ?? ""), code: String(e.code ?? ""), reason: String(e.reason ?? "") });
        return;
    }
  }
}

const decoder = new TextDecoder();

/**
 * A random message id: a UUID where the platform has randomUUID (browsers
 * give it to secure contexts only), else 128 random bits in hex.
 */
export function newId(): string {
  const c = globalThis.crypto;
  if (typeof c.randomUUID === "function") return c.randomUUID();
  const b = c.getRandomValues(new Uint8Array(16));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

/** Remembers the last n keys told. */
export class Seen {
  private readonly keys = new Set<string>();
  private readonly ring: string[];
  private next = 0;

  constructor(n: number) {
    this.ring = new Array<string>(n).fill("");
  }

  /** Whether key is new; it is remembered. */
  first(key: string): boolean {
    if (this.keys.has(key)) return false;
    const old = this.ring[this.next];
    if (old) this.keys.delete(old);
    this.ring[this.next] = key;
    this.next = (this.next + 1) % this.ring.length;
    this.keys.add(key);
    return true;
  }
}
