// The draw-a-digit page: strokes on a canvas (pointer events: mouse, touch, pen), predictions
// from POST /api/predict while drawing (throttled, one request at a time), the probability of
// every class, and the 28x28 image the model saw.

const INK_WIDTH = 20; // pixels of the 280x280 canvas: MNIST's strokes are about 1/10 of the digit
const THROTTLE_MS = 120; // at most one prediction request this often while drawing

const $ = (id) => document.getElementById(id);
const pad = $("pad");
const ctx = pad.getContext("2d");
const seen = $("seen").getContext("2d");
const result = $("result");

const state = {
  strokes: [], // each an array of [x, y] in canvas pixels
  drawing: null, // the stroke under the pointer
  pointerId: null,
  background: null, // an uploaded image, drawn under the strokes
  upload: null, // the uploaded file while it is what the canvas shows
  classes: [],
};
const queue = { dirty: false, inFlight: false, timer: null, last: 0 };

// ---- drawing -------------------------------------------------------------------------------

function drawStroke(points) {
  ctx.beginPath();
  if (points.length === 1) {
    ctx.arc(points[0][0], points[0][1], INK_WIDTH / 2, 0, 2 * Math.PI);
    ctx.fill();
    return;
  }
  ctx.moveTo(points[0][0], points[0][1]);
  for (const [x, y] of points.slice(1)) ctx.lineTo(x, y);
  ctx.stroke();
}

function redraw() {
  ctx.fillStyle = "white";
  ctx.fillRect(0, 0, pad.width, pad.height);
  if (state.background) {
    const { width, height } = state.background;
    const scale = Math.min(pad.width / width, pad.height / height);
    const w = width * scale, h = height * scale;
    ctx.drawImage(state.background, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
  }
  ctx.strokeStyle = ctx.fillStyle = "black";
  ctx.lineWidth = INK_WIDTH;
  ctx.lineCap = ctx.lineJoin = "round";
  for (const stroke of state.strokes) drawStroke(stroke);
  updateTools();
}

function hasInk() {
  return state.strokes.length > 0 || state.background !== null;
}

function updateTools() {
  $("undo").disabled = state.strokes.length === 0;
  $("clear").disabled = !hasInk();
  $("pad-hint").classList.toggle("hidden", hasInk() || state.drawing !== null);
}

function canvasPoint(event) {
  const rect = pad.getBoundingClientRect();
  return [((event.clientX - rect.left) * pad.width) / rect.width, ((event.clientY - rect.top) * pad.height) / rect.height];
}

pad.addEventListener("pointerdown", (event) => {
  if (state.drawing || (event.pointerType === "mouse" && event.button !== 0)) return;
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  state.pointerId = event.pointerId;
  state.drawing = [canvasPoint(event)];
  state.strokes.push(state.drawing);
  state.upload = null; // the canvas now differs from the uploaded file
  redraw();
  requestPrediction();
});

pad.addEventListener("pointermove", (event) => {
  if (!state.drawing || event.pointerId !== state.pointerId) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of events.length ? events : [event]) state.drawing.push(canvasPoint(e));
  redraw();
  requestPrediction();
});

function endStroke(event) {
  if (!state.drawing || event.pointerId !== state.pointerId) return;
  state.drawing = null;
  state.pointerId = null;
  requestPrediction({ now: true });
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

function undo() {
  if (state.drawing || state.strokes.length === 0) return;
  state.strokes.pop();
  redraw();
  requestPrediction({ now: true });
}

function clear() {
  if (state.drawing) return;
  state.strokes = [];
  state.background = null;
  state.upload = null;
  redraw();
  requestPrediction({ now: true });
}

$("undo").addEventListener("click", undo);
$("clear").addEventListener("click", clear);
document.addEventListener("keydown", (event) => {
  if ((event.ctrlKey || event.metaKey) && event.key === "z") {
    event.preventDefault();
    undo();
  } else if (event.key === "Escape") {
    clear();
  }
});

// ---- uploads -------------------------------------------------------------------------------

async function useFile(file) {
  if (!file) return;
  state.strokes = [];
  state.upload = file;
  try {
    state.background = await createImageBitmap(file);
  } catch {
    state.background = null; // not an image the browser can show: the server will say what is wrong
  }
  redraw();
  requestPrediction({ now: true });
}

$("upload").addEventListener("change", (event) => {
  useFile(event.target.files[0]);
  event.target.value = ""; // the same file can be chosen again
});

const drop = $("drop");
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("dragging");
});
drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("dragging");
  useFile(event.dataTransfer.files[0]);
});

// ---- predictions ---------------------------------------------------------------------------

function setState(name) {
  result.dataset.state = name;
}

// Asks for a prediction of what the canvas shows: at most one request in flight and one every
// THROTTLE_MS while drawing; the last change is always predicted.
function requestPrediction({ now = false } = {}) {
  queue.dirty = true;
  setState("pending");
  if (queue.inFlight) return;
  if (now && queue.timer) {
    clearTimeout(queue.timer);
    queue.timer = null;
  }
  if (queue.timer) return;
  const wait = now ? 0 : Math.max(0, queue.last + THROTTLE_MS - performance.now());
  queue.timer = setTimeout(send, wait);
}

function canvasBlob() {
  return new Promise((resolve) => pad.toBlob(resolve, "image/png"));
}

async function send() {
  queue.timer = null;
  if (!queue.dirty) return;
  queue.dirty = false;
  if (!hasInk()) {
    showEmpty();
    return;
  }
  queue.inFlight = true;
  queue.last = performance.now();
  let answer;
  try {
    let body, headers = {};
    if (state.upload) {
      body = new FormData();
      body.append("file", state.upload, state.upload.name || "upload");
    } else {
      body = await canvasBlob();
      headers = { "Content-Type": "image/png" };
    }
    const started = performance.now();
    const response = await fetch("/api/predict?top=3", { method: "POST", body, headers });
    const json = await response.json();
    answer = response.ok ? { ok: json.predictions[0], ms: performance.now() - started } : { error: json.error };
  } catch (error) {
    answer = { error: `the server did not answer (${error.message})` };
  } finally {
    queue.inFlight = false;
  }
  if (answer.ok) showPrediction(answer.ok, answer.ms);
  else showError(answer.error);
  if (queue.dirty) requestPrediction();
  else setState(answer.ok ? "done" : "error");
}

function buildBars() {
  const list = $("bars");
  list.replaceChildren(
    ...state.classes.map((name, i) => {
      const item = document.createElement("li");
      item.dataset.index = i;
      item.innerHTML = '<span class="name"></span><span class="track"><span class="fill"></span></span><span class="pct">–</span>';
      item.querySelector(".name").textContent = name;
      item.querySelector(".name").title = name;
      return item;
    }),
  );
}

function showPrediction(prediction, ms) {
  $("error").hidden = true;
  $("answer-label").textContent = prediction.label;
  $("answer-prob").textContent = `${(100 * prediction.probability).toFixed(1)}% sure`;
  result.dataset.label = prediction.label;
  result.dataset.prediction = prediction.prediction;
  result.dataset.probability = prediction.probability;
  $("latency").textContent = `${Math.round(ms)} ms`;
  for (const item of $("bars").children) {
    const i = Number(item.dataset.index);
    const p = prediction.probabilities[i];
    item.classList.toggle("best", i === prediction.prediction);
    item.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
    item.querySelector(".pct").textContent = `${(100 * p).toFixed(1)}%`;
  }
  showSeen(prediction.image);
}

function showSeen(image) {
  const pixels = seen.createImageData(28, 28);
  image.flat().forEach((v, i) => {
    const g = Math.round(255 * v);
    pixels.data.set([g, g, g, 255], 4 * i);
  });
  seen.putImageData(pixels, 0, 0);
}

function resetResult(message) {
  $("answer-label").textContent = "–";
  $("answer-prob").textContent = message;
  $("latency").textContent = "";
  delete result.dataset.label;
  delete result.dataset.prediction;
  delete result.dataset.probability;
  for (const item of $("bars").children) {
    item.classList.remove("best");
    item.querySelector(".fill").style.width = "0";
    item.querySelector(".pct").textContent = "–";
  }
  seen.clearRect(0, 0, 28, 28);
}

function showEmpty() {
  resetResult("draw something to start");
  $("error").hidden = true;
  setState("empty");
}

function showError(message) {
  resetResult("no prediction");
  $("error").textContent = message;
  $("error").hidden = false;
}

// ---- the model -----------------------------------------------------------------------------

async function loadModel() {
  const info = await (await fetch("/api/model")).json();
  state.classes = info.classes;
  buildBars();
  const parts = [`<b>${escape(info.model)}</b>`];
  if (info.parameters) parts.push(`${info.parameters.toLocaleString("en")} parameters`);
  if (info.dataset) parts.push(escape(info.dataset));
  if (info.test_accuracy != null) parts.push(`<b>${(100 * info.test_accuracy).toFixed(2)}%</b> test accuracy`);
  if (info.run) parts.push(`run ${escape(info.run)}${info.step != null ? ` (step ${info.step})` : ""}`);
  $("model-info").innerHTML = parts.join(" · ");
  document.body.dataset.ready = "true";
}

function escape(text) {
  const span = document.createElement("span");
  span.textContent = String(text);
  return span.innerHTML;
}

redraw();
loadModel().catch((error) => {
  $("model-info").textContent = `could not read /api/model: ${error.message}`;
});
