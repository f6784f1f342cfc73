// The latest answer's figures: how many image tokens the model kept, and where the time went.

import { $ } from "./dom.js";

const els = { kept: $("kept"), timings: $("timings") };

export function formatSeconds(seconds) {
  if (seconds == null) return "—";
  if (seconds < 1) return `${(seconds * 1000).toFixed(seconds < 0.01 ? 1 : 0)} ms`;
  return `${seconds.toFixed(2)} s`;
}

// "kept 64 of 576 image tokens (11%)", from an answer's corematching extra.
export function keptLine(result) {
  const total = result.num_image_tokens;
  if (result.kept_image_tokens == null) {
    return `kept ${total} of ${total} image tokens: every token was kept (dense build)`;
  }
  const k = result.num_kept_image_tokens;
  const share = total ? ` (${Math.round((100 * k) / total)}%)` : "";
  return `kept ${k} of ${total} image tokens${share}`;
}

export function clearStats() {
  els.kept.textContent = "";
  els.timings.replaceChildren();
  els.timings.removeAttribute("title");
}

export function showStats(result) {
  els.kept.textContent = keptLine(result);
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
