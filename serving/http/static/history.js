// The conversation: its turns as the page shows them, and the messages the page sends for the next question.
//
// The server keeps nothing between requests (as with OpenAI's API): every question carries the whole
// history. The image goes in the first user message only (LLaVA-1.5 takes one image per conversation),
// each earlier answer goes back as an `assistant` message, and the new question comes last.

import { $ } from "./dom.js";
import { formatSeconds, keptLine } from "./stats.js";

const list = $("history");

function hiddenLabel(text) {
  const span = document.createElement("span");
  span.className = "visually-hidden";
  span.textContent = text;
  return span;
}

function paragraph(className, text) {
  const p = document.createElement("p");
  p.className = className;
  p.textContent = text;
  return p;
}

// One question and its answer, shown as soon as the question is sent; the answer grows as it streams.
class Turn {
  constructor(question) {
    this.question = question;
    this.answer = "";
    this.result = null; // the answer's corematching extra (kept tokens, timings) once it is complete
    this.answerEl = paragraph("answer", "");
    this.metaEl = paragraph("turn-meta", "");
    this.el = document.createElement("li");
    this.el.className = "turn";
    // The labels are for screen readers; the look (bubbles) says who spoke.
    this.el.append(
      hiddenLabel("You asked:"),
      paragraph("question", question),
      hiddenLabel("The model answered:"),
      this.answerEl,
      this.metaEl,
    );
    list.append(this.el);
    list.setAttribute("aria-busy", "true"); // read the answer out once, when it is complete
    this.scroll();
  }

  append(piece) {
    this.answerEl.append(piece); // one text node per token: the answer grows as it streams
    this.scroll();
  }

  finish(result) {
    this.answerEl.normalize();
    this.answer = this.answerEl.textContent;
    this.result = result;
    const total = result.timings && result.timings.total;
    this.metaEl.textContent = `${keptLine(result)} · ${formatSeconds(total)}`;
    list.setAttribute("aria-busy", "false");
  }

  discard() {
    this.el.remove();
    list.setAttribute("aria-busy", "false");
  }

  scroll() {
    list.scrollTop = list.scrollHeight;
  }
}

function userMessage(text, dataUrl) {
  if (!dataUrl) return { role: "user", content: text };
  return {
    role: "user",
    content: [
      { type: "text", text },
      { type: "image_url", image_url: { url: dataUrl } },
    ],
  };
}

export class Conversation {
  // `imageReady`: the Promise of the chosen image ({image, dataUrl, name}, or null when unusable), or null.
  constructor(imageReady) {
    this.imageReady = imageReady;
    this.turns = []; // the complete turns, in order: what the next question sends back
    list.replaceChildren();
    list.setAttribute("aria-busy", "false");
  }

  get last() {
    return this.turns.length ? this.turns[this.turns.length - 1] : null;
  }

  // A turn shown in the history; it joins what is sent (`keep`) once its answer is complete.
  begin(question) {
    return new Turn(question);
  }

  keep(turn) {
    this.turns.push(turn);
  }

  // The request's messages for `question`: the system prompt (if any), the history, the question.
  messages(question, dataUrl, system) {
    const out = system ? [{ role: "system", content: system }] : [];
    this.turns.forEach((turn, i) => {
      out.push(userMessage(turn.question, i === 0 ? dataUrl : null));
      out.push({ role: "assistant", content: turn.answer });
    });
    out.push(userMessage(question, this.turns.length ? null : dataUrl));
    return out;
  }
}
