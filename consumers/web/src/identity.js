// The page's long-term identity, kept in IndexedDB (one per origin): the CryptoKey pair is
// stored by structured clone, so the private key stays non-extractable and survives reloads
// without ever being exported. The keys themselves are made in crypto.js.

import { generateIdentityKeys, identityFromKeys } from "./crypto.js";

const DB_NAME = "sealstream";
const STORE = "identity";
const ENTRY = "user";

/**
 * @param {IDBRequest} req
 * @returns {Promise<any>}
 */
function done(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

/** @returns {Promise<IDBDatabase>} */
function openDb() {
  const req = indexedDB.open(DB_NAME, 1);
  req.onupgradeneeded = () => req.result.createObjectStore(STORE);
  return done(req);
}

/**
 * This origin's identity: the stored one, or a new one stored first. Two pages opening at
 * once keep the same key (the put happens only if the store is still empty, in one
 * transaction).
 * @returns {Promise<import("./crypto.js").Identity>}
 */
export async function loadIdentity() {
  const db = await openDb();
  try {
    /** @type {{privateKey: CryptoKey, publicKey: CryptoKey} | undefined} */
    let stored = await done(db.transaction(STORE).objectStore(STORE).get(ENTRY));
    if (stored === undefined) {
      const pair = await generateIdentityKeys();
      const tx = db.transaction(STORE, "readwrite");
      const store = tx.objectStore(STORE);
      stored = await done(store.get(ENTRY));
      if (stored === undefined) {
        stored = { privateKey: pair.privateKey, publicKey: pair.publicKey };
        await done(store.put(stored, ENTRY));
      }
    }
    return await identityFromKeys(stored.privateKey, stored.publicKey);
  } finally {
    db.close();
  }
}
