/** A message sent and not yet acknowledged by the server (its PUBACK). */
export interface Pending {
  /** Orders the outbox: messages go in the order they were sent. */
  seq: number;
  /** Where it is published: inbox/{user}, group/{id} or receipt/{user}. */
  topic: string;
  /** The message's id, kept by every resend: the server drops a duplicate. */
  id: string;
  /** The message object, as published. */
  payload: string;
}

/**
 * Keeps what was sent until the server acknowledged it, so that it is
 * sent again, with the same id, after a reconnect or an app restart.
 * Implement it over IndexedDB in a browser or AsyncStorage in React
 * Native; MemoryOutbox lasts as long as the page or process.
 */
export interface Outbox {
  /** Stores a message, giving it the next seq; resolves once it is kept. */
  add(p: Omit<Pending, "seq">): Promise<Pending>;
  /** Forgets the message of seq. */
  remove(seq: number): Promise<void>;
  /** What is pending, in seq order. */
  list(): Promise<Pending[]>;
}

/** An Outbox in memory: messages survive reconnects, not restarts. */
export class MemoryOutbox implements Outbox {
  private next = 0;
  private readonly items = new Map<number, Pending>();

  async add(p: Omit<Pending, "seq">): Promise<Pending> {
    const stored = { ...p, seq: ++this.next };
    this.items.set(stored.seq, stored);
    return stored;
  }

  async remove(seq: number): Promise<void> {
    this.items.delete(seq);
  }

  async list(): Promise<Pending[]> {
    return [...this.items.values()].sort((a, b) => a.seq - b.seq);
  }
}

/**
 * An Outbox over any string key-value storage with async get and set
 * (localStorage wrapped in promises, AsyncStorage, a file): the whole
 * outbox is one JSON value, written before add resolves.
 */
export class KeyValueOutbox implements Outbox {
  // Each change reads and writes the whole value: they run one at a time.
  private chain: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly storage: { getItem(key: string): Promise<string | null>; setItem(key: string, value: string): Promise<void> },
    private readonly key = "chatd-outbox",
  ) {}

  private async load(): Promise<{ next: number; items: Pending[] }> {
    const raw = await this.storage.getItem(this.key);
    return raw ? JSON.parse(raw) : { next: 0, items: [] };
  }

  private serial<T>(f: () => Promise<T>): Promise<T> {
    const run = this.chain.then(f, f);
    this.chain = run.catch(() => undefined);
    return run;
  }

  add(p: Omit<Pending, "seq">): Promise<Pending> {
    return this.serial(async () => {
      const state = await this.load();
      const stored = { ...p, seq: ++state.next };
      state.items.push(stored);
      await this.storage.setItem(this.key, JSON.stringify(state));
      return stored;
    });
  }

  remove(seq: number): Promise<void> {
    return this.serial(async () => {
      const state = await this.load();
      state.items = state.items.filter((i) => i.seq !== seq);
      await this.storage.setItem(this.key, JSON.stringify(state));
    });
  }

  list(): Promise<Pending[]> {
    return this.serial(async () => (await this.load()).items);
  }
}
