// The page's client: pick an image, hold a conversation about it, stream each answer from
// POST /v1/chat/completions (OpenAI server-sent events) and draw the image tokens the model kept for the
// latest answer over its view of the image. Plain browser JavaScript modules, no build step and no
// external resources: the server ships these files as they are.

import { apiFetch, serverError, sseData } from "./api.js";
import { $, getState, setState } from "./dom.js";
import { Conversation } from "./history.js";
import { clearStats, showStats } from "./stats.js";
import { clearView, drawView, prepareImage } from "./view.js";

const FIRST_PLACEHOLDER = "e.g. What colour is the circle?";
const FOLLOW_UP_PLACEHOLDER = "Ask a follow-up question";

const els = {
  model: $("model"),
  drop: $("drop"),
  input: $("image-input"),
  fileName: $("file-name"),
  form: $("ask-form"),
  question: $("question"),
  system: $("system-prompt"),
  ask: $("ask"),
  restart: $("new-conversation"),
  error: $("error"),
};

let model = null; // the /v1/models card of the served model, once loaded
let conversation = new Conversation(null);
let answering = null; // the AbortController of the question being answered, or null

function showError(message) {
  els.error.textContent = message;
  els.error.hidden = false;
  setState("error");
}

function clearError() {
  els.error.hidden = true;
  els.error.textContent = "";
}

// The buttons and the question's hint follow the conversation: Ask waits for the answer in progress,
// "New conversation" has something to clear.
function updateControls() {
  els.ask.disabled = answering !== null;
  els.restart.disabled = answering === null && conversation.turns.length === 0;
  els.question.placeholder = conversation.turns.length ? FOLLOW_UP_PLACEHOLDER : FIRST_PLACEHOLDER;
}

// -- the model ----------------------------------------------------------------------------------------

async function loadModel() {
  try {
    const response = await apiFetch("/v1/models");
    if (!response.ok) throw await serverError(response);
    const body = await response.json();
    if (!body.data || !body.data.length) throw new Error("the server lists no model");
    model = body.data[0];
    const cm = model.corematching || {};
    const budget =
      cm.method === "dense" ? "dense (every token)" : `keeps ${cm.token_budget ?? "auto"} of ${cm.num_image_tokens}`;
    els.model.textContent = [model.id, budget, cm.weights, cm.backend].filter(Boolean).join(" · ");
    els.model.title = JSON.stringify(cm, null, 2);
  } catch (e) {
    els.model.textContent = "model unavailable";
    showError(`cannot read the model from /v1/models: ${e.message}`);
  }
}
const modelReady = loadModel();

// -- the conversation ---------------------------------------------------------------------------------

// A new conversation about `imageReady` (the same image for "New conversation", a new one when a file is
// chosen): the answer in progress is cancelled, the history and the figures cleared, the image redrawn
// without an overlay.
function startConversation(imageReady) {
  if (answering) answering.abort();
  answering = null;
  conversation = new Conversation(imageReady);
  clearError();
  clearStats();
  setState("idle");
  updateControls();
  if (!imageReady) return;
  const started = conversation;
  imageReady.then(async (chosen) => {
    await modelReady; // the canvas's geometry comes from the model card
    if (chosen && started === conversation && !started.turns.length && !answering) drawView(chosen.image, null, model);
  });
}

function chooseFile(file) {
  if (!file) return;
  els.fileName.textContent = file.name;
  const imageReady = prepareImage(file).then(
    async (chosen) => {
      await modelReady;
      if (imageReady === conversation.imageReady) {
        const { naturalWidth: w, naturalHeight: h } = chosen.image;
        els.fileName.textContent = `${file.name} · ${w}×${h} · click or drop to replace`;
      }
      return chosen;
    },
    () => {
      // A slow decode of an older choice must not touch the page of a newer one.
      if (imageReady === conversation.imageReady) {
        clearView();
        showError(`${file.name} is not an image this browser can read; choose a PNG or JPEG file`);
      }
      return null;
    },
  );
  startConversation(imageReady); // one image per conversation
}

// The figures and overlay of the latest complete answer (none before the first).
function showLatest(chosen) {
  const last = conversation.last;
  drawView(chosen.image, last && last.result, model);
  if (last) showStats(last.result);
  else clearStats();
}

// Reads the streamed answer into `turn`; -> the answer's corematching extra.
async function streamAnswer(response, turn) {
  let result = null;
  for await (const data of sseData(response.body)) {
    if (data === "[DONE]") break;
    let chunk;
    try {
      chunk = JSON.parse(data);
    } catch {
      throw new Error(`the server sent an event that is not JSON: ${data.slice(0, 80)}`);
    }
    if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
    const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta && chunk.choices[0].delta.content;
    if (piece) turn.append(piece);
    if (chunk.corematching) result = chunk.corematching;
  }
  if (!result) throw new Error("the stream ended before the answer was complete; see the server's log");
  return result;
}

async function ask(event) {
  event.preventDefault();
  if (answering) return;
  clearError();
  const convo = conversation;
  if (!convo.imageReady) return showError("choose an image first (click the image area or drop a file on it)");
  const question = els.question.value.trim();
  if (!question) return showError("type a question about the image");

  const controller = new AbortController();
  answering = controller; // from here on, a second Ask waits: one answer at a time
  updateControls();
  let turn = null;
  try {
    const chosen = await convo.imageReady;
    if (controller.signal.aborted) return;
    if (!chosen) throw new Error("the chosen file is not an image this browser can read; choose a PNG or JPEG file");
    await modelReady;
    if (controller.signal.aborted) return;
    if (!model) throw new Error("the model is unavailable (GET /v1/models failed); reload the page");

    const messages = convo.messages(question, chosen.dataUrl, els.system.value.trim());
    turn = convo.begin(question);
    els.question.value = "";
    setState("streaming");
    drawView(chosen.image, null, model); // the overlay is the answer's: it comes back with the answer
    clearStats();
    try {
      const response = await apiFetch("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ model: model.id, stream: true, messages }),
        signal: controller.signal,
      });
      if (!response.ok) throw await serverError(response);
      turn.finish(await streamAnswer(response, turn));
    } catch (e) {
      if (controller.signal.aborted) return; // a new conversation replaced this one and cleared the page
      turn.discard(); // a failed answer is not part of the conversation: the question can be asked again
      if (!els.question.value) els.question.value = question;
      showLatest(chosen);
      throw e;
    }
    convo.keep(turn);
    showLatest(chosen);
    setState("done");
  } catch (e) {
    let message = e instanceof TypeError ? `cannot reach the server (${e.message})` : e.message;
    if (e.code === "prompt_too_long") message += " — start a new conversation to ask more";
    showError(message);
  } finally {
    if (answering === controller) {
      answering = null;
      updateControls();
      if (turn && getState() === "done") els.question.focus(); // ready for the follow-up question
    }
  }
}

// -- wiring -------------------------------------------------------------------------------------------

els.form.addEventListener("submit", ask);
els.restart.addEventListener("click", () => {
  startConversation(conversation.imageReady); // the image stays: ask about it afresh
  els.question.focus();
});
els.input.addEventListener("change", () => {
  chooseFile(els.input.files[0]);
  els.input.value = ""; // so that choosing the same file again fires `change` again
});
for (const name of ["dragenter", "dragover"]) {
  els.drop.addEventListener(name, (e) => {
    e.preventDefault();
    els.drop.classList.add("dragging");
  });
}
for (const name of ["dragleave", "drop"]) {
  els.drop.addEventListener(name, () => els.drop.classList.remove("dragging"));
}
els.drop.addEventListener("drop", (e) => {
  e.preventDefault();
  chooseFile(e.dataTransfer.files[0]);
});
// A file dropped next to the drop zone would otherwise make the browser navigate away to it.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());
document.addEventListener("paste", (e) => {
  const file = [...(e.clipboardData ? e.clipboardData.files : [])].find((f) => f.type.startsWith("image/"));
  if (file) chooseFile(file);
});
updateControls();
