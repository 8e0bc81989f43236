// The study page's viewer: one radiograph at its own resolution on a canvas, with zoom (wheel, buttons, + and -),
// pan (drag, arrow keys), window/level (right-button drag or shift + drag, shift + arrow keys, "reset window") and
// the model's heatmap as a toggled overlay (button or "h") with its colour scale. The pixels are the modality
// values the server decoded (/api/instances/ID/radiograph.raw, uint16); the window is applied here through a
// look-up table, so windowing redraws without asking the server. When the received file is no longer kept, the
// model's 224x224 input (the thumbnail) is shown instead and the page says so; window/level is then off.
// State lives in this closure; #viewer's data-* attributes mirror it for the page and its tests.
(function () {
  "use strict";
  const root = document.getElementById("viewer");
  if (!root) { return; }
  const canvas = document.getElementById("viewer-canvas");
  const ctx = canvas.getContext("2d");
  const readout = document.getElementById("viewer-readout");
  const note = document.getElementById("viewer-note");
  const legend = document.getElementById("heatmap-legend");
  const toggle = document.getElementById("heatmap-toggle");
  const opacityInput = document.getElementById("heatmap-opacity");
  const chooser = document.getElementById("viewer-instance");
  const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
  const state = {
    meta: null, values: null, image: null, rgba: null, heat: null, heatOn: false, mode: "loading",
    center: 0, width: 1, scale: 1, x: 0, y: 0, fit: true, drag: null, pending: false, loads: 0,
  };

  function jet(t) {  // the overlay's colour map (and the legend's): blue (0) - cyan - yellow - red (1)
    const c = function (v) { return Math.round(255 * Math.min(1, Math.max(0, v))); };
    return [c(1.5 - Math.abs(4 * t - 3)), c(1.5 - Math.abs(4 * t - 2)), c(1.5 - Math.abs(4 * t - 1))];
  }

  function drawLegend() {
    const bar = document.getElementById("legend-bar");
    const g = bar.getContext("2d");
    for (let x = 0; x < bar.width; x += 1) {
      const rgb = jet(x / (bar.width - 1));
      g.fillStyle = "rgb(" + rgb.join(",") + ")";
      g.fillRect(x, 0, 1, bar.height);
    }
  }

  function grey(x) {  // PS3.3 C.11.2.1.2: a modality value through the window, to [0, 1]
    const c = state.center, w = state.width, f = state.meta.window.function;
    if (f === "SIGMOID") { return 1 / (1 + Math.exp(-4 * (x - c) / w)); }
    if (f === "LINEAR_EXACT") { return Math.min(1, Math.max(0, (x - c) / w + 0.5)); }
    if (w <= 1) { return x < c - 0.5 ? 0 : 1; }
    return Math.min(1, Math.max(0, (x - (c - 0.5)) / (w - 1) + 0.5));
  }

  function paintImage() {  // the served values through the window's look-up table into the full-size canvas
    const m = state.meta, values = state.values;
    const lut = new Uint8Array(m.max_value + 1);
    for (let v = 0; v <= m.max_value; v += 1) {
      const y = grey(v * m.slope + m.intercept);
      lut[v] = Math.round(255 * (m.invert ? 1 - y : y));
    }
    const g = state.image.getContext("2d");
    if (!state.rgba) { state.rgba = g.createImageData(m.columns, m.rows); state.rgba.data.fill(255); }
    const out = state.rgba.data;  // reused while windowing: only the grey levels change
    for (let i = 0, j = 0; i < values.length; i += 1, j += 4) {
      const level = lut[values[i]];
      out[j] = level; out[j + 1] = level; out[j + 2] = level;
    }
    g.putImageData(state.rgba, 0, 0);
  }

  function size() {
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.max(1, Math.round(canvas.clientWidth * ratio));
    canvas.height = Math.max(1, Math.round(canvas.clientHeight * ratio));
  }

  function fitView() {
    if (!state.image) { return; }
    const w = state.image.width, h = state.image.height;
    state.scale = Math.min(canvas.width / w, canvas.height / h);
    state.x = (canvas.width - w * state.scale) / 2;
    state.y = (canvas.height - h * state.scale) / 2;
    state.fit = true;
  }

  function zoomAt(factor, cx, cy) {
    const scale = Math.min(32, Math.max(0.02, state.scale * factor));
    state.x = cx - (cx - state.x) * (scale / state.scale);
    state.y = cy - (cy - state.y) * (scale / state.scale);
    state.scale = scale;
    state.fit = false;
    render();
  }

  function actualSize() {  // one image pixel per screen pixel, centred
    state.scale = 1;
    state.x = Math.round((canvas.width - state.image.width) / 2);
    state.y = Math.round((canvas.height - state.image.height) / 2);
    state.fit = false;
    render();
  }

  function render() {
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (!state.image) { return; }
    ctx.setTransform(state.scale, 0, 0, state.scale, state.x, state.y);
    ctx.imageSmoothingEnabled = state.scale < 1;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(state.image, 0, 0);
    if (state.heatOn && state.heat) {  // stretched over the whole image: the map covers the squashed model input
      ctx.globalAlpha = Number(opacityInput.value) / 100;
      ctx.imageSmoothingEnabled = true;
      ctx.imageSmoothingQuality = "low";  // bilinear, as the map's own upsampling
      ctx.drawImage(state.heat, 0, 0, state.heat.width, state.heat.height, 0, 0, state.image.width, state.image.height);
      ctx.globalAlpha = 1;
    }
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    describe();
  }

  function describe() {
    const zoom = Math.round(state.scale * 100) + " %";
    const m = state.meta;
    let text = state.image.width + " x " + state.image.height + " pixels, zoom " + zoom;
    if (state.mode === "radiograph") {
      text += ", window W " + round(state.width) + " / L " + round(state.center);
      if (m.step > 1) { text += " (reduced by " + m.step + " from " + m.source_columns + " x " + m.source_rows + ")"; }
      root.dataset.windowCenter = String(state.center);
      root.dataset.windowWidth = String(state.width);
    } else {
      delete root.dataset.windowCenter;
      delete root.dataset.windowWidth;
    }
    readout.textContent = text;
    root.dataset.zoom = String(state.scale);
    root.dataset.origin = state.x + "," + state.y;  // where the image's top-left pixel is on the canvas
    root.dataset.heatmap = state.heat ? (state.heatOn ? "on" : "off") : "none";
    root.dataset.rendered = String(Number(root.dataset.rendered || 0) + 1);
  }

  function round(v) { return Math.abs(v) >= 100 ? Math.round(v) : Math.round(v * 100) / 100; }

  function schedule() {  // window changes repaint at most once a frame
    if (state.pending) { return; }
    state.pending = true;
    window.requestAnimationFrame(function () { state.pending = false; paintImage(); render(); });
  }

  function setWindow(center, width) {
    if (state.mode !== "radiograph") { return; }
    state.center = center;
    state.width = Math.max(1, width);
    schedule();
  }

  function resetWindow() {
    if (state.meta && state.mode === "radiograph") { setWindow(state.meta.window.center, state.meta.window.width); }
  }

  function setHeat(on) {
    state.heatOn = Boolean(on && state.heat);
    toggle.setAttribute("aria-pressed", String(state.heatOn));
    legend.hidden = !state.heatOn;
    if (state.image) { render(); }
  }

  function windowStep() { return Math.max(state.meta.window.width, 1) / 300; }

  function bindPointer() {
    canvas.addEventListener("contextmenu", function (e) { e.preventDefault(); });
    canvas.addEventListener("pointerdown", function (e) {
      if (!state.image) { return; }
      const windowing = (e.button === 2 || e.shiftKey) && state.mode === "radiograph";  // a thumbnail only pans
      state.drag = { x: e.clientX, y: e.clientY, windowing: windowing, center: state.center, width: state.width };
      canvas.setPointerCapture(e.pointerId);
      canvas.focus();
    });
    canvas.addEventListener("pointermove", function (e) {
      const d = state.drag;
      if (!d) { return; }
      const ratio = window.devicePixelRatio || 1;
      const dx = e.clientX - d.x, dy = e.clientY - d.y;
      if (d.windowing) {  // left-right: the width; up-down: the level
        setWindow(d.center + dy * windowStep(), d.width + dx * windowStep());
        return;
      }
      state.x += dx * ratio; state.y += dy * ratio; state.fit = false;
      d.x = e.clientX; d.y = e.clientY;
      render();
    });
    const end = function () { state.drag = null; };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
    canvas.addEventListener("wheel", function (e) {
      if (!state.image) { return; }
      e.preventDefault();
      const box = canvas.getBoundingClientRect(), ratio = window.devicePixelRatio || 1;
      zoomAt(Math.exp(-e.deltaY * 0.0015), (e.clientX - box.left) * ratio, (e.clientY - box.top) * ratio);
    }, { passive: false });
  }

  function onKey(e) {
    if (!state.image || e.ctrlKey || e.metaKey || e.altKey) { return; }
    const step = 50 * (window.devicePixelRatio || 1), middle = [canvas.width / 2, canvas.height / 2];
    const keys = {
      "+": function () { zoomAt(1.25, middle[0], middle[1]); },
      "=": function () { zoomAt(1.25, middle[0], middle[1]); },
      "-": function () { zoomAt(0.8, middle[0], middle[1]); },
      "0": function () { fitView(); render(); },
      "1": actualSize,
      "h": function () { setHeat(!state.heatOn); },
      "r": resetWindow,
    };
    if (e.key.startsWith("Arrow") && e.shiftKey && state.mode === "radiograph") {
      const s = windowStep() * 10;
      const d = { ArrowLeft: [0, -s], ArrowRight: [0, s], ArrowUp: [s, 0], ArrowDown: [-s, 0] }[e.key];
      setWindow(state.center + d[0], state.width + d[1]);
    } else if (e.key.startsWith("Arrow")) {
      const d = { ArrowLeft: [step, 0], ArrowRight: [-step, 0], ArrowUp: [0, step], ArrowDown: [0, -step] }[e.key];
      state.x += d[0]; state.y += d[1]; state.fit = false;
      render();
    } else if (keys[e.key]) {
      keys[e.key]();
    } else {
      return;
    }
    e.preventDefault();
  }

  function bindControls() {
    const middle = function () { return [canvas.width / 2, canvas.height / 2]; };
    document.getElementById("zoom-in").addEventListener("click", function () { zoomAt(1.25, ...middle()); });
    document.getElementById("zoom-out").addEventListener("click", function () { zoomAt(0.8, ...middle()); });
    document.getElementById("zoom-fit").addEventListener("click", function () { fitView(); render(); });
    document.getElementById("zoom-actual").addEventListener("click", actualSize);
    document.getElementById("window-reset").addEventListener("click", resetWindow);
    toggle.addEventListener("click", function () { setHeat(!state.heatOn); });
    opacityInput.addEventListener("input", function () { if (state.image) { render(); } });
    canvas.addEventListener("keydown", onKey);
    if (chooser) { chooser.addEventListener("change", function () { load(chooser.value); }); }
    window.addEventListener("resize", function () {
      if (!state.image) { return; }
      size();
      if (state.fit) { fitView(); }
      render();
    });
  }

  async function fetchOk(url, kind) {
    const response = await fetch(url, { credentials: "same-origin" });
    if (!response.ok) { throw new Error(url + ": HTTP " + response.status); }
    return kind === "json" ? response.json() : response.arrayBuffer();
  }

  function pixels(buffer, count) {
    if (LITTLE_ENDIAN) { return new Uint16Array(buffer, 0, count); }
    const view = new DataView(buffer), out = new Uint16Array(count);
    for (let i = 0; i < count; i += 1) { out[i] = view.getUint16(2 * i, true); }
    return out;
  }

  function loadThumbnail(url) {
    return new Promise(function (resolve, reject) {
      const img = new Image();
      img.onload = function () {
        const c = document.createElement("canvas");
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        c.getContext("2d").drawImage(img, 0, 0);
        resolve(c);
      };
      img.onerror = function () { reject(new Error("the thumbnail could not be loaded")); };
      img.src = url;
    });
  }

  async function loadHeat(url) {
    if (!url) { return null; }
    const map = await fetchOk(url, "json");
    const c = document.createElement("canvas");
    c.width = map.columns; c.height = map.rows;
    const g = c.getContext("2d"), data = g.createImageData(map.columns, map.rows);
    map.values.forEach(function (v, i) {
      const rgb = jet(v);
      data.data.set([rgb[0], rgb[1], rgb[2], 255], 4 * i);
    });
    g.putImageData(data, 0, 0);
    return c;
  }

  function windowControls(on) {
    document.getElementById("window-reset").disabled = !on;
  }

  async function load(id) {
    const mine = ++state.loads;  // a newer load (another image chosen) wins
    root.dataset.state = "loading";
    note.textContent = "loading the radiograph...";
    try {
      const meta = await fetchOk("/api/instances/" + id + "/radiograph", "json");
      const heat = await loadHeat(meta.heatmap);
      let image, values = null, mode, message;
      if (meta.available) {
        const buffer = await fetchOk(meta.pixels, "buffer");
        values = pixels(buffer, meta.rows * meta.columns);
        image = document.createElement("canvas");
        image.width = meta.columns; image.height = meta.rows;
        mode = "radiograph";
        message = "The received radiograph at its own resolution; window from " + meta.window.source + ".";
      } else if (meta.thumbnail) {
        image = await loadThumbnail(meta.thumbnail);
        mode = "thumbnail";
        message = meta.reason + ": showing the model's 224x224 input instead (no window/level).";
      } else {
        mode = "none";
        message = meta.reason + "; there is no other picture of this image.";
      }
      if (mine !== state.loads) { return; }
      Object.assign(state, { meta: meta, values: values, image: image || null, heat: heat, mode: mode, rgba: null });
      if (!heat) { message += " No heatmap for this image."; }
      note.textContent = message;
      root.dataset.state = mode;
      root.dataset.instance = String(id);
      root.dataset.rows = image ? String(image.height) : "";
      root.dataset.columns = image ? String(image.width) : "";
      toggle.disabled = !heat;
      windowControls(mode === "radiograph");
      setHeat(state.heatOn && heat);
      size();
      if (mode === "radiograph") { state.center = meta.window.center; state.width = meta.window.width; paintImage(); }
      if (image) { fitView(); }
      render();
    } catch (err) {
      if (mine !== state.loads) { return; }
      root.dataset.state = "error";
      note.textContent = "The radiograph could not be shown: " + err.message;
    }
  }

  drawLegend();
  bindPointer();
  bindControls();
  load(root.dataset.instance);
}());
