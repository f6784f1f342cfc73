// Talking to the server's API: the API key, errors in OpenAI's shape, and a streamed answer's events.
//
// A server started with --api-key answers 401 to every API call without `Authorization: Bearer KEY` (the
// page itself and /health stay open, so the page loads and can ask). On a 401 the page shows its key form,
// waits for the key, keeps it in sessionStorage (this tab only: closing the tab forgets it, and it never
// goes into the page's URL or a cookie) and sends the request again.

import { $, getState, setState } from "./dom.js";

const KEY_ITEM = "corematching.apiKey";

const keyEls = { form: $("key-form"), input: $("api-key"), message: $("key-message") };
let memoryKey = null; // where sessionStorage is unavailable (a locked-down browser), the key lives here
let keyWanted = null; // while the key form is shown: {promise, resolve, stateBefore}, shared by every waiting call

function storedKey() {
  try {
    return sessionStorage.getItem(KEY_ITEM) ?? memoryKey;
  } catch {
    return memoryKey;
  }
}

function storeKey(key) {
  memoryKey = key;
  try {
    sessionStorage.setItem(KEY_ITEM, key);
  } catch {
    // Storage refused: the key still works until the page is reloaded.
  }
}

// Resolves once the user has entered a key; one form for every call that got a 401 meanwhile (the model
// card and a question can both be waiting). Rejects with an AbortError if `signal` aborts first.
function keyFromUser(message, signal) {
  if (!keyWanted) {
    let resolve;
    const promise = new Promise((r) => (resolve = r));
    keyWanted = { promise, resolve, stateBefore: getState() };
    keyEls.form.hidden = false;
    keyEls.input.focus();
    setState("key");
  }
  keyEls.message.textContent = message;
  return new Promise((resolve, reject) => {
    const abort = () => reject(new DOMException("the request was cancelled", "AbortError"));
    if (signal && signal.aborted) return abort();
    if (signal) signal.addEventListener("abort", abort, { once: true });
    keyWanted.promise.then(resolve);
  });
}

keyEls.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const key = keyEls.input.value.trim();
  if (!key) {
    keyEls.message.textContent = "Type the server's API key (the value of its --api-key).";
    return;
  }
  storeKey(key);
  keyEls.input.value = "";
  keyEls.form.hidden = true;
  const wanted = keyWanted;
  keyWanted = null;
  if (wanted) {
    if (getState() === "key") setState(wanted.stateBefore);
    wanted.resolve();
  }
});

// An error with the server's words: `message` from the OpenAI error body where there is one.
export class ServerError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export async function serverError(response) {
  const text = await response.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) {
      return new ServerError(body.error.message, response.status, body.error.code);
    }
  } catch {
    // Not JSON (a proxy's page, say): fall through to the status line.
  }
  const status = `the server answered ${response.status} ${response.statusText}`;
  return new ServerError(`${status}${text ? `: ${text.slice(0, 200)}` : ""}`, response.status, null);
}

// fetch() for an API route, with the key when the page has one; a 401 asks for the key and tries again
// (again and again while the key is refused: the form then shows the server's "the API key is wrong").
export async function apiFetch(path, init = {}) {
  for (;;) {
    const key = storedKey();
    const headers = { ...(init.headers || {}) };
    if (key) headers.Authorization = `Bearer ${key}`;
    const response = await fetch(path, { ...init, headers });
    if (response.status !== 401) return response;
    const error = await serverError(response);
    await keyFromUser(error.message, init.signal);
  }
}

// The `data:` payload of each server-sent event, as the stream arrives.
export async function* sseData(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finished = false;
  try {
    while (!finished) {
      const { value, done } = await reader.read();
      finished = done;
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      buffer = buffer.replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0 || (finished && buffer.trim())) {
        const block = cut >= 0 ? buffer.slice(0, cut) : buffer;
        buffer = cut >= 0 ? buffer.slice(cut + 2) : "";
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) yield data;
      }
    }
  } finally {
    if (!finished) reader.cancel().catch(() => {}); // the caller stopped reading: close the connection
  }
}
