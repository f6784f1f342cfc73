// Pieces every module of the page uses: element lookup and the page's state.

export const $ = (id) => document.getElementById(id);

// body[data-state]: idle, key (waiting for the API key), streaming, done or error. The CSS styles by it
// (the streaming caret) and the browser tests wait on it.
export function setState(state) {
  document.body.dataset.state = state;
}

export function getState() {
  return document.body.dataset.state;
}
