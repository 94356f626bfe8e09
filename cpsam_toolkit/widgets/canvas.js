// The canvas front end of cpsam_toolkit.widgets.LabelCanvas (an anywidget ES module:
// no npm build step, no CDN). Loaded by path from canvas.py.
const TAU = Math.PI * 2;
const NAMES = { area: "area (px)", mean_cellprob: "cell prob.", flow_error: "flow error",
                match: "match", iou: "IoU" };

function hsv(h, s, v) {
  const i = Math.floor(h * 6), f = h * 6 - i, p = v * (1 - s), q = v * (1 - f * s), t = v * (1 - (1 - f) * s);
  const m = [[v, t, p], [q, v, p], [p, v, t], [p, q, v], [t, p, v], [v, p, q]][i % 6];
  return m.map((c) => Math.round(c * 255));
}
function labelRGB(l) { return hsv((l * 0.6180339887498949) % 1, 0.75, 1.0); }
function parseColor(c) {
  if (typeof c !== "string") return null;
  const m = /^#?([0-9a-f]{6})$/i.exec(c.trim());
  if (!m) return null;
  const n = parseInt(m[1], 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}
function bytesOf(v) {
  if (!v) return null;
  if (v instanceof DataView) return new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
  if (v instanceof ArrayBuffer) return new Uint8Array(v);
  if (ArrayBuffer.isView(v)) return new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
  return null;
}
async function inflate(u8) {
  const stream = new Blob([u8]).stream().pipeThrough(new DecompressionStream("deflate"));
  return await new Response(stream).arrayBuffer();
}

function render({ model, el }) {
  el.classList.add("cpsam-canvas");
  const root = document.createElement("div");
  root.className = "cpsam-root";
  const wrap = document.createElement("div");
  wrap.className = "cpsam-wrap";
  const canvas = document.createElement("canvas");
  canvas.tabIndex = 0;
  canvas.setAttribute("data-lm-suppress-shortcuts", "true");
  const tip = document.createElement("div");
  tip.className = "cpsam-tip";
  const status = document.createElement("div");
  status.className = "cpsam-status";
  const sPos = document.createElement("span"), sZoom = document.createElement("span"),
        sTool = document.createElement("span");
  status.append(sTool, sZoom, sPos);
  wrap.append(canvas, tip);
  root.append(wrap, status);
  el.append(root);
  const ctx = canvas.getContext("2d");

  let raw = null, img = null, W = 0, H = 0, labels = null, ov = null;
  let scale = 1, tx = 0, ty = 0, fitted = false, dpr = window.devicePixelRatio || 1;
  let drag = null, stroke = null, pending = [], hover = null, space = false;
  let rows = new Map(), seqImg = 0, seqLab = 0;

  const tool = () => {
    const t = model.get("tool"), allowed = model.get("tools") || [];
    return allowed.includes(t) ? t : "pan";
  };
  const setHeight = () => { wrap.style.height = `${model.get("height")}px`; };
  setHeight();

  function fit() {
    const cw = wrap.clientWidth, ch = wrap.clientHeight;
    if (!W || !H || !cw || !ch) return;
    scale = Math.min(cw / W, ch / H);
    tx = (cw - W * scale) / 2;
    ty = (ch - H * scale) / 2;
    fitted = true;
  }
  function toImage(ev) {
    const r = canvas.getBoundingClientRect();
    const sx = ev.clientX - r.left, sy = ev.clientY - r.top;
    return { x: (sx - tx) / scale - 0.5, y: (sy - ty) / scale - 0.5, sx, sy };
  }
  function labelAt(p) {
    const xi = Math.floor(p.x + 0.5), yi = Math.floor(p.y + 0.5);
    if (!labels || xi < 0 || yi < 0 || xi >= W || yi >= H) return null;
    return { x: xi, y: yi, id: labels[yi * W + xi] };
  }

  // brightness / contrast / gamma: a 256-entry lookup table applied to the image's pixels
  // (in an offscreen canvas, once per change, so drawing stays a plain drawImage)
  function levelsLUT() {
    const b = model.get("brightness") || 0, c = model.get("contrast") || 1, g = model.get("gamma") || 1;
    if (b === 0 && c === 1 && g === 1) return null;
    const lut = new Uint8ClampedArray(256);
    for (let v = 0; v < 256; v++) {
      const y = Math.min(1, Math.max(0, (v / 255 - 0.5) * c + 0.5 + b));
      lut[v] = Math.round(255 * Math.pow(y, g));
    }
    return lut;
  }
  function applyLevels() {
    const lut = levelsLUT();
    if (!raw || !lut) { img = raw; return; }
    const off = document.createElement("canvas");
    off.width = raw.width; off.height = raw.height;
    const octx = off.getContext("2d");
    octx.drawImage(raw, 0, 0);
    const data = octx.getImageData(0, 0, off.width, off.height);
    const d = data.data;
    for (let i = 0; i < d.length; i += 4) { d[i] = lut[d[i]]; d[i + 1] = lut[d[i + 1]]; d[i + 2] = lut[d[i + 2]]; }
    octx.putImageData(data, 0, 0);
    img = off;
  }

  function buildOverlay() {
    const mode = model.get("overlay");
    if (!labels || labels.length !== W * H || mode === "none") { ov = null; return; }
    const alpha = Math.max(0, Math.min(255, Math.round(255 * model.get("opacity"))));
    const edgeAlpha = mode === "filled" ? Math.min(255, Math.round(alpha * 1.6) + 40) : alpha;
    const custom = model.get("colors") || {};
    const cache = new Map();
    const packed = (l, a) => {
      const key = l * 2 + (a === alpha ? 0 : 1);
      let v = cache.get(key);
      if (v === undefined) {
        const c = parseColor(custom[l]) || labelRGB(l);
        v = ((a << 24) | (c[2] << 16) | (c[1] << 8) | c[0]) >>> 0;
        cache.set(key, v);
      }
      return v;
    };
    if (!ov || ov.width !== W || ov.height !== H) {
      ov = document.createElement("canvas");
      ov.width = W; ov.height = H;
    }
    const data = new ImageData(W, H);
    const px = new Uint32Array(data.data.buffer);
    const L = labels;
    for (let y = 0, i = 0; y < H; y++) {
      for (let x = 0; x < W; x++, i++) {
        const l = L[i];
        if (l === 0) continue;
        const edge = (x > 0 && L[i - 1] !== l) || (x < W - 1 && L[i + 1] !== l) ||
                     (y > 0 && L[i - W] !== l) || (y < H - 1 && L[i + W] !== l);
        if (mode === "outlines") { if (edge) px[i] = packed(l, alpha); }
        else px[i] = packed(l, edge ? edgeAlpha : alpha);
      }
    }
    ov.getContext("2d").putImageData(data, 0, 0);
  }

  function strokeColor(s) {
    if (s.type === "erase") return "rgba(255,255,255,0.55)";
    const c = labelRGB(s.label);
    return `rgba(${c[0]},${c[1]},${c[2]},0.75)`;
  }
  function drawStroke(s) {
    ctx.save();
    ctx.strokeStyle = strokeColor(s);
    ctx.fillStyle = strokeColor(s);
    ctx.lineWidth = Math.max(1, 2 * s.radius);
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    const p0 = s.points[0];
    if (s.points.length === 1) {
      ctx.arc(p0[1] + 0.5, p0[0] + 0.5, Math.max(0.5, s.radius), 0, TAU);
      ctx.fill();
    } else {
      ctx.moveTo(p0[1] + 0.5, p0[0] + 0.5);
      for (const p of s.points) ctx.lineTo(p[1] + 0.5, p[0] + 0.5);
      ctx.stroke();
    }
    ctx.restore();
  }
  function draw() {
    const cw = wrap.clientWidth, ch = wrap.clientHeight;
    dpr = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(cw * dpr) || canvas.height !== Math.round(ch * dpr)) {
      canvas.width = Math.round(cw * dpr);
      canvas.height = Math.round(ch * dpr);
    }
    if (!fitted) fit();
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#161616";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.setTransform(dpr * scale, 0, 0, dpr * scale, dpr * tx, dpr * ty);
    ctx.imageSmoothingEnabled = scale < 2;
    if (img) ctx.drawImage(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    if (ov) ctx.drawImage(ov, 0, 0);
    for (const s of pending) drawStroke(s);
    if (stroke) drawStroke(stroke);
    const t = tool();
    if (hover && (t === "brush" || t === "eraser")) {
      ctx.save();
      ctx.lineWidth = 1 / scale;
      ctx.strokeStyle = t === "eraser" ? "#fff" : "#ff0";
      ctx.beginPath();
      ctx.arc(hover.x + 0.5, hover.y + 0.5, Math.max(0.5, model.get("brush_radius")), 0, TAU);
      ctx.stroke();
      ctx.restore();
    }
    sZoom.textContent = W ? `${W}×${H} px · zoom ${Math.round(scale * 100)}%` : "no image";
    const lab = model.get("label_id");
    sTool.textContent = `tool: ${t}` + (t === "brush" || t === "fill" ? ` · label ${lab}` : "") +
      (t === "brush" || t === "eraser" ? ` · radius ${model.get("brush_radius")}` : "");
  }
  function rendered() {
    model.set("render_count", (model.get("render_count") || 0) + 1);
    model.save_changes();
  }

  async function loadImage() {
    const my = ++seqImg;
    const u8 = bytesOf(model.get("image_png"));
    if (!u8 || !u8.length) { raw = null; img = null; draw(); return; }
    const bmp = await createImageBitmap(new Blob([u8], { type: "image/png" }));
    if (my !== seqImg) return;
    const [h, w] = model.get("shape") || [bmp.height, bmp.width];
    if (w !== W || h !== H) { W = w; H = h; fitted = false; }
    raw = bmp;
    applyLevels();
    draw();
    rendered();
  }
  async function loadLabels() {
    const t0 = performance.now();
    const my = ++seqLab;
    const u8 = bytesOf(model.get("labels_z"));
    const shape = model.get("shape") || [0, 0];
    let lab = null;
    if (u8 && u8.length) lab = new Uint32Array(await inflate(u8));
    if (my !== seqLab) return;
    if (shape[1] !== W || shape[0] !== H) { H = shape[0]; W = shape[1]; fitted = false; }
    labels = lab && lab.length === W * H ? lab : null;
    pending = [];
    buildOverlay();
    draw();
    // decode + overlay + draw time, for tests and curious users (data-render-ms)
    root.dataset.renderMs = (performance.now() - t0).toFixed(1);
    rendered();
  }
  function loadObjects() {
    rows = new Map();
    const o = model.get("objects") || {};
    const ids = o.label || [];
    for (let r = 0; r < ids.length; r++) rows.set(ids[r], r);
  }
  function showTip(p) {
    const hit = labelAt(p);
    if (!hit) { tip.style.display = "none"; sPos.textContent = ""; return; }
    sPos.textContent = `y ${hit.y}, x ${hit.x}` + (hit.id ? ` · object ${hit.id}` : "");
    if (!hit.id) { tip.style.display = "none"; return; }
    const o = model.get("objects") || {};
    const r = rows.get(hit.id);
    const lines = [`object ${hit.id}`];
    if (r !== undefined) {
      for (const k of Object.keys(o)) {
        if (k === "label") continue;
        let v = o[k][r];
        if (typeof v === "number" && !Number.isInteger(v)) v = v.toFixed(3);
        lines.push(`${NAMES[k] || k}: ${v === null ? "–" : v}`);
      }
    }
    tip.textContent = lines.join("\n");
    tip.style.display = "block";
    const x = Math.min(p.sx + 14, wrap.clientWidth - tip.offsetWidth - 4);
    const y = Math.min(p.sy + 14, wrap.clientHeight - tip.offsetHeight - 4);
    tip.style.left = `${Math.max(0, x)}px`;
    tip.style.top = `${Math.max(0, y)}px`;
  }
  const send = (msg) => model.send(msg);
  const r2 = (v) => Math.round(v * 100) / 100;

  function onDown(ev) {
    canvas.focus({ preventScroll: true });
    const p = toImage(ev);
    const t = tool();
    if (ev.button === 1 || ev.button === 2 || t === "pan" || space) {
      drag = { sx: ev.clientX, sy: ev.clientY, tx, ty };
      canvas.classList.add("cpsam-panning");
    } else if (ev.button === 0 && (t === "brush" || t === "eraser")) {
      stroke = { type: t === "brush" ? "paint" : "erase", points: [[r2(p.y), r2(p.x)]],
                 radius: model.get("brush_radius"), label: model.get("label_id") };
      draw();
    } else if (ev.button === 0 && (t === "fill" || t === "delete" || t === "pick")) {
      const msg = { type: t, y: r2(p.y), x: r2(p.x) };
      if (t === "fill") msg.label = model.get("label_id");
      send(msg);
      return;
    } else return;
    canvas.setPointerCapture(ev.pointerId);
    ev.preventDefault();
  }
  function onMove(ev) {
    const p = toImage(ev);
    hover = { x: Math.floor(p.x + 0.5), y: Math.floor(p.y + 0.5) };
    if (drag) {
      tx = drag.tx + ev.clientX - drag.sx;
      ty = drag.ty + ev.clientY - drag.sy;
      tip.style.display = "none";
    } else if (stroke) {
      const last = stroke.points[stroke.points.length - 1];
      if (Math.hypot(p.y - last[0], p.x - last[1]) >= 0.5) stroke.points.push([r2(p.y), r2(p.x)]);
      tip.style.display = "none";
    } else {
      showTip(p);
    }
    draw();
  }
  function onUp(ev) {
    if (drag) { drag = null; canvas.classList.remove("cpsam-panning"); }
    if (stroke) {
      const s = stroke;
      stroke = null;
      pending.push(s);
      const msg = { type: s.type, points: s.points, radius: s.radius };
      if (s.type === "paint") msg.label = s.label;
      send(msg);
      draw();
    }
    try { canvas.releasePointerCapture(ev.pointerId); } catch { /* not captured */ }
  }
  function onWheel(ev) {
    if (!W) return;
    ev.preventDefault();
    const r = canvas.getBoundingClientRect();
    const sx = ev.clientX - r.left, sy = ev.clientY - r.top;
    const f = Math.pow(1.0015, -ev.deltaY * (ev.deltaMode === 1 ? 30 : 1));
    const ns = Math.max(0.02, Math.min(64, scale * f));
    tx = sx - (sx - tx) * (ns / scale);
    ty = sy - (sy - ty) * (ns / scale);
    scale = ns;
    draw();
  }
  function onKey(ev) {
    const k = ev.key;
    const tools = model.get("tools") || [];
    const setTool = (t) => { if (tools.includes(t)) { model.set("tool", t); model.save_changes(); } };
    let handled = true;
    if ((ev.ctrlKey || ev.metaKey) && (k === "z" || k === "Z")) send({ type: ev.shiftKey ? "redo" : "undo" });
    else if ((ev.ctrlKey || ev.metaKey) && (k === "y" || k === "Y")) send({ type: "redo" });
    else if (ev.ctrlKey || ev.metaKey || ev.altKey) handled = false;
    else if (k === " ") space = true;
    else if (k === "b") setTool("brush");
    else if (k === "e") setTool("eraser");
    else if (k === "f") setTool("fill");
    else if (k === "d" || k === "Delete") setTool("delete");
    else if (k === "i") setTool("pick");
    else if (k === "h") setTool("pan");
    else if (k === "n" && tools.includes("brush")) send({ type: "new_label" });
    else if (k === "[" || k === "]") {
      const rad = Math.max(0, Math.min(200, model.get("brush_radius") + (k === "]" ? 1 : -1)));
      model.set("brush_radius", rad); model.save_changes();
    } else if (k === "0") { fit(); draw(); }
    else handled = false;
    if (handled) { ev.preventDefault(); ev.stopPropagation(); draw(); }
  }
  function onKeyUp(ev) { if (ev.key === " ") { space = false; ev.stopPropagation(); } }
  function onLeave() { hover = null; tip.style.display = "none"; draw(); }
  function onToolChange() {
    canvas.classList.toggle("cpsam-pan", tool() === "pan");
    draw();
  }

  canvas.addEventListener("pointerdown", onDown);
  canvas.addEventListener("pointermove", onMove);
  canvas.addEventListener("pointerup", onUp);
  canvas.addEventListener("pointercancel", onUp);
  canvas.addEventListener("pointerleave", onLeave);
  canvas.addEventListener("wheel", onWheel, { passive: false });
  canvas.addEventListener("dblclick", () => { fit(); draw(); });
  canvas.addEventListener("contextmenu", (ev) => ev.preventDefault());
  canvas.addEventListener("keydown", onKey);
  canvas.addEventListener("keyup", onKeyUp);

  const onOverlay = () => { buildOverlay(); draw(); };
  const onHeight = () => { setHeight(); fitted = false; draw(); };
  const onReset = () => { fitted = false; draw(); };
  const onLevels = () => { applyLevels(); draw(); rendered(); };
  model.on("change:image_png", loadImage);
  model.on("change:labels_z", loadLabels);
  model.on("change:objects", loadObjects);
  model.on("change:overlay", onOverlay);
  model.on("change:opacity", onOverlay);
  model.on("change:colors", onOverlay);
  model.on("change:tool", onToolChange);
  model.on("change:tools", onToolChange);
  model.on("change:brush_radius", draw);
  model.on("change:label_id", draw);
  model.on("change:height", onHeight);
  model.on("change:brightness", onLevels);
  model.on("change:contrast", onLevels);
  model.on("change:gamma", onLevels);
  model.on("msg:custom", (msg) => { if (msg && msg.type === "reset_view") onReset(); });
  const ro = new ResizeObserver(() => draw());
  ro.observe(wrap);

  loadObjects();
  onToolChange();
  Promise.all([loadImage(), loadLabels()]).catch((e) => console.error("cpsam canvas", e));
  return () => {
    ro.disconnect();
    model.off("change:image_png", loadImage);
    model.off("change:labels_z", loadLabels);
    model.off("change:objects", loadObjects);
    model.off("change:overlay", onOverlay);
    model.off("change:opacity", onOverlay);
    model.off("change:colors", onOverlay);
    model.off("change:tool", onToolChange);
    model.off("change:tools", onToolChange);
    model.off("change:brush_radius", draw);
    model.off("change:label_id", draw);
    model.off("change:height", onHeight);
    model.off("change:brightness", onLevels);
    model.off("change:contrast", onLevels);
    model.off("change:gamma", onLevels);
  };
}

export default { render };
