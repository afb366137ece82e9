import type { Outbox, Pending } from "./outbox.js";

/**
 * An Outbox in a browser's IndexedDB: what was sent survives a reload, a
 * closed tab and a browser restart. One object store, keyed by seq, which
 * IndexedDB assigns in increasing order.
 */
export class IndexedDBOutbox implements Outbox {
  private db?: Promise<IDBDatabase>;

  /** @param name the database's name: one per user and device of the origin */
  constructor(private readonly name = "chatd-outbox") {}

  private open(): Promise<IDBDatabase> {
    this.db ??= new Promise((resolve, reject) => {
      const req = indexedDB.open(this.name, 1);
      req.onupgradeneeded = () => req.result.createObjectStore("pending", { keyPath: "seq", autoIncrement: true });
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    });
    return this.db;
  }

  /** Runs f in a transaction and resolves with its request's result once the transaction committed. */
  private async run<T>(mode: IDBTransactionMode, f: (s: IDBObjectStore) => IDBRequest<T>): Promise<T> {
    const db = await this.open();
    return new Promise((resolve, reject) => {
      const tx = db.transaction("pending", mode, { durability: "strict" });
      const req = f(tx.objectStore("pending"));
      tx.oncomplete = () => resolve(req.result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  }

  async add(p: Omit<Pending, "seq">): Promise<Pending> {
    const seq = await this.run("readwrite", (s) => s.add({ ...p }));
    return { ...p, seq: Number(seq) };
  }

  async remove(seq: number): Promise<void> {
    await this.run("readwrite", (s) => s.delete(seq));
  }

  async list(): Promise<Pending[]> {
    return (await this.run("readonly", (s) => s.getAll())) as Pending[];
  }
}
