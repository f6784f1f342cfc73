// The image: reading the chosen file, and drawing the model's view of it with the kept image tokens.

import { $ } from "./dom.js";

const KEPT_COLOUR = "rgb(255, 200, 0)";
const PRUNED_FILL = "rgba(0, 0, 0, 0.65)";
const CANVAS_TARGET = 640; // canvas pixels across: the view is drawn at an integer multiple of image_size
// Used until /v1/models answers (and if it cannot): LLaVA-1.5's geometry, the project's default build.
const FALLBACK_GEOMETRY = { image_size: 336, patch_size: 14, num_image_tokens: 576 };

const els = { drop: $("drop"), hint: $("drop-hint"), canvas: $("overlay") };

function geometry(model) {
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

// -> {image, dataUrl, name}; rejects when the browser cannot decode the file.
export async function prepareImage(file) {
  const [dataUrl, image] = await Promise.all([readAsDataUrl(file), decodeImage(file)]);
  // The server reads the format from the bytes; it only needs an image/* media type on the data: URL.
  const typed = file.type.startsWith("image/") ? dataUrl : dataUrl.replace(/^data:[^;,]*/, "data:image/png");
  return { image, dataUrl: typed, name: file.name };
}

// Back to the drop zone's hint (no usable image).
export function clearView() {
  els.canvas.hidden = true;
  els.hint.hidden = false;
  els.drop.classList.remove("has-image");
}

// The model's view: the short side resized to image_size and the centre cropped square (as ImageOps.fit
// and the CLIP processor do); one grid cell per patch. With `result` (an answer's corematching extra:
// kept_image_tokens, or null for "every token kept") the pruned patches are dimmed and the kept ones
// outlined.
export function drawView(image, result, model) {
  const { grid, offset, cell, side } = geometry(model);
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
