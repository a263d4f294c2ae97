"use strict";
// The sam_mlx app's page: plain JavaScript over the local server's JSON API and hover WebSocket
// (docs/app.md, "The app's HTTP API"). An object is a history of prompts; each prompt's decode uses the mask the
// user had selected for the previous prompt as its hint, so undo/redo step through masks already decoded.
// Every change is saved in the server's project as it is made (see "the project" below).

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "sam-mlx-token";
const PALETTE = ["#4dabf7", "#ff5c7a", "#51cf66", "#fcc419", "#b197fc", "#ff922b", "#3bc9db", "#a9e34b",
                 "#f783ac", "#748ffc"];
const AREAS = [0, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000];  // clean-up slider steps
const POLL_MS = 500;
const PROJECT_POLL_MS = 1500;  // how often the page looks for changes made by other tabs or programs
const MAX_MASK_SIDE = 4096;  // masks of larger images are shown shrunk (exported at full size by the server)
// What the candidates' and objects' scores are (their tooltip).
const IOU_NOTE = "SAM's predicted IoU: the model's own estimate of the mask's overlap with the object (may exceed 1)";

const token = readToken();
const canvas = $("view");
const ctx = canvas.getContext("2d");

const app = {
  info: null,
  images: [],            // the server's image records, index = id
  imageId: -1,
  picture: null,         // the current image (HTMLImageElement), null while loading
  sessions: new Map(),   // image id -> {objects, current}
  view: {scale: 1, x: 0, y: 0, fitted: true},
  pointer: null,         // last pointer position over the canvas, client pixels
  drag: null,            // {start, now, button, shift, box, pan}
  space: false,
  hover: {enabled: true, socket: null, seq: 0, shownSeq: 0, wanted: null, scheduled: false, layer: null},
  cleanup: {holes: 0, islands: 0, simplify: 0},
  stats: {clicks: [], hoverTimes: [], lastDecode: null},
  pollTimer: null,
  project: null,         // the server's project summary (GET /api/project): states, object counts, revisions
  writes: Promise.resolve(),  // the project writes, one after another in the order the changes were made
  pending: 0,            // writes queued or running
  refused: false,        // the server refused the page's token (a wrong or an earlier run's)
};

function readToken() {
  const match = location.hash.match(/token=([^&]+)/);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname);  // keep the token out of the address bar
  }
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

// The server's reply as JSON; null for 204 No Content (an expected absence, e.g. no saved prompts).
async function api(path, body, method) {
  const init = {headers: {"X-SAM-Token": token}, method};
  if (body !== undefined) {
    init.method = method || "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 204) return null;
  const data = await response.json().catch(() => ({error: response.statusText}));
  if (!response.ok) {
    const error = new Error(data.error || response.statusText);
    error.status = response.status;
    throw error;
  }
  return data;
}

// ------------------------------------------------------------------ masks
// A mask arrives as a 1-bit PNG whose background is transparent: drawn into a canvas and filled with a
// colour ("source-in"), it becomes a coloured overlay; nothing is done pixel by pixel in JavaScript.
// (An image from a data: address decodes ~8x faster here than createImageBitmap of a Blob.)
async function maskBitmap(encoded) {
  const image = new Image();
  image.src = `data:image/png;base64,${encoded.png}`;
  await image.decode();
  return image;
}

// Overlays are composited at the screen's resolution (a big photo's masks would not fit in memory at full size):
// each mask is drawn through the view transform into a scratch canvas, coloured ("source-in"), and its outline is
// that shape shifted four ways minus itself, about 1.5 screen pixels wide at any zoom. All of it happens only
// inside the mask's box on screen (the server sends each mask's box), so a small object costs little to draw.
const scratch = {tint: document.createElement("canvas"), edge: document.createElement("canvas"), cached: {}};
let layerCount = 0;  // names mask layers for the drawing caches

// A canvas of the view's size, cleared where it was last drawn on (or wholly, when resized).
function scratchContext(target) {
  const g = target.getContext("2d");
  g.setTransform(1, 0, 0, 1, 0, 0);
  g.globalCompositeOperation = "source-over";
  g.globalAlpha = 1;
  if (target.width !== canvas.width || target.height !== canvas.height) {
    target.width = canvas.width;
    target.height = canvas.height;
  } else if (target.dirty) {
    g.clearRect(...target.dirty);
  }
  target.dirty = null;
  return g;
}

// A device-pixel canvas kept under a key: painted again only when the key changes.
function cachedLayer(name, key, paint) {
  const entry = scratch.cached[name] || (scratch.cached[name] = {canvas: document.createElement("canvas"), key: null});
  if (entry.key !== key) {
    const g = scratchContext(entry.canvas);
    g.clearRect(0, 0, canvas.width, canvas.height);
    paint(g);
    entry.key = key;
  }
  return entry.canvas;
}

// The device-pixel rectangle [x, y, width, height] of a mask's box on screen, with room for its outline;
// null when the mask is empty or out of sight.
function screenRect(layer) {
  if (!layer.box) return null;
  const dpr = window.devicePixelRatio || 1;
  const {scale, x, y} = app.view;
  const pad = 4 * dpr;
  const x1 = Math.max(Math.floor(dpr * (x + layer.box[0] * scale) - pad), 0);
  const y1 = Math.max(Math.floor(dpr * (y + layer.box[1] * scale) - pad), 0);
  const x2 = Math.min(Math.ceil(dpr * (x + (layer.box[2] + 1) * scale) + pad), canvas.width);
  const y2 = Math.min(Math.ceil(dpr * (y + (layer.box[3] + 1) * scale) + pad), canvas.height);
  return x2 > x1 && y2 > y1 ? [x1, y1, x2 - x1, y2 - y1] : null;
}

function paintMask(layer, color, rect) {
  const g = scratchContext(scratch.tint);
  const dpr = window.devicePixelRatio || 1;
  const {scale, x, y} = app.view;
  scratch.tint.dirty = rect;
  g.save();
  g.beginPath();
  g.rect(...rect);
  g.clip();
  g.setTransform(dpr * scale, 0, 0, dpr * scale, dpr * x, dpr * y);
  g.imageSmoothingEnabled = scale < 1;
  g.drawImage(layer.bitmap, 0, 0, app.picture.naturalWidth, app.picture.naturalHeight);  // shrunk ones too
  g.setTransform(1, 0, 0, 1, 0, 0);
  g.globalCompositeOperation = "source-in";
  g.fillStyle = color;
  g.fillRect(...rect);
  g.restore();
}

function paintEdge(color, rect) {
  const g = scratchContext(scratch.edge);
  const width = Math.max(1, Math.round(1.5 * (window.devicePixelRatio || 1)));
  scratch.edge.dirty = rect;
  g.save();
  g.beginPath();
  g.rect(...rect);
  g.clip();
  for (const [dx, dy] of [[width, 0], [-width, 0], [0, width], [0, -width]]) g.drawImage(scratch.tint, dx, dy);
  g.globalCompositeOperation = "destination-out";
  g.drawImage(scratch.tint, 0, 0);
  g.globalCompositeOperation = "source-in";
  g.fillStyle = color;
  g.fillRect(...rect);
  g.restore();
}

// Draw a mask layer onto a device-pixel context: filled, then outlined.
function drawMask(target, layer, color, fill, edgeColor, edge) {
  const rect = screenRect(layer);
  if (!rect) return;
  paintMask(layer, color, rect);
  paintEdge(edgeColor, rect);
  target.globalAlpha = fill;
  target.drawImage(scratch.tint, ...rect, ...rect);
  target.globalAlpha = edge;
  target.drawImage(scratch.edge, ...rect, ...rect);
  target.globalAlpha = 1;
}

// ------------------------------------------------------------------ objects and their prompt histories
function emptyState() {
  return {points: [], box: null, result: null, selected: 0, layers: [], done: Promise.resolve()};
}

function newObject(objects) {
  const n = objects.length;
  return {id: null, label: `object ${n + 1}`, color: PALETTE[n % PALETTE.length], history: [emptyState()], cursor: 0};
}

// An image's objects; `revision`: the project's revision of the image as this page last saw it; `generation`
// changes when the objects are loaded again, so that writes queued for the old ones are dropped.
function session(imageId = app.imageId) {
  if (!app.sessions.has(imageId)) {
    const objects = [];
    objects.push(newObject(objects));
    app.sessions.set(imageId, {objects, current: 0, restored: false, loaded: false, revision: 0, generation: 0});
  }
  return app.sessions.get(imageId);
}

const currentObject = () => { const s = session(); return s.objects[s.current]; };
const stateOf = (object) => object.history[object.cursor];
const isEmpty = (state) => !state.points.length && !state.box;
// Background points alone are kept but not decoded: SAM's answer to them is mostly the object under them, the
// opposite of what they ask. The first foreground point or box decodes them all.
const decodable = (state) => !!state.box || state.points.some((p) => p[2] === 1);
// SAM answers a lone point or box with 3 candidates (it cannot know which one is meant), more prompts with 1.
const multimask = (state) => state.points.length + (state.box ? 1 : 0) === 1;

function pushState(object, points, box, startedAt) {
  const previous = stateOf(object);
  const state = {...emptyState(), points, box};
  object.history.splice(object.cursor + 1);
  object.history.push(state);
  object.cursor = object.history.length - 1;
  const imageId = app.imageId;
  if (decodable(state)) {
    state.done = previous.done.then(async () => {
      // A step loaded from the project has its mask but not the server's logits its hint needs: decode again.
      if (previous.result && previous.result.stored) await replay(imageId, object, object.history.indexOf(previous));
      return decodeState(imageId, object, state, previous, startedAt);
    });
  }
  saveStep(imageId, object, state);
  app.hover.layer = null;
  refresh();
  return state.done;
}

function decodeRequest(imageId, state, previous) {
  const hint = previous && previous.result ? {result: previous.result.result, candidate: previous.selected} : null;
  return {
    image: imageId,
    points: state.points.length ? state.points.map((p) => [p[0], p[1]]) : null,
    labels: state.points.length ? state.points.map((p) => p[2]) : null,
    box: state.box,
    multimask: multimask(state),
    mask_input: hint,
    max_side: MAX_MASK_SIDE,
  };
}

async function decodeState(imageId, object, state, previous, startedAt, selected) {
  const request = decodeRequest(imageId, state, previous);
  const sent = performance.now();
  let result;
  try {
    result = await api("/api/decode", request);
  } catch (error) {
    if (error.status === 409 && previous) {  // the hint's result was evicted: decode the history again
      await replay(imageId, object, object.history.indexOf(previous));
      return decodeState(imageId, object, state, previous, startedAt, selected);
    }
    state.error = error.message;
    toast(error.message, true);
    if (startedAt !== undefined) dropState(object, state);  // a failed click is not kept
    refresh();
    return;
  }
  state.result = result;
  state.request = request;
  state.selected = selected ?? result.scores.indexOf(Math.max(...result.scores));
  state.layers = result.masks.map((mask) => ({id: ++layerCount, encoded: mask, box: mask.box, bitmap: null}));
  const answered = performance.now();
  await loadLayer(state.layers[state.selected]);
  if (startedAt !== undefined && app.imageId === imageId) {
    const decoded = performance.now();
    render();  // drawn now, not at the next animation frame: the canvas shows it at the frame that follows
    const drawn = performance.now();
    app.stats.clicks.push({latency_ms: drawn - startedAt, server_ms: result.server_ms, decode_ms: result.decode_ms,
                           encode_ms: result.encode_ms, sent_ms: sent - startedAt, answer_ms: answered - startedAt,
                           png_ms: decoded - answered, draw_ms: drawn - decoded});
    showStats();
  }
  app.stats.lastDecode = {request, scores: result.scores, decode_ms: result.decode_ms, server_ms: result.server_ms};
  await Promise.all(state.layers.map(loadLayer));
  if (stateOf(object) === state && app.imageId === imageId) await preview(imageId);
  else await cleanState(imageId, state);
  refresh();
}

function dropState(object, state) {
  const index = object.history.indexOf(state);
  if (index < 1) return;
  object.history.splice(index, 1);
  if (object.cursor >= index) object.cursor--;
}

// Decode an object's history from its first prompt to index `upto` again (restored sessions, evicted hints).
async function replay(imageId, object, upto) {
  for (let i = 1; i <= upto; i++) {
    const state = object.history[i];
    if (!decodable(state)) continue;
    await decodeState(imageId, object, state, object.history[i - 1], undefined, state.selected);
  }
}

async function loadLayer(layer) {
  if (!layer.bitmap) layer.loading = layer.loading || maskBitmap(layer.encoded).then((b) => (layer.bitmap = b));
  return layer.loading;
}

// The layer to draw for a state: its selected candidate, cleaned up when clean-up is on and done.
function shownLayer(state) {
  if (!state.result) return null;
  const layer = state.layers[state.selected];
  if (!layer || !layer.bitmap) return null;
  const clean = layer.clean;
  return clean && clean.key === cleanupKey() && clean.bitmap ? clean : layer;
}

const cleanupKey = () => `${app.cleanup.holes},${app.cleanup.islands}`;

async function cleanState(imageId, state) {
  const layer = state.layers[state.selected];
  const key = cleanupKey();
  if (!layer || key === "0,0" || (layer.clean && layer.clean.key === key)) return;
  const result = await api("/api/cleanup", {image: imageId, mask: layer.encoded, fill_holes: app.cleanup.holes,
                                            remove_islands: app.cleanup.islands});
  const clean = {id: ++layerCount, key, encoded: result.mask, box: result.mask.box, bitmap: null};
  clean.bitmap = await maskBitmap(result.mask);
  if (cleanupKey() === key) layer.clean = clean;
}

// The shown mask's outline at the export's simplification (its boundary rings, not the export's polygons, which cut
// a part with a hole open), drawn over the current object.
async function tracePolygons(imageId, state) {
  const layer = shownLayer(state);
  if (!layer || !app.info.export_formats.length) return;
  const key = `${layer.id}:${app.cleanup.simplify}`;
  if (layer.polygons && layer.polygons.key === key) return;
  const result = await api("/api/polygons", {image: imageId, mask: layer.encoded, simplify: app.cleanup.simplify});
  layer.polygons = {key, points: result.rings};
}

// The current object's shown mask cleaned up and traced as the export would, then drawn.
async function preview(imageId = app.imageId) {
  const state = stateOf(currentObject());
  try {
    await cleanState(imageId, state);
    await tracePolygons(imageId, state);
  } catch (error) {
    toast(error.message, true);
  }
  refresh();
}

const polygonsOf = (layer) => layer && layer.polygons && layer.polygons.key === `${layer.id}:${app.cleanup.simplify}` ?
  layer.polygons.points : null;

// ------------------------------------------------------------------ actions
function addPoint(x, y, label, startedAt) {
  const object = currentObject();
  const state = stateOf(object);
  pushState(object, [...state.points, [x, y, label]], state.box, startedAt);
  if (!decodable(stateOf(object))) toast("Background point kept: add a foreground point first (click on the object).");
}

function setBox(box, startedAt) {
  const object = currentObject();
  pushState(object, stateOf(object).points, box, startedAt);
}

function clearObject() {
  const object = currentObject();
  if (!isEmpty(stateOf(object))) pushState(object, [], null);
}

function undo() {
  const object = currentObject();
  if (object.cursor === 0) return;
  object.cursor--;
  saveCursor(app.imageId, object);
  preview();
}

function redo() {
  const object = currentObject();
  if (object.cursor >= object.history.length - 1) return;
  object.cursor++;
  saveCursor(app.imageId, object);
  preview();
}

function selectCandidate(index) {
  const object = currentObject();
  const state = stateOf(object);
  if (!state.result || index >= 3 || index === state.selected) return;
  if (state.result.stored) {  // loaded from the project with its chosen mask only: decode the others
    if (!multimask(state)) return;  // there are no others
    const imageId = app.imageId;
    replay(imageId, object, object.cursor).then(() => { if (app.imageId === imageId) selectCandidate(index); });
    return;
  }
  if (index >= state.layers.length) return;
  state.selected = index;
  saveChoice(app.imageId, object, state);
  loadLayer(state.layers[index]).then(() => preview());
  refresh();
}

function finishObject() {
  const s = session();
  if (!stateOf(currentObject()).result) return;
  let next = s.objects.findIndex((o) => !stateOf(o).result);
  if (next < 0) {
    s.objects.push(newObject(s.objects));
    next = s.objects.length - 1;
  }
  s.current = next;
  refresh();
}

function selectObject(index) {
  session().current = index;
  preview();
}

function deleteObject(index) {
  const s = session();
  saveDelete(app.imageId, s.objects[index]);
  s.objects.splice(index, 1);
  if (!s.objects.length) s.objects.push(newObject(s.objects));
  s.current = Math.min(s.current >= index ? Math.max(s.current - 1, 0) : s.current, s.objects.length - 1);
  refresh();
}

// ------------------------------------------------------------------ the project
// The server keeps every image's objects in its project file as they are made. Each change is sent as it happens,
// one request after another in the order made (a step once its mask is decoded); until its request is answered
// the object is marked "saving…". Each write carries the image's revision as this page last saw it: a write made
// after another tab's (or program's) change is refused (409), and the image's objects are loaded again.
function persist(imageId, work) {
  const s = session(imageId);
  const generation = s.generation;
  app.pending++;
  showSaving();
  app.writes = app.writes.then(async () => {
    try {
      if (s.generation !== generation) return;  // the objects were loaded again meanwhile: this change is void
      const reply = await work(s);
      if (reply && reply.revision !== undefined && s.generation === generation) s.revision = reply.revision;
    } catch (error) {
      if (error.status === 409 || error.status === 404) {  // a stale revision, an object deleted elsewhere
        toast("This image was changed in another tab or program: its objects were loaded again.", true);
        await reloadSession(imageId);
      } else {
        toast(`Not saved: ${error.message}`, true);
      }
    } finally {
      app.pending--;
      showSaving();
      scheduleProjectPoll(200);
    }
  });
  return app.writes;
}

const saved = () => app.writes;  // resolves once every change made so far is saved (or refused)

function stepBody(state) {
  const layer = state.result && state.layers[state.selected];
  return {points: state.points, box: state.box, multimask: multimask(state), selected: state.selected,
          score: state.result ? state.result.scores[state.selected] : null,
          mask: !decodable(state) || !layer ? null : {png: layer.encoded.png}};
}

async function createObject(imageId, object, step, s) {
  const reply = await api(`/api/images/${imageId}/objects`, {label: object.label, color: object.color, step,
                                                             revision: s.revision});
  object.id = reply.object;
  return reply;
}

function saveStep(imageId, object, state) {
  if (!app.project) return;
  persist(imageId, async (s) => {
    await state.done;
    if (!object.history.includes(state) || (decodable(state) && !state.result)) return;  // its decode failed
    if (object.id == null) return isEmpty(state) ? null : createObject(imageId, object, stepBody(state), s);
    return api(`/api/objects/${object.id}/steps`, {step: stepBody(state), revision: s.revision});
  });
}

function saveCursor(imageId, object) {
  const cursor = object.cursor;  // as of now: later changes are queued after this one
  if (app.project) {
    persist(imageId, (s) => object.id == null ? null :
      api(`/api/objects/${object.id}/cursor`, {cursor, revision: s.revision}));
  }
}

function saveChoice(imageId, object, state) {
  const selected = state.selected;
  if (app.project) {
    persist(imageId, (s) => object.id == null ? null : api(`/api/objects/${object.id}/choose`, {
      selected, score: state.result.scores[selected], mask: {png: state.layers[selected].encoded.png},
      revision: s.revision}));
  }
}

function saveLook(imageId, object) {
  const look = {label: object.label, color: object.color};
  if (app.project) {
    persist(imageId, (s) => object.id == null ? null :
      api(`/api/objects/${object.id}`, {...look, revision: s.revision}));
  }
}

function saveDelete(imageId, object) {
  if (app.project) {
    persist(imageId, (s) => object.id == null ? null :
      api(`/api/objects/${object.id}?revision=${s.revision}`, undefined, "DELETE"));
  }
}

// An object decoded from an export's prompts: its steps saved one by one, then its cursor.
function saveImported(imageId, object) {
  if (!app.project) return;
  object.history.slice(1).forEach((state, i) => persist(imageId, async (s) => {
    if (object.id == null) return createObject(imageId, object, stepBody(state), s);
    return api(`/api/objects/${object.id}/steps`, {step: stepBody(state), revision: s.revision});
  }));
  saveCursor(imageId, object);
}

function saveState(imageId, state) {
  return persist(imageId, (s) => api(`/api/images/${imageId}/state`, {state, revision: s.revision}));
}

// A step as the project keeps it: its points, box and chosen candidate's mask, drawn without decoding again.
function storedState(step) {
  const state = {...emptyState(), points: step.points, box: step.box, selected: step.selected};
  if (step.mask) {
    state.result = {stored: true, scores: []};
    state.result.scores[step.selected] = step.score ?? 0;
    state.layers = [];
    state.layers[step.selected] = {id: ++layerCount, encoded: step.mask, box: step.mask.box, bitmap: null};
  }
  return state;
}

// The image's objects as the project has them, with a new object to draw next.
async function loadSession(imageId) {
  const data = await api(`/api/images/${imageId}/objects?max_side=${MAX_MASK_SIDE}`);
  const objects = data.objects.map((o) => ({id: o.id, label: o.label, color: o.color, cursor: o.cursor,
                                            history: [emptyState(), ...o.steps.map(storedState)]}));
  await Promise.all(objects.flatMap((o) => o.history.flatMap((state) => state.layers.filter(Boolean).map(loadLayer))));
  objects.push(newObject(objects));
  const s = session(imageId);
  const editing = s.objects[s.current] && s.objects[s.current].id;  // loaded again: still the one being edited
  const current = objects.findIndex((o) => o.id != null && o.id === editing);
  Object.assign(s, {objects, current: current < 0 ? objects.length - 1 : current, loaded: true,
                    revision: data.revision, generation: s.generation + 1});
  if (app.project && app.project.images[imageId]) Object.assign(app.project.images[imageId], {state: data.state});
}

async function reloadSession(imageId) {
  try {
    await loadSession(imageId);
  } catch (error) {
    toast(error.message, true);
  }
  if (imageId === app.imageId) {
    app.hover.layer = null;
    refresh();
  }
}

let projectTimer = null;
function scheduleProjectPoll(delay = PROJECT_POLL_MS) {
  clearTimeout(projectTimer);
  projectTimer = setTimeout(pollProject, delay);
}

// The project's progress and states; the objects of an image another tab changed are loaded again.
async function pollProject() {
  try {
    app.project = await api("/api/project");
  } catch (error) {
    if (error.status === 404) return;  // a server without a project: nothing is kept
    toast(error.message, true);
  }
  if (app.project && app.pending === 0) {
    for (const [imageId, s] of app.sessions) {
      const record = app.project.images[imageId];
      if (!s.loaded || !record || record.revision <= s.revision) continue;  // (an answer sent before a save)
      if (imageId === app.imageId) await reloadSession(imageId);
      else app.sessions.delete(imageId);  // loaded again when opened
    }
  }
  refresh();
  scheduleProjectPoll();
}

// Mark the image done (or skipped) and open the next image that is neither.
async function finishImage(state = "done") {
  const id = app.imageId;
  if (!app.project || id < 0) return;
  await saveState(id, state);
  await pollProject();
  const images = app.project.images;
  const open = (i) => !["done", "skipped"].includes(images[i].state);
  const next = [...images.keys()].filter((i) => i > id).concat([...images.keys()].filter((i) => i < id)).find(open);
  if (next === undefined) toast(`every image is done or skipped (${app.project.done} of ${app.project.total})`);
  else openImage(next);
}

function showSaving() {
  $("saving").textContent = app.pending ? "saving…" : app.project ? "saved" : "not kept: no project";
  $("saving").className = app.pending ? "saving busy" : "saving";
}

function showProgress() {
  const project = app.project;
  $("progress").textContent = project ? `${project.done} / ${project.total} done` : "";
  $("progress").title = project ? `work kept in ${project.path}` : "";
  $("mark-done").disabled = $("skip-image").disabled = !project || app.imageId < 0;
}

// ------------------------------------------------------------------ images
async function openImage(id) {
  if (id < 0 || id >= app.images.length) return;
  app.imageId = id;
  app.picture = null;
  app.hover.layer = null;
  app.view.fitted = true;
  refresh();
  app.images[id] = await api(`/api/images/${id}/encode`, {prefetch: app.info.prefetch});
  poll();
  const loading = session(id).loaded || !app.project ? null : loadSession(id);
  const picture = new Image();
  picture.src = `/api/images/${id}/file?token=${encodeURIComponent(token)}`;
  try {
    await Promise.all([picture.decode(), loading]);
  } catch (error) {
    toast(error.message || `cannot show ${app.images[id].name}`, true);
    return;
  }
  if (app.imageId !== id) return;
  app.picture = picture;
  fit();
  refresh();
  restoreSession(id);
}

// An image opened for the first time, without objects in the project, picks up the prompts an earlier export
// saved for it, decoded again, and saves them in the project.
async function restoreSession(id) {
  const s = session(id);
  if (s.restored || s.objects.some((o) => o.history.length > 1)) return;
  s.restored = true;
  let saved;
  try {
    saved = await api(`/api/images/${id}/prompts?folder=${encodeURIComponent($("export-folder").value)}`);
  } catch (error) {
    toast(error.message, true);
    return;
  }
  if (!saved) return;  // nothing saved
  await waitUntilReady(id);
  s.objects = saved.objects.map((o) => ({label: o.label, color: o.color, cursor: o.steps.length,
    history: [emptyState(), ...o.steps.map((step) => ({...emptyState(), points: step.points, box: step.box,
                                                       selected: step.selected}))]}));
  s.objects.push(newObject(s.objects));
  s.current = s.objects.length - 1;
  for (const object of s.objects.slice(0, -1)) {
    await replay(id, object, object.cursor);
    saveImported(id, object);
  }
  toast(`restored ${saved.objects.length} object(s) from ${app.images[id].stem}.prompts.json`);
  refresh();
}

async function waitUntilReady(id) {
  while (app.images[id].status !== "ready") {
    if (app.images[id].status === "error") throw new Error(app.images[id].error);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

async function poll() {
  clearTimeout(app.pollTimer);
  try {
    const data = await api("/api/images");
    app.images = data.images;
  } catch (error) {
    toast(error.message, true);
  }
  showImages();
  const busy = app.images.some((i) => i.status === "encoding") ||
               (app.images[app.imageId] && app.images[app.imageId].status !== "ready");
  if (busy) app.pollTimer = setTimeout(poll, POLL_MS);
  refresh();
}

const imageReady = () => app.picture && app.images[app.imageId] && app.images[app.imageId].status === "ready";

// ------------------------------------------------------------------ hover
function connectHover() {
  const socket = new WebSocket(`ws://${location.host}/api/hover?token=${encodeURIComponent(token)}`);
  socket.onmessage = (event) => showHover(JSON.parse(event.data));
  socket.onclose = () => {
    app.hover.socket = null;
    setTimeout(connectHover, 1000);
  };
  socket.onopen = () => (app.hover.socket = socket);
}

function wantHover(point) {
  const hover = app.hover;
  hover.wanted = point;
  if (!hover.scheduled) {
    hover.scheduled = true;
    requestAnimationFrame(sendHover);  // at most one position per frame; the server keeps only the latest
  }
}

function sendHover() {
  const hover = app.hover;
  hover.scheduled = false;
  if (!hover.wanted || !hover.socket || !hoverWanted()) return;
  hover.seq++;
  hover.sent = hover.wanted;
  hover.socket.send(JSON.stringify({seq: hover.seq, image: app.imageId, x: hover.wanted[0], y: hover.wanted[1],
                                    max_side: MAX_MASK_SIDE}));
  hover.wanted = null;
}

const hoverWanted = () => app.hover.enabled && imageReady() && !app.drag && isEmpty(stateOf(currentObject()));

async function showHover(message) {
  const hover = app.hover;
  if (!message.ready || message.error || message.seq <= hover.shownSeq || message.image !== app.imageId) return;
  const bitmap = await maskBitmap(message.mask);
  if (message.seq <= hover.shownSeq || !hoverWanted() || !app.pointer) return;  // a newer one was drawn
  hover.shownSeq = message.seq;
  hover.layer = {bitmap, box: message.mask.box, score: message.score};
  app.stats.hoverTimes.push(performance.now());
  render();
}

// ------------------------------------------------------------------ view: image <-> screen
function fit() {
  if (!app.picture) return;
  const rect = canvas.getBoundingClientRect();
  const margin = 24;
  const scale = Math.min((rect.width - 2 * margin) / app.picture.naturalWidth,
                         (rect.height - 2 * margin) / app.picture.naturalHeight);
  app.view = {scale, x: (rect.width - scale * app.picture.naturalWidth) / 2,
              y: (rect.height - scale * app.picture.naturalHeight) / 2, fitted: true};
}

function toImage(clientX, clientY) {
  const rect = canvas.getBoundingClientRect();
  return [(clientX - rect.left - app.view.x) / app.view.scale, (clientY - rect.top - app.view.y) / app.view.scale];
}

function toClient(x, y) {
  const rect = canvas.getBoundingClientRect();
  return [rect.left + app.view.x + x * app.view.scale, rect.top + app.view.y + y * app.view.scale];
}

const inside = ([x, y]) => app.picture && x >= 0 && y >= 0 && x <= app.picture.naturalWidth &&
                           y <= app.picture.naturalHeight;
const round1 = (v) => Math.round(v * 10) / 10;
const clampToImage = ([x, y]) => [Math.min(Math.max(x, 0), app.picture.naturalWidth),
                                  Math.min(Math.max(y, 0), app.picture.naturalHeight)];

// ------------------------------------------------------------------ drawing
let renderQueued = false;
function refresh() {
  if (!renderQueued) {
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      render();
      showPanels();
    });
  }
}

function render() {
  const dpr = window.devicePixelRatio || 1;
  const rect = canvas.getBoundingClientRect();
  if (canvas.width !== Math.round(rect.width * dpr) || canvas.height !== Math.round(rect.height * dpr)) {
    canvas.width = Math.round(rect.width * dpr);
    canvas.height = Math.round(rect.height * dpr);
    if (app.view.fitted) fit();
  }
  ctx.setTransform(1, 0, 0, 1, 0, 0);  // layers are composited in device pixels
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  showNotice();
  if (!app.picture) return;
  const s = session();
  const view = JSON.stringify([app.view, canvas.width, canvas.height, app.imageId]);
  // The picture and the other objects change rarely: one cached layer. The current object's mask: another.
  const others = s.objects.filter((o, i) => i !== s.current && shownLayer(stateOf(o)));
  const othersKey = others.map((o) => [shownLayer(stateOf(o)).id, o.color]);
  ctx.drawImage(cachedLayer("base", JSON.stringify([view, othersKey]), (g) => {
    drawPicture(g, dpr);
    for (const object of others) drawMask(g, shownLayer(stateOf(object)), object.color, 0.4, object.color, 0.9);
  }), 0, 0);
  const layer = shownLayer(stateOf(currentObject()));
  const color = currentObject().color;
  const polygons = polygonsOf(layer);
  if (layer) {
    ctx.drawImage(cachedLayer("current", JSON.stringify([view, layer.id, color, !polygons]),
                              (g) => drawMask(g, layer, color, 0.5, "#ffffff", polygons ? 0 : 1)), 0, 0);
  }
  if (app.hover.layer && hoverWanted()) drawMask(ctx, app.hover.layer, color, 0.42, color, 0.95);
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  if (polygons) drawPolygons(polygons);
  drawPrompts(stateOf(currentObject()));
}

function drawPolygons(polygons) {
  ctx.beginPath();
  for (const polygon of polygons) {
    polygon.forEach(([x, y], i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, ...toCanvas(x, y)));
    ctx.closePath();
  }
  ctx.lineJoin = "round";
  ctx.lineWidth = 3;
  ctx.strokeStyle = "rgba(0, 0, 0, 0.35)";
  ctx.stroke();
  ctx.lineWidth = 1.5;
  ctx.strokeStyle = "#ffffff";
  ctx.stroke();
  if (app.view.scale < 3) return;
  ctx.fillStyle = "#ffffff";  // the vertices, when zoomed in enough to tell them apart
  for (const polygon of polygons) {
    for (const [x, y] of polygon) {
      const [cx, cy] = toCanvas(x, y);
      ctx.fillRect(cx - 2, cy - 2, 4, 4);
    }
  }
}

function drawPicture(g, dpr) {
  const {scale, x, y} = app.view;
  g.setTransform(dpr * scale, 0, 0, dpr * scale, dpr * x, dpr * y);
  g.imageSmoothingEnabled = scale < 2;
  g.shadowColor = "rgba(0, 0, 0, 0.5)";
  g.shadowBlur = 24 * dpr;
  g.fillStyle = "#fff";  // transparent pictures are segmented over white
  g.fillRect(0, 0, app.picture.naturalWidth, app.picture.naturalHeight);
  g.shadowColor = "transparent";
  g.drawImage(app.picture, 0, 0);
  g.setTransform(1, 0, 0, 1, 0, 0);
}

function drawPrompts(state) {
  const box = app.drag && app.drag.box ? boxOf(app.drag) : state.box;
  if (box) {
    const [x1, y1] = toCanvas(box[0], box[1]);
    const [x2, y2] = toCanvas(box[2], box[3]);
    ctx.lineWidth = 2;
    ctx.setLineDash([6, 4]);
    ctx.strokeStyle = "rgba(0, 0, 0, 0.6)";
    ctx.strokeRect(x1 + 1, y1 + 1, x2 - x1, y2 - y1);
    ctx.strokeStyle = "#fff";
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    ctx.setLineDash([]);
  }
  for (const [px, py, label] of state.points) {
    const [cx, cy] = toCanvas(px, py);
    ctx.beginPath();
    ctx.arc(cx, cy, 7, 0, 2 * Math.PI);
    ctx.fillStyle = label ? "#2fb344" : "#e03131";
    ctx.fill();
    ctx.lineWidth = 2;
    ctx.strokeStyle = "#fff";
    ctx.stroke();
    ctx.beginPath();  // + or -
    ctx.moveTo(cx - 3.5, cy);
    ctx.lineTo(cx + 3.5, cy);
    if (label) {
      ctx.moveTo(cx, cy - 3.5);
      ctx.lineTo(cx, cy + 3.5);
    }
    ctx.lineWidth = 1.8;
    ctx.stroke();
  }
}

const toCanvas = (x, y) => [app.view.x + x * app.view.scale, app.view.y + y * app.view.scale];

function boxOf(drag) {
  const [ax, ay] = clampToImage(drag.start);
  const [bx, by] = clampToImage(drag.now);
  return [Math.min(ax, bx), Math.min(ay, by), Math.max(ax, bx), Math.max(ay, by)].map(round1);
}

// ------------------------------------------------------------------ panels
function showNotice() {
  const notice = $("notice");
  const record = app.images[app.imageId];
  let text = "";
  const address = "open the address sam-mlx app printed (it ends in #token=…)";
  if (!token) text = `This page needs its access token: ${address}`;
  else if (app.refused) text = `The access token is not this run's: ${address}`;
  else if (!app.info) text = "Connecting…";
  else if (!app.images.length) text = "No images: start sam-mlx app with images or folders.";
  else if (record && record.status === "error") text = `Cannot open ${record.name}: ${record.error}`;
  else if (record && record.status !== "ready") text = `Encoding ${record.name}…`;
  else if (!app.picture) text = "Loading…";
  notice.hidden = !text;
  notice.textContent = text;
}

function showPanels() {
  const record = app.images[app.imageId];
  $("image-name").textContent = record ? record.name : "—";
  $("image-index").textContent = record ? `${app.imageId + 1} / ${app.images.length}` : "";
  $("prev").disabled = app.imageId <= 0;
  $("next").disabled = app.imageId >= app.images.length - 1;
  showEncoding();
  showCandidates();
  showObjects();
  showImages();
  showProgress();
  showStats();
}

function showEncoding() {
  const encoding = app.images.find((i) => i.status === "encoding");
  const done = app.images.filter((i) => i.status === "ready").length;
  $("encoding").hidden = !encoding;
  $("images-summary").textContent = app.images.length ? `${done} of ${app.images.length} encoded` : "";
  if (!encoding) return;
  const expected = encoding.expected_seconds;
  const fraction = expected ? Math.min(encoding.elapsed_seconds / expected, 0.97) : null;
  $("encoding-bar").style.width = fraction === null ? "100%" : `${(fraction * 100).toFixed(0)}%`;
  $("encoding-bar").classList.toggle("indeterminate", fraction === null);
  const time = `${encoding.elapsed_seconds.toFixed(1)} s${expected ? ` of ~${expected.toFixed(1)} s` : ""}`;
  $("encoding-text").textContent = `encoding ${encoding.name} · ${time} · ${done}/${app.images.length}`;
}

function showCandidates() {
  const box = $("candidates");
  const state = stateOf(currentObject());
  box.replaceChildren();
  if (!state.result) {
    const p = document.createElement("p");
    p.className = "empty";
    p.textContent = isEmpty(state) ? "Hover to preview, click to segment." :
                    !decodable(state) ? "Background point kept: add a foreground point first (click on the object)." :
                    state.error || "Decoding…";
    box.append(p);
    return;
  }
  state.layers.forEach((layer, i) => {
    const card = document.createElement("button");
    card.className = "candidate" + (i === state.selected ? " selected" : "");
    card.title = `candidate ${i + 1} (key ${i + 1}): ${IOU_NOTE}`;
    const thumb = document.createElement("canvas");
    drawThumbnail(thumb, layer, currentObject().color);
    const score = state.result.scores[i];
    const label = document.createElement("span");
    label.innerHTML = `<kbd>${i + 1}</kbd> <span class="iou">IoU</span> <b>${score.toFixed(3)}</b>`;
    const bar = document.createElement("i");
    bar.style.width = `${Math.max(0, Math.min(score, 1)) * 100}%`;
    card.append(thumb, label, bar);
    card.addEventListener("click", () => selectCandidate(i));
    box.append(card);
  });
}

function drawThumbnail(thumb, layer, color) {
  if (!app.picture) return;
  const w = 120;
  const h = Math.max(1, Math.round((w * app.picture.naturalHeight) / app.picture.naturalWidth));
  thumb.width = w;
  thumb.height = h;
  const c = thumb.getContext("2d");
  c.drawImage(app.picture, 0, 0, w, h);
  c.fillStyle = "rgba(10, 12, 16, 0.45)";
  c.fillRect(0, 0, w, h);
  if (!layer.bitmap) return;
  if (!layer.thumb || layer.thumb.color !== color) {
    const mask = document.createElement("canvas");
    mask.width = w;
    mask.height = h;
    const g = mask.getContext("2d");
    g.drawImage(layer.bitmap, 0, 0, w, h);
    g.globalCompositeOperation = "source-in";
    g.fillStyle = color;
    g.fillRect(0, 0, w, h);
    layer.thumb = {color, canvas: mask};
  }
  c.drawImage(layer.thumb.canvas, 0, 0);
}

function showObjects() {
  const s = session();
  const object = currentObject();
  const label = $("object-label");
  if (document.activeElement !== label) label.value = object.label;
  $("object-color").value = object.color;
  $("undo").disabled = object.cursor === 0;
  $("redo").disabled = object.cursor >= object.history.length - 1;
  $("clear").disabled = isEmpty(stateOf(object));
  $("finish").disabled = !stateOf(object).result;
  const list = $("objects");
  list.replaceChildren();
  s.objects.forEach((o, i) => {
    const state = stateOf(o);
    if (!state.result && i !== s.current) return;
    const item = document.createElement("li");
    item.className = i === s.current ? "current" : "";
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = o.color;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = o.label;
    const detail = document.createElement("span");
    detail.className = "muted";
    detail.textContent = state.result ? `IoU ${state.result.scores[state.selected].toFixed(2)}` :
                         i === s.current ? "editing" : "";
    if (state.result) detail.title = IOU_NOTE;
    const remove = document.createElement("button");
    remove.className = "icon small";
    remove.textContent = "×";
    remove.title = "delete object";
    remove.addEventListener("click", (event) => { event.stopPropagation(); deleteObject(i); });
    item.append(swatch, name, detail, remove);
    item.addEventListener("click", () => selectObject(i));
    list.append(item);
  });
  const current = list.querySelector(".current");
  if (current) current.scrollIntoView({block: "nearest"});
}

function showImages() {
  const list = $("images");
  if (list.children.length !== app.images.length) {
    list.replaceChildren(...app.images.map((record) => {
      const item = document.createElement("li");
      item.innerHTML = `<span class="dot"></span><span class="name"></span><span class="count muted"></span>`;
      item.querySelector(".name").textContent = record.name;
      item.addEventListener("click", () => openImage(record.id));
      return item;
    }));
  }
  app.images.forEach((record, i) => {
    const item = list.children[i];
    item.className = `${record.status}${i === app.imageId ? " current" : ""}`;
    item.title = record.error || `${record.path} (${record.status})`;
    const s = app.sessions.get(i);
    const kept = app.project && app.project.images[i];
    const count = s && s.loaded ? s.objects.filter((o) => o.id != null).length :
                  kept ? kept.objects : s ? s.objects.filter((o) => stateOf(o).result).length : 0;
    const state = kept ? kept.state : "new";
    item.dataset.state = state;
    item.querySelector(".count").textContent = `${count ? `${count} obj` : ""}${count && state !== "new" ? " · " : ""}` +
                                               (state === "new" ? "" : STATE_NAMES[state]);
  });
}

const STATE_NAMES = {new: "new", in_progress: "in progress", done: "done ✓", skipped: "skipped"};

function showStats() {
  const clicks = app.stats.clicks;
  const last = clicks[clicks.length - 1];
  const now = performance.now();
  const recent = app.stats.hoverTimes.filter((t) => now - t < 2000).length / 2;
  const parts = [];
  if (last) parts.push(`click → mask ${last.latency_ms.toFixed(0)} ms (decode ${last.decode_ms.toFixed(0)} ms)`);
  if (recent) parts.push(`hover ${recent.toFixed(0)} masks/s`);
  parts.push(`hover ${app.hover.enabled ? "on" : "off"}`);
  $("stats").textContent = parts.join(" · ");
}

let toastTimer = null;
function toast(text, isError = false) {
  const element = $("toast");
  element.textContent = text;
  element.className = "toast" + (isError ? " error" : "");
  element.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (element.hidden = true), isError ? 6000 : 3500);
}

// ------------------------------------------------------------------ clean-up and export
function setupCleanup() {
  const show = () => {
    $("holes-value").textContent = app.cleanup.holes ? `${app.cleanup.holes} px` : "off";
    $("islands-value").textContent = app.cleanup.islands ? `${app.cleanup.islands} px` : "off";
    $("simplify-value").textContent = app.cleanup.simplify ? `${app.cleanup.simplify.toFixed(1)} px` : "off";
  };
  let timer = null;
  const changed = (save = true) => {
    app.cleanup.holes = AREAS[+$("holes").value];
    app.cleanup.islands = AREAS[+$("islands").value];
    app.cleanup.simplify = +$("simplify").value / 10;
    show();
    clearTimeout(timer);
    timer = setTimeout(async () => {
      if (save && app.project) {  // the export (the app's and the command's) applies the project's clean-up
        api("/api/project/cleanup", {fill_holes: app.cleanup.holes, remove_islands: app.cleanup.islands,
                                     simplify: app.cleanup.simplify}).catch((error) => toast(error.message, true));
      }
      for (const object of session().objects) await cleanState(app.imageId, stateOf(object));
      preview();
    }, 120);
  };
  for (const id of ["holes", "islands", "simplify"]) $(id).addEventListener("input", () => changed());
  const kept = app.project ? app.project.cleanup : {};
  const nearest = (value) => AREAS.reduce((best, area, i) => Math.abs(area - value) < Math.abs(AREAS[best] - value) ?
    i : best, 0);
  $("holes").value = nearest(kept.fill_holes || 0);
  $("islands").value = nearest(kept.remove_islands || 0);
  $("simplify").value = Math.round((kept.simplify ?? app.info.default_simplify ?? 0.5) * 10);
  changed(false);
}

function setupExport() {
  $("export-root").textContent = `into ${app.info.export_root}/`;
  const formats = $("formats");
  if (!app.info.export_formats.length) {
    formats.textContent = "export formats unavailable in this sam_mlx";
    $("export").disabled = true;
    return;
  }
  const chosen = JSON.parse(localStorage.getItem("sam-mlx-formats") || '["png", "coco"]');
  for (const name of app.info.export_formats) {
    const label = document.createElement("label");
    label.className = "chip";
    label.innerHTML = `<input type="checkbox" value="${name}"><span>${name}</span>`;
    label.querySelector("input").checked = chosen.includes(name);
    formats.append(label);
  }
}

// The export reads the project (every image's saved objects, its clean-up): once every change is saved.
async function exportAll() {
  const formats = [...document.querySelectorAll("#formats input:checked")].map((i) => i.value);
  localStorage.setItem("sam-mlx-formats", JSON.stringify(formats));
  if (!formats.length) return toast("choose at least one format", true);
  if (!app.project) return toast("this server keeps no project: nothing to export", true);
  $("export").disabled = true;
  try {
    await saved();
    const result = await api("/api/project/export", {folder: $("export-folder").value, formats});
    app.stats.lastExport = result;
    $("export-result").textContent = `${result.files.length} files → ${result.folder}`;
    toast(result.files.length ? `exported: ${result.files.length} files` :
          "nothing to export yet: segment an object first", !result.files.length);
  } catch (error) {
    toast(error.message, true);
  } finally {
    $("export").disabled = false;
  }
}

// ------------------------------------------------------------------ input
function setupInput() {
  canvas.addEventListener("contextmenu", (event) => event.preventDefault());
  canvas.addEventListener("pointerdown", (event) => {
    if (!app.picture) return;
    canvas.setPointerCapture(event.pointerId);
    const point = toImage(event.clientX, event.clientY);
    const pan = event.button === 1 || app.space;
    app.drag = {start: point, now: point, client: [event.clientX, event.clientY], button: event.button,
                shift: event.shiftKey, box: false, pan, view: {...app.view}};
    app.hover.layer = null;
    if (pan) canvas.classList.add("panning");
    render();
  });
  canvas.addEventListener("pointermove", (event) => {
    app.pointer = [event.clientX, event.clientY];
    const drag = app.drag;
    const point = toImage(event.clientX, event.clientY);
    if (drag) {
      drag.now = point;
      const moved = Math.hypot(event.clientX - drag.client[0], event.clientY - drag.client[1]);
      if (drag.pan) {
        app.view = {...drag.view, x: drag.view.x + event.clientX - drag.client[0],
                    y: drag.view.y + event.clientY - drag.client[1], fitted: false};
      } else if (drag.button === 0 && !drag.shift && moved > 5) {
        drag.box = true;
      }
      render();
      return;
    }
    if (hoverWanted() && inside(point)) wantHover(point.map(round1));
    else if (app.hover.layer) {
      app.hover.layer = null;
      render();
    }
  });
  canvas.addEventListener("pointerleave", () => {
    app.pointer = null;
    app.hover.layer = null;
    render();
  });
  canvas.addEventListener("pointerup", (event) => {
    const drag = app.drag;
    app.drag = null;
    canvas.classList.remove("panning");
    if (!drag || drag.pan || !imageReady()) return render();
    if (drag.box) {
      const box = boxOf(drag);
      if (box[2] - box[0] >= 2 && box[3] - box[1] >= 2) return setBox(box, event.timeStamp);
      return render();
    }
    if (!inside(drag.start) || (drag.button !== 0 && drag.button !== 2)) return render();
    const label = drag.button === 2 || drag.shift ? 0 : 1;
    addPoint(round1(drag.start[0]), round1(drag.start[1]), label, event.timeStamp);
  });
  canvas.addEventListener("wheel", (event) => {
    if (!app.picture) return;
    event.preventDefault();
    const [ix, iy] = toImage(event.clientX, event.clientY);
    const rect = canvas.getBoundingClientRect();
    const scale = Math.min(Math.max(app.view.scale * Math.exp(-event.deltaY * 0.0015), 0.02), 32);
    app.view = {scale, x: event.clientX - rect.left - ix * scale, y: event.clientY - rect.top - iy * scale,
                fitted: false};
    render();
  }, {passive: false});
  window.addEventListener("resize", () => { if (app.view.fitted) fit(); render(); });

  window.addEventListener("keydown", (event) => {
    const typing = event.target instanceof HTMLInputElement && event.target.type === "text";
    const command = event.ctrlKey || event.metaKey;
    if (typing && event.key === "Enter" && event.target.id === "object-label") event.target.blur();  // then finish
    else if (typing && event.key !== "Escape" && !(command && event.key.toLowerCase() === "s")) return;
    const key = event.key.toLowerCase();
    if (command && key === "z") event.shiftKey ? redo() : undo();
    else if (command && key === "y") redo();
    else if (command && key === "s") exportAll();
    else if (command) return;
    else if (["1", "2", "3"].includes(key)) selectCandidate(+key - 1);
    else if (key === "escape") {
      if (typing) event.target.blur();
      else if (app.drag) app.drag = null;
      else clearObject();
    } else if (key === "enter" || key === "n") finishObject();
    else if (key === "d") finishImage("done");
    else if (key === "h") {
      app.hover.enabled = !app.hover.enabled;
      app.hover.layer = null;
    } else if (key === "f" || key === "0") fit();
    else if (key === "arrowleft" || key === "pageup") openImage(app.imageId - 1);
    else if (key === "arrowright" || key === "pagedown") openImage(app.imageId + 1);
    else if (key === " ") app.space = true;
    else return;
    event.preventDefault();
    refresh();
  });
  window.addEventListener("keyup", (event) => { if (event.key === " ") app.space = false; });

  $("prev").addEventListener("click", () => openImage(app.imageId - 1));
  $("next").addEventListener("click", () => openImage(app.imageId + 1));
  $("undo").addEventListener("click", undo);
  $("redo").addEventListener("click", redo);
  $("clear").addEventListener("click", clearObject);
  $("finish").addEventListener("click", finishObject);
  $("export").addEventListener("click", exportAll);
  $("object-label").addEventListener("input", (event) => { currentObject().label = event.target.value; refresh(); });
  $("object-color").addEventListener("input", (event) => { currentObject().color = event.target.value; refresh(); });
  for (const id of ["object-label", "object-color"]) {  // saved once the edit is done (Enter, leaving the field)
    $(id).addEventListener("change", () => saveLook(app.imageId, currentObject()));
  }
  $("mark-done").addEventListener("click", () => finishImage("done"));
  $("skip-image").addEventListener("click", () => finishImage("skipped"));
}

// ------------------------------------------------------------------ start
async function start() {
  setupInput();
  if (!token) return refresh();
  try {
    app.info = await api("/api/info");
  } catch (error) {
    if (error.status === 403) app.refused = true;  // the notice says what to do
    else toast(error.message, true);
    return refresh();
  }
  const size = Array.isArray(app.info.size) ? app.info.size.join("×") : app.info.size;
  $("model").textContent = `${app.info.model.split(" [")[0]} · ${app.info.sizing} ${size}`;
  $("model").title = app.info.model;
  await pollProject();
  showSaving();
  setupCleanup();
  setupExport();
  connectHover();
  const data = await api("/api/images");
  app.images = data.images;
  if (app.images.length) await openImage(0);
  refresh();
}

// Row-major run lengths (zeros first) of a mask bitmap as the page decoded it: what scripts compare.
function runsOf(bitmap) {
  const width = bitmap.naturalWidth, height = bitmap.naturalHeight;
  const c = document.createElement("canvas");
  c.width = width;
  c.height = height;
  const g = c.getContext("2d", {willReadFrequently: true});
  g.drawImage(bitmap, 0, 0);
  const pixels = g.getImageData(0, 0, width, height).data;
  const runs = [];
  let value = 0, run = 0;
  for (let i = 3; i < pixels.length; i += 4) {
    const on = pixels[i] > 127 ? 1 : 0;
    if (on !== value) {
      runs.push(run);
      run = 0;
      value = on;
    }
    run++;
  }
  runs.push(run);
  return {width, height, runs};
}

// For scripts that drive the page (the browser tests, the latency benchmark).
window.samApp = {
  app, toClient, session, currentObject, stateOf, render, saved, pollProject,
  maskRuns(index) {  // the mask shown for an object (default: the current one)
    const s = session();
    const layer = shownLayer(stateOf(s.objects[index ?? s.current]));
    return layer ? runsOf(layer.bitmap) : null;
  },
  hoverRuns: () => (app.hover.layer ? runsOf(app.hover.layer.bitmap) : null),
};

start();
