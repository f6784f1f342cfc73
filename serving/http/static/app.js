// The page's client: pick an image, ask a question, stream the answer from POST /v1/chat/completions
// (OpenAI server-sent events) and draw the image tokens the model kept over its view of the image.
// Plain browser JavaScript, no build step and no external resources: the server ships this file as is.
"use strict";

const KEPT_COLOUR = "rgb(255, 200, 0)";
const PRUNED_FILL = "rgba(0, 0, 0, 0.65)";
const CANVAS_TARGET = 640; // canvas pixels across: the view is drawn at an integer multiple of image_size
// Used until /v1/models answers (and if it cannot): LLaVA-1.5's geometry, the project's default build.
const FALLBACK_GEOMETRY = { image_size: 336, patch_size: 14, num_image_tokens: 576 };

const $ = (id) => document.getElementById(id);
const els = {
  model: $("model"),
  drop: $("drop"),
  input: $("image-input"),
  hint: $("drop-hint"),
  fileName: $("file-name"),
  canvas: $("overlay"),
  form: $("ask-form"),
  question: $("question"),
  ask: $("ask"),
  answer: $("answer"),
  error: $("error"),
  kept: $("kept"),
  timings: $("timings"),
};

let model = null; // the /v1/models card of the served model, once loaded
let imageReady = null; // Promise of {image, dataUrl, name} for the chosen file, or of null when it is unusable
let streaming = false;
let choices = 0; // counts the files chosen: a slow decode of an older choice must not draw over a newer one

function setState(state) {
  document.body.dataset.state = state;
}

function showError(message) {
  els.error.textContent = message;
  els.error.hidden = false;
  setState("error");
}

function clearResult() {
  els.error.hidden = true;
  els.error.textContent = "";
  els.answer.textContent = "";
  els.kept.textContent = "";
  els.timings.replaceChildren();
}

// -- the model ----------------------------------------------------------------------------------------

async function loadModel() {
  try {
    const response = await fetch("/v1/models");
    if (!response.ok) throw new Error(await errorMessage(response));
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

function geometry() {
  const cm = (model && model.corematching) || {};
  const size = cm.image_size || FALLBACK_GEOMETRY.image_size;
  const patch = cm.patch_size || FALLBACK_GEOMETRY.patch_size;
  const grid = Math.floor(size / patch);
  const tokens = cm.num_image_tokens ?? grid * grid;
  // A vision tower that keeps its CLS token has one image token before the patches (index 0).
  const offset = Math.max(0, tokens - grid * grid);
  const scale = Math.max(1, Math.round(CANVAS_TARGET / size));
  return { size, grid, offset, cell: patch * scale, side: grid * patch * scale };
}

// -- the image ----------------------------------------------------------------------------------------

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error || new Error("cannot read the file"));
    reader.readAsDataURL(file);
  });
}

function decodeImage(file) {
  return new Promise((resolve, reject) => {
    const url = URL.createObjectURL(file);
    const image = new Image();
    image.onload = () => {
      URL.revokeObjectURL(url);
      if (image.naturalWidth && image.naturalHeight) resolve(image);
      else reject(new Error("the image has no size"));
    };
    image.onerror = () => {
      URL.revokeObjectURL(url);
      reject(new Error("the browser cannot decode it"));
    };
    image.src = url;
  });
}

async function prepareImage(file) {
  const [dataUrl, image] = await Promise.all([readAsDataUrl(file), decodeImage(file)]);
  // The server reads the format from the bytes; it only needs an image/* media type on the data: URL.
  const typed = file.type.startsWith("image/") ? dataUrl : dataUrl.replace(/^data:[^;,]*/, "data:image/png");
  return { image, dataUrl: typed, name: file.name };
}

function chooseFile(file) {
  if (!file || streaming) return;
  clearResult();
  setState("idle");
  els.fileName.textContent = file.name;
  const choice = ++choices;
  imageReady = prepareImage(file).then(
    async (chosen) => {
      await modelReady; // the canvas's geometry comes from the model card
      if (choice !== choices) return chosen;
      drawView(chosen.image, null);
      const { naturalWidth: w, naturalHeight: h } = chosen.image;
      els.fileName.textContent = `${file.name} · ${w}×${h} · click or drop to replace`;
      if (document.body.dataset.state !== "error") setState("idle");
      return chosen;
    },
    () => {
      if (choice !== choices) return null;
      els.canvas.hidden = true;
      els.hint.hidden = false;
      els.drop.classList.remove("has-image");
      showError(`${file.name} is not an image this browser can read; choose a PNG or JPEG file`);
      return null;
    },
  );
}

// The model's view: the short side resized to image_size and the centre cropped square (as ImageOps.fit
// and the CLIP processor do); one grid cell per patch. With `kept` (image token indices, or null for
// "every token kept") the pruned patches are dimmed and the kept ones outlined.
function drawView(image, result) {
  const { grid, offset, cell, side } = geometry();
  const canvas = els.canvas;
  canvas.width = side;
  canvas.height = side;
  const ctx = canvas.getContext("2d");
  const w = image.naturalWidth;
  const h = image.naturalHeight;
  const s = Math.min(w, h);
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.clearRect(0, 0, side, side);
  ctx.drawImage(image, (w - s) / 2, (h - s) / 2, s, s, 0, 0, side, side);
  canvas.hidden = false;
  els.hint.hidden = true;
  els.drop.classList.add("has-image");
  Object.assign(canvas.dataset, { grid, cell, offset });
  delete canvas.dataset.keptCount;
  delete canvas.dataset.dimmedCount;
  if (!result) return;

  const keptSet = result.kept_image_tokens == null ? null : new Set(result.kept_image_tokens);
  const kept = [];
  let dimmed = 0;
  ctx.fillStyle = PRUNED_FILL;
  for (let p = 0; p < grid * grid; p++) {
    const x = (p % grid) * cell;
    const y = Math.floor(p / grid) * cell;
    if (keptSet === null || keptSet.has(p + offset)) {
      kept.push([x, y]);
    } else {
      ctx.fillRect(x, y, cell, cell);
      dimmed++;
    }
  }
  // Outlines go on after every fill so that a dimmed neighbour never covers half of a kept outline.
  const line = Math.max(1, Math.round(cell / 14));
  ctx.strokeStyle = KEPT_COLOUR;
  ctx.lineWidth = line;
  for (const [x, y] of kept) ctx.strokeRect(x + line / 2, y + line / 2, cell - line, cell - line);
  canvas.dataset.keptCount = String(kept.length);
  canvas.dataset.dimmedCount = String(dimmed);
}

// -- the request and its stream -----------------------------------------------------------------------

async function errorMessage(response) {
  const text = await response.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return body.error.message;
  } catch {
    // Not JSON (a proxy's page, say): fall through to the status line.
  }
  return `the server answered ${response.status} ${response.statusText}${text ? `: ${text.slice(0, 200)}` : ""}`;
}

// The `data:` payload of each server-sent event, as the stream arrives.
async function* sseData(body) {
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

function formatSeconds(seconds) {
  if (seconds == null) return "—";
  if (seconds < 1) return `${(seconds * 1000).toFixed(seconds < 0.01 ? 1 : 0)} ms`;
  return `${seconds.toFixed(2)} s`;
}

function showStats(result) {
  const total = result.num_image_tokens;
  if (result.kept_image_tokens == null) {
    els.kept.textContent = `kept ${total} of ${total} image tokens: every token was kept (dense build)`;
  } else {
    const k = result.num_kept_image_tokens;
    const share = total ? ` (${Math.round((100 * k) / total)}%)` : "";
    els.kept.textContent = `kept ${k} of ${total} image tokens${share}`;
  }
  const t = result.timings || {};
  const rate = t.decode_tokens_per_second;
  const rows = [
    ["time to first token", formatSeconds(t.time_to_first_token)],
    ["prefill", formatSeconds(t.prefill)],
    ["decode", rate == null ? "—" : `${rate.toFixed(1)} tokens/s`],
    ["total", formatSeconds(t.total)],
  ];
  els.timings.replaceChildren(
    ...rows.map(([name, value]) => {
      const row = document.createElement("div");
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = name;
      dd.textContent = value;
      row.append(dt, dd);
      return row;
    }),
  );
  if (result.backend) els.timings.title = `backend: ${result.backend}`;
}

async function ask(event) {
  event.preventDefault();
  if (streaming) return;
  clearResult();
  if (!imageReady) return showError("choose an image first (click the image area or drop a file on it)");
  const question = els.question.value.trim();
  if (!question) return showError("type a question about the image");
  const chosen = await imageReady;
  if (!chosen) return showError("the chosen file is not an image this browser can read; choose a PNG or JPEG file");
  await modelReady;
  if (!model) return showError("the model is unavailable (GET /v1/models failed); reload the page");

  streaming = true;
  els.ask.disabled = true;
  setState("streaming");
  drawView(chosen.image, null);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        model: model.id,
        stream: true,
        messages: [
          {
            role: "user",
            content: [
              { type: "text", text: question },
              { type: "image_url", image_url: { url: chosen.dataUrl } },
            ],
          },
        ],
      }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
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
      if (piece) els.answer.append(piece); // one text node per token: the answer grows as it streams
      if (chunk.corematching) result = chunk.corematching;
    }
    if (!result) throw new Error("the stream ended before the answer was complete; see the server's log");
    els.answer.normalize();
    drawView(chosen.image, result);
    showStats(result);
    setState("done");
  } catch (e) {
    showError(e instanceof TypeError ? `cannot reach the server (${e.message})` : e.message);
  } finally {
    streaming = false;
    els.ask.disabled = false;
  }
}

// -- wiring -------------------------------------------------------------------------------------------

els.form.addEventListener("submit", ask);
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
