// Proof-of-work solver of the waiting page, in a Web Worker so the page stays responsive.
//
// The challenge is ALTCHA's (v1, see waitroom/line/challenge.py): find the number n in
// [0, maxnumber] with SHA-256(salt + n) = challenge (hex). The page may start several of these
// workers; worker `index` of `count` tries the batches index, index + count, index + 2·count...
// of BATCH numbers each, so together they sweep the range from 0 upwards.
//
// in:  {challenge, salt, maxnumber, index, count}
// out: {type: "progress", tried} every ~100 ms (numbers this worker has tried),
//      {type: "solved", number} | {type: "exhausted"} | {type: "error", message}

/** Digests in flight at once: crypto.subtle is asynchronous, and one at a time is ~40% slower. */
const BATCH = 1000;
const PROGRESS_MS = 100;

const encoder = new TextEncoder();

function hexToBytes(hex) {
  const bytes = new Uint8Array(hex.length / 2);
  for (let i = 0; i < bytes.length; i += 1) bytes[i] = parseInt(hex.substr(i * 2, 2), 16);
  return bytes;
}

function equal(buffer, expected) {
  const got = new Uint8Array(buffer);
  for (let i = 0; i < expected.length; i += 1) if (got[i] !== expected[i]) return false;
  return true;
}

async function solve({ challenge, salt, maxnumber, index = 0, count = 1 }) {
  const expected = hexToBytes(challenge);
  let tried = 0;
  let reported = performance.now();
  for (let start = index * BATCH; start <= maxnumber; start += count * BATCH) {
    const end = Math.min(start + BATCH - 1, maxnumber);
    const digests = [];
    for (let n = start; n <= end; n += 1) {
      digests.push(crypto.subtle.digest("SHA-256", encoder.encode(salt + n)));
    }
    const results = await Promise.all(digests);
    for (let i = 0; i < results.length; i += 1) {
      if (equal(results[i], expected)) return { type: "solved", number: start + i };
    }
    tried += results.length;
    const now = performance.now();
    if (now - reported >= PROGRESS_MS) {
      reported = now;
      postMessage({ type: "progress", tried });
    }
  }
  return { type: "exhausted" };
}

self.onmessage = async (event) => {
  try {
    postMessage(await solve(event.data));
  } catch (error) {
    postMessage({ type: "error", message: String(error && error.message ? error.message : error) });
  }
};
