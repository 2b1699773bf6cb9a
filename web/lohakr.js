// lohakr ComfyUI extension: an adapter card, the load report per block, a block-weight editor and
// stack rows on our nodes. Logic lives in lohakr_core.js; this file only builds DOM widgets.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import * as core from "./lohakr_core.js";

const CARD_NODES = ["LohakrLoader", "LohakrLoaderModelOnly", "LohakrStack", "LohakrInfo"];
const REPORT_NODES = ["LohakrLoader", "LohakrLoaderModelOnly", "LohakrApplyStack", "LohakrInfo"];
const EDITOR_NODES = ["LohakrLoader", "LohakrLoaderModelOnly", "LohakrStack"];
const SAVE_NODES = ["LohakrSaveLora"];
const ALL_NODES = [...new Set([...CARD_NODES, ...REPORT_NODES, ...EDITOR_NODES, ...SAVE_NODES])];

// Styling follows the frontend's own CSS variables (both the classic canvas and the Vue "Nodes 2.0"
// renderer define them), so the panels take the theme's colours.
const CSS = `
.lohakr { --lk-bg: var(--component-node-widget-background, var(--comfy-input-bg, #222));
  --lk-fg: var(--node-foreground, var(--input-text, #ddd)); --lk-muted: var(--descrip-text, #999);
  --lk-border: var(--border-color, #4e4e4e); --lk-accent: var(--p-primary-color, #4a9eff);
  --lk-field: var(--comfy-menu-bg, #353535);
  font: 11px/1.35 Inter, Arial, sans-serif; color: var(--lk-fg); padding: 4px 6px; box-sizing: border-box;
  overflow: hidden; background: var(--lk-bg); border-radius: 6px; width: 100%; }
.lohakr *, .lohakr *::before, .lohakr *::after { box-sizing: border-box; }
.lohakr-body { display: flow-root; min-width: 0; }
.lohakr h4 { margin: 0 0 3px; font-size: 12px; overflow-wrap: anywhere; }
.lohakr table { border-collapse: collapse; width: 100%; table-layout: fixed; }
.lohakr td { padding: 0 4px 0 0; vertical-align: top; overflow-wrap: anywhere; }
.lohakr td:first-child { color: var(--lk-muted); white-space: nowrap; width: 78px; }
.lohakr .tag { display: inline-block; margin: 1px 2px; padding: 0 5px; border-radius: 8px; background: var(--lk-field); cursor: pointer; }
.lohakr .tag.copied { background: #364; }
.lohakr .warn { color: #f0b060; overflow-wrap: anywhere; }
.lohakr .err { color: var(--error-text, #ff7070); overflow-wrap: anywhere; }
.lohakr-status:empty { display: none; }
.lohakr summary { cursor: pointer; color: var(--lk-muted); user-select: none; }
.lohakr details[open] > summary { margin-bottom: 3px; }
/* report strip: two lines of groups, each a caption over cells labelled with short numbers */
.lohakr .strip { margin: 3px 0; display: flex; flex-direction: column; gap: 3px; }
.lohakr .strip-line { display: flex; gap: 6px; }
.lohakr .strip-group { display: flex; flex-direction: column; min-width: max-content; }
.lohakr .strip-caption { font-size: 9px; line-height: 11px; color: var(--lk-muted); letter-spacing: .04em; white-space: nowrap; }
.lohakr .strip-cells { display: flex; gap: 1px; }
.lohakr .cell { flex: 1 1 0; min-width: 12px; height: 16px; border-radius: 2px; font: 600 10px/16px Inter, Arial, sans-serif;
  text-align: center; color: #fff; white-space: nowrap; overflow: hidden; }
.lohakr-far .lohakr .cell { font-size: 14px; } .lohakr-far .lohakr .strip-caption { font-size: 12px; line-height: 14px; }
.lohakr .cell.ok { background: #3a7d44; } .lohakr .cell.partial { background: #a07a22; }
.lohakr .cell.none { background: #9b3838; } .lohakr .cell.empty { background: #3a3a3a; color: var(--lk-muted); }
/* controls in the frontend's look: rounded dark fields, thin slider track, pill toggles */
.lohakr select, .lohakr input[type=number], .lohakr input[type=text], .lohakr button {
  font: 11px Inter, Arial, sans-serif; background: var(--lk-field); color: var(--lk-fg); border: 1px solid var(--lk-border);
  border-radius: 4px; height: 20px; min-width: 0; margin: 0; }
.lohakr input[type=number], .lohakr input[type=text] { padding: 0 4px; }
.lohakr input[type=number] { -moz-appearance: textfield; text-align: right; }
.lohakr input[type=number]::-webkit-inner-spin-button, .lohakr input[type=number]::-webkit-outer-spin-button { -webkit-appearance: none; margin: 0; }
.lohakr button { cursor: pointer; padding: 0 6px; } .lohakr button:hover, .lohakr select:hover { border-color: var(--lk-muted); }
.lohakr input[type=range] { -webkit-appearance: none; appearance: none; width: 100%; height: 14px; margin: 0; background: transparent; }
.lohakr input[type=range]::-webkit-slider-runnable-track { height: 4px; border-radius: 2px; background: var(--lk-field); }
.lohakr input[type=range]::-webkit-slider-thumb { -webkit-appearance: none; width: 10px; height: 10px; margin-top: -3px;
  border-radius: 50%; background: var(--lk-fg); border: none; }
.lohakr input[type=range]::-moz-range-track { height: 4px; border-radius: 2px; background: var(--lk-field); }
.lohakr input[type=range]::-moz-range-thumb { width: 10px; height: 10px; border-radius: 50%; background: var(--lk-fg); border: none; }
.lohakr input.toggle { -webkit-appearance: none; appearance: none; width: 26px; height: 14px; border-radius: 7px; margin: 0;
  background: var(--lk-field); border: 1px solid var(--lk-border); position: relative; cursor: pointer; flex: none; }
.lohakr input.toggle::after { content: ""; position: absolute; top: 1px; left: 1px; width: 10px; height: 10px; border-radius: 50%;
  background: var(--lk-muted); transition: left .12s; }
.lohakr input.toggle:checked { background: var(--lk-accent); border-color: var(--lk-accent); }
.lohakr input.toggle:checked::after { left: 13px; background: #fff; }
/* block-weight editor */
.lohakr .bw-tools { display: flex; gap: 4px; margin-bottom: 3px; }
.lohakr .bw-tools select { flex: 1 1 0; } .lohakr .bw-tools input[type=text] { flex: 2 1 0; }
.lohakr .bw-grid { display: grid; grid-template-columns: 40px minmax(0, 1fr) 30px 40px minmax(0, 1fr) 30px; gap: 0 4px; align-items: center; }
.lohakr .bw-grid > span { white-space: nowrap; overflow: hidden; font-size: 10px; }
.lohakr .bw-grid > .bw-value { text-align: right; font-variant-numeric: tabular-nums; }
/* stack rows: one line each */
.lohakr .row { display: flex; align-items: center; gap: 4px; height: 24px; border-radius: 4px; padding: 0 2px; }
.lohakr .row.off > :not(.handle):not(.toggle) { opacity: .45; }
.lohakr .row.dragging { background: var(--lk-field); } .lohakr .row.drop-before { box-shadow: 0 -2px 0 var(--lk-accent); }
.lohakr .row.drop-after { box-shadow: 0 2px 0 var(--lk-accent); }
.lohakr .row .handle { flex: none; width: 10px; cursor: grab; color: var(--lk-muted); text-align: center; user-select: none; touch-action: none; }
.lohakr .row select { flex: 1 1 0; width: 0; }
.lohakr .row input[type=number] { flex: none; width: 40px; }
.lohakr .row .chip { flex: none; width: 58px; height: 18px; padding: 0 4px; border-radius: 9px; font-size: 10px; overflow: hidden;
  white-space: nowrap; text-overflow: ellipsis; color: var(--lk-muted); }
.lohakr .row .chip.set { color: var(--lk-fg); border-color: var(--lk-accent); } .lohakr .row .chip.bad { color: var(--error-text, #ff7070); border-color: currentColor; }
.lohakr .row-editor { margin: 0 0 4px 16px; padding: 3px 4px; border-left: 2px solid var(--lk-accent); }
.lohakr .rows-head { display: flex; gap: 4px; color: var(--lk-muted); font-size: 9px; padding: 0 2px; }
.lohakr .rows-head span { flex: none; } .lohakr .rows-head .grow { flex: 1 1 0; }
.lohakr .lohakr-add-row { margin-top: 3px; width: 100%; }
.lohakr-menu { position: fixed; z-index: 10000; min-width: 120px; padding: 3px 0; font: 12px Inter, Arial, sans-serif;
  background: var(--comfy-menu-bg, #353535); color: var(--fg-color, #ddd); border: 1px solid var(--border-color, #4e4e4e);
  border-radius: 6px; box-shadow: 0 4px 12px #0008; }
.lohakr-menu div { padding: 3px 12px; cursor: pointer; } .lohakr-menu div:hover { background: var(--content-hover-bg, #444); }
.lohakr-menu div.disabled { opacity: .4; pointer-events: none; }
`;

function injectCss() {
  if (document.getElementById("lohakr-css")) return;
  const style = document.createElement("style");
  style.id = "lohakr-css";
  style.textContent = CSS;
  document.head.append(style);
}

const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
};
const widgetOf = (node, name) => node.widgets?.find((w) => w.name === name);

// ---- panels that size themselves to their content ------------------------------------------------
// Each panel is a DOM widget whose element holds one body. The height the frontend gives the widget is
// the body's natural height (plus the panel's padding and the widget margin), measured from the body,
// never from the element the frontend sizes, so panels shrink as well as grow. A ResizeObserver on the
// body re-fits the node whenever content changes (re-render, <details> toggled, text re-wrapped).
const MARGIN = 4;
const PAD = 8 + 2; // .lohakr vertical padding (4 + 4) plus rounding slack

function redraw(node) {
  node.setDirtyCanvas?.(true, true);
  node.graph?.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas?.(true, true);
}

function fit(node) {
  if (node.lohakrFitting) return;
  node.lohakrFitting = true;
  requestAnimationFrame(() => {
    node.lohakrFitting = false;
    const size = node.computeSize();
    const width = Math.max(node.size[0], size[0]);
    if (Math.abs(node.size[1] - size[1]) > 0.5 || width !== node.size[0]) node.setSize([width, size[1]]);
    redraw(node);
  });
}

// Below 80 % zoom the report strip switches to larger labels (the body class works in both renderers;
// the canvas renderer calls onDraw on every frame, the Vue one is covered by a slow poll).
function checkZoom() {
  const far = (app.canvas?.ds?.scale ?? 1) < 0.8;
  if (document.body.classList.contains("lohakr-far") !== far) document.body.classList.toggle("lohakr-far", far);
}
setInterval(checkZoom, 250);

function addPanel(node, name, className) {
  const element = el("div", { className: `lohakr ${className}` });
  const body = el("div", { className: "lohakr-body" });
  element.append(body);
  let height = 24;
  const measure = () => {
    if (body.isConnected && body.offsetParent !== null) height = Math.ceil(body.offsetHeight) + PAD;
    return height + 2 * MARGIN;
  };
  const widget = node.addDOMWidget(name, "lohakr-" + className, element, {
    serialize: false, hideOnZoom: false, margin: MARGIN, getMinHeight: measure, getMaxHeight: measure,
    onDraw: checkZoom,
  });
  widget.serialize = false;
  let last = -1;
  new ResizeObserver(() => {
    const h = body.offsetHeight;
    if (!h || h === last) return;
    last = h;
    measure();
    fit(node);
  }).observe(body);
  body.panel = element;
  return body;
}

// ---- adapter card ------------------------------------------------------------------------------
const infoCache = new Map();

async function fetchInfo(name) {
  if (!infoCache.has(name)) {
    infoCache.set(name, (async () => {
      const response = await api.fetchApi(`/lohakr/info?name=${encodeURIComponent(name)}`);
      const data = await response.json();
      if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
      return data;
    })().catch((err) => { infoCache.delete(name); return { error: err.message }; }));
  }
  return infoCache.get(name);
}

function renderCard(state) {
  const { element, info, runWarning } = state;
  element.replaceChildren();
  if (!info) { element.append(el("div", { className: "lohakr-status", textContent: "choose an adapter file" })); return; }
  if (info.error) { element.append(el("div", { className: "err lohakr-status", textContent: info.error })); return; }
  const card = core.formatCard(info);
  element.append(el("h4", { textContent: card.title }));
  const table = el("table");
  for (const [label, value] of card.lines) table.append(el("tr", {}, el("td", { textContent: label }), el("td", { textContent: value })));
  element.append(table);
  if (card.tags.length) {
    const tags = el("div", { title: "click a tag to copy it" });
    for (const { tag, count } of card.tags) {
      const chip = el("span", { className: "tag", textContent: `${tag} ${count}` });
      chip.onclick = () => {
        navigator.clipboard?.writeText(tag).catch(() => {});
        chip.classList.add("copied");
        setTimeout(() => chip.classList.remove("copied"), 800);
      };
      tags.append(chip);
    }
    element.append(tags);
  }
  for (const warning of [runWarning, ...card.warnings].filter(Boolean)) {
    element.append(el("div", { className: "warn lohakr-status", textContent: warning }));
  }
}

function setupCard(node) {
  const state = { element: addPanel(node, "lohakr_card", "card"), info: null, runWarning: null };
  node.lohakrCard = state;
  const nameWidget = widgetOf(node, "lora_name");
  const refresh = async () => {
    const name = nameWidget?.value;
    state.runWarning = null;
    state.info = !name || name === "None" ? null : await fetchInfo(name);
    renderCard(state);
    node.lohakrEditor?.setFamily(state.info?.base_model);
    fit(node);
  };
  if (nameWidget) {
    const callback = nameWidget.callback;
    nameWidget.callback = function (...args) { const r = callback?.apply(this, args); refresh(); return r; };
  }
  state.refresh = refresh;
  refresh();
}

// ---- report ------------------------------------------------------------------------------------
function renderStrip(report) {
  const strip = el("div", { className: "strip" });
  for (const line of core.stripLines(core.reportStrip(report))) {
    const row = el("div", { className: "strip-line" });
    for (const { group, cells } of line) {
      const box = el("div", { className: "strip-group" });
      box.style.flex = `${cells.length} 1 0`;
      const cellRow = el("div", { className: "strip-cells" });
      for (const cell of cells) {
        cellRow.append(el("div", { className: `cell ${cell.state}`, textContent: cell.label,
          title: `${cell.block}: ${cell.applied} applied, ${cell.unmatched} unmatched, ${cell.mismatched} mismatched, ${cell.unsupported} unsupported` +
            (cell.duplicate ? `, ${cell.duplicate} duplicate` : "") }));
      }
      box.append(el("div", { className: "strip-caption", textContent: group === "?" ? "other keys" : group.toLowerCase() === "other" ? "other" : group }), cellRow);
      row.append(box);
    }
    strip.append(row);
  }
  return strip;
}

/** The save node's result: the file written, then per module how it was converted (worst errors first). */
function renderSaved(node, saved) {
  const element = node.lohakrSaved ?? (node.lohakrSaved = addPanel(node, "lohakr_saved", "report"));
  element.replaceChildren(el("div", { className: "lohakr-status", textContent: `saved ${saved.file}` }));
  for (const line of saved.report.split("\n")) element.append(el("div", { textContent: line }));
}

function renderReports(node, reports) {
  const element = node.lohakrReport ?? (node.lohakrReport = addPanel(node, "lohakr_report", "report"));
  element.replaceChildren();
  for (const report of reports) {
    const counts = report.counts || {};
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    element.append(el("div", { className: "lohakr-status", textContent: `${report.adapter}: ${counts.applied || 0}/${total} applied on ${report.model_family}` }));
    element.append(renderStrip(report));
    const missing = core.notApplied(report);
    if (missing.length) {
      const details = el("details", {}, el("summary", { className: "warn", textContent: `${missing.length} not applied` }));
      for (const line of missing.slice(0, 200)) details.append(el("div", { textContent: line }));
      element.append(details);
    }
    for (const warning of report.warnings || []) element.append(el("div", { className: "warn lohakr-status", textContent: warning }));
    const card = node.lohakrCard;
    if (card?.info && !card.info.error) {
      card.runWarning = core.baseModelWarning(card.info.base_model, report.model_family);
      renderCard(card);
    }
  }
  fit(node);
}

// ---- block-weight editor -----------------------------------------------------------------------
// One editor component, used for the node's block_weights widget and for each stack row's chip:
// preset and layout pickers (and, for rows, the spec as text), a two-column slider grid, a status line.
function blockWeightEditor({ read, write, text = false, onChange = () => {} }) {
  const state = { family: "sdxl", weights: core.parseBlockWeights("", "sdxl").weights, sliders: {} };
  const status = el("div", { className: "lohakr-status" });
  const preset = el("select", { title: "preset" }, el("option", { value: "", textContent: "preset…" }),
    ...core.PRESET_NAMES.map((p) => el("option", { value: p, textContent: p })));
  const family = el("select", { title: "layout" }, ...Object.entries(core.FAMILY_NAMES).filter(([id]) => id !== "sd2")
    .map(([id, name]) => el("option", { value: id, textContent: name })));
  const input = text ? el("input", { type: "text", className: "bw-text", placeholder: "e.g. IN04=0.5, OUT=0", title: "block weights" }) : null;
  const grid = el("div", { className: "bw-grid" });
  const tools = el("div", { className: "bw-tools" }, input, preset, family);
  // Sliders and presets rewrite the text field too; typing in it only rewrites the sliders.
  const put = (value, typed = false) => { write(value); if (input && !typed) input.value = read() ?? ""; refresh(); onChange(); };
  if (input) input.onchange = () => put(input.value, true);
  const build = () => {
    grid.replaceChildren();
    state.sliders = {};
    for (const block of core.layoutFor(state.family)) {
      const value = el("span", { className: "bw-value", textContent: "1" });
      const slider = el("input", { type: "range", min: -1, max: 2, step: 0.05, value: 1, title: block });
      slider.dataset.block = block;
      slider.oninput = () => {
        state.weights[block] = Number(slider.value);
        value.textContent = String(Number(slider.value));
        put(core.formatBlockWeights(state.weights, state.family));
      };
      state.sliders[block] = { slider, value };
      grid.append(el("span", { textContent: block }), slider, value);
    }
  };
  const refresh = () => {
    const current = read() ?? "";
    if (input && document.activeElement !== input) input.value = current;
    const parsed = core.parseBlockWeights(current, state.family);
    api_.valid = parsed.ok;
    if (!parsed.ok) {
      status.className = "err lohakr-status";
      status.textContent = `invalid block weights: ${parsed.error}`;
      return parsed;
    }
    state.weights = parsed.weights;
    for (const [block, { slider, value }] of Object.entries(state.sliders)) {
      slider.value = String(parsed.weights[block] ?? 1);
      value.textContent = String(parsed.weights[block] ?? 1);
    }
    status.className = parsed.omitted.length ? "warn lohakr-status" : "lohakr-status";
    status.textContent = parsed.omitted.length ? `vector leaves ${parsed.omitted.join(", ")} at 0` :
      (parsed.kind === "empty" ? "" : `block weights: ${parsed.kind}`);
    return parsed;
  };
  preset.onchange = () => { if (preset.value) put(preset.value); preset.value = ""; };
  family.onchange = () => { state.family = family.value; build(); refresh(); };
  const api_ = {
    tools, grid, status, valid: true, refresh,
    setFamily(base) {
      const next = base === "sd2" ? "sd1" : (core.LAYOUTS[base] ? base : "sdxl");
      if (next !== state.family) { state.family = next; family.value = next; build(); refresh(); }
    },
  };
  build();
  return api_;
}

function setupEditor(node) {
  const textWidget = widgetOf(node, "block_weights");
  if (!textWidget) return;
  const body = addPanel(node, "lohakr_block_editor", "editor");
  const editor = blockWeightEditor({
    read: () => textWidget.value,
    write: (text) => { textWidget.value = text; textWidget.callback?.(text); },
    onChange: () => redraw(node),
  });
  const details = el("details", {}, el("summary", { textContent: "block weights" }), editor.tools, editor.grid);
  body.append(details, editor.status);
  const refresh = () => { const parsed = editor.refresh(); body.panel.dataset.valid = String(parsed.ok); redraw(node); };
  const callback = textWidget.callback;
  textWidget.callback = function (...args) { const r = callback?.apply(this, args); refresh(); return r; };
  node.lohakrEditor = { refresh, setFamily: (base) => { editor.setFamily(base); refresh(); } };
  refresh();
}

// ---- stack rows --------------------------------------------------------------------------------
let openMenu = null;
function closeMenu() { openMenu?.remove(); openMenu = null; }
function showMenu(x, y, items) {
  closeMenu();
  const menu = el("div", { className: "lohakr-menu" });
  for (const { label, action, disabled, id } of items) {
    const item = el("div", { textContent: label, className: disabled ? "disabled" : "" });
    item.dataset.action = id;
    item.onpointerdown = (e) => e.stopPropagation();
    item.onclick = (e) => { e.stopPropagation(); closeMenu(); action(); };
    menu.append(item);
  }
  menu.style.left = `${x}px`;
  menu.style.top = `${y}px`;
  document.body.append(menu);
  openMenu = menu;
  setTimeout(() => {
    const away = (e) => { if (!menu.contains(e.target)) { closeMenu(); document.removeEventListener("pointerdown", away, true); } };
    document.addEventListener("pointerdown", away, true);
  });
  return menu;
}
document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeMenu(); });

function setupRows(node) {
  const rowsWidget = widgetOf(node, "rows");
  if (!rowsWidget) return;
  rowsWidget.hidden = true;
  if (rowsWidget.element) rowsWidget.element.style.display = "none";
  if (rowsWidget.inputEl) rowsWidget.inputEl.style.display = "none";
  rowsWidget.computeSize = () => [0, -4];
  const body = addPanel(node, "lohakr_rows", "rows");
  const names = () => (widgetOf(node, "lora_name")?.options?.values || []).filter((n) => n !== "None");
  let rows = [];
  let editing = null; // the row object whose block-weight editor is open
  const save = () => { rowsWidget.value = core.formatRows(rows); rowsWidget.callback?.(rowsWidget.value); render(); redraw(node); };
  const move = (from, to) => {
    if (to < 0 || to >= rows.length || from === to) return;
    const copy = rows.slice();
    const [row] = copy.splice(from, 1);
    copy.splice(to, 0, row);
    rows = copy;
    save();
  };
  const menuFor = (i, x, y) => showMenu(x, y, [
    { id: "up", label: "Move up", disabled: i === 0, action: () => { rows = core.moveRow(rows, i, -1); save(); } },
    { id: "down", label: "Move down", disabled: i === rows.length - 1, action: () => { rows = core.moveRow(rows, i, 1); save(); } },
    { id: "blocks", label: "Block weights…", action: () => { editing = editing === rows[i] ? null : rows[i]; render(); } },
    { id: "remove", label: "Remove", action: () => { if (editing === rows[i]) editing = null; rows.splice(i, 1); save(); } },
  ]);
  const dragFrom = (handle, line, i) => {
    handle.onpointerdown = (e) => {
      if (e.button !== 0) return;
      e.preventDefault();
      e.stopPropagation();
      handle.setPointerCapture?.(e.pointerId);
      const lines = [...body.querySelectorAll(".row")];
      let target = i;
      line.classList.add("dragging");
      const over = (ev) => {
        // j: where the row would be inserted among the current lines; target: its index after removal.
        let j = lines.findIndex((l) => { const r = l.getBoundingClientRect(); return ev.clientY < r.top + r.height / 2; });
        if (j === -1) j = lines.length;
        target = j > i ? j - 1 : j;
        lines.forEach((l) => l.classList.remove("drop-before", "drop-after"));
        if (target !== i) {
          if (j < lines.length) lines[j].classList.add("drop-before");
          else lines[lines.length - 1].classList.add("drop-after");
        }
      };
      const up = () => {
        handle.removeEventListener("pointermove", over);
        handle.removeEventListener("pointerup", up);
        handle.removeEventListener("pointercancel", up);
        lines.forEach((l) => l.classList.remove("drop-before", "drop-after", "dragging"));
        move(i, target);
      };
      handle.addEventListener("pointermove", over);
      handle.addEventListener("pointerup", up);
      handle.addEventListener("pointercancel", up);
    };
  };
  const render = () => {
    body.replaceChildren();
    if (rows.length) {
      body.append(el("div", { className: "rows-head" }, el("span", { style: "width:42px" }), el("span", { className: "grow", textContent: "adapter" }),
        el("span", { style: "width:40px;text-align:right", textContent: "model" }), el("span", { style: "width:40px;text-align:right", textContent: "clip" }),
        el("span", { style: "width:58px;text-align:center", textContent: "blocks" })));
    }
    rows.forEach((row, i) => {
      const handle = el("span", { className: "handle", textContent: "⠿", title: "drag to reorder; right-click for more" });
      const enabled = el("input", { type: "checkbox", className: "toggle", checked: row.enabled, title: "enabled" });
      enabled.onchange = () => { row.enabled = enabled.checked; save(); };
      const name = el("select", { title: row.name }, ...[...new Set([row.name, ...names()])].filter(Boolean)
        .map((n) => el("option", { value: n, textContent: n.replace(/\.safetensors$/, ""), selected: n === row.name })));
      name.onchange = () => { row.name = name.value; save(); };
      const num = (key, title) => {
        const input = el("input", { type: "number", step: 0.05, value: row[key], title });
        input.onchange = () => { row[key] = Number(input.value); save(); };
        return input;
      };
      const parsed = core.parseBlockWeights(row.block_weights, "sdxl");
      const parsedSd1 = parsed.ok ? parsed : core.parseBlockWeights(row.block_weights, "sd1");
      const chip = el("button", { className: `chip${row.block_weights ? " set" : ""}${parsedSd1.ok ? "" : " bad"}`,
        textContent: core.chipText(row.block_weights), title: row.block_weights ? `block weights: ${row.block_weights}` : "block weights (all 1)" });
      chip.onclick = () => { editing = editing === row ? null : row; render(); };
      const line = el("div", { className: `row${row.enabled ? "" : " off"}` }, handle, enabled, name,
        num("strength_model", "model strength"), num("strength_clip", "clip strength"), chip);
      line.oncontextmenu = (e) => { e.preventDefault(); e.stopPropagation(); menuFor(i, e.clientX, e.clientY); };
      dragFrom(handle, line, i);
      body.append(line);
      if (editing === row) {
        const editor = blockWeightEditor({
          read: () => row.block_weights,
          write: (text) => { row.block_weights = text; rowsWidget.value = core.formatRows(rows); },
          text: true,
          onChange: () => {
            chip.textContent = core.chipText(row.block_weights);
            chip.className = `chip${row.block_weights ? " set" : ""}${editor.valid ? "" : " bad"}`;
            redraw(node);
          },
        });
        editor.setFamily(node.lohakrCard?.info?.base_model);
        editor.refresh();
        body.append(el("div", { className: "row-editor" }, editor.tools, editor.grid, editor.status));
      }
    });
    const add = el("button", { textContent: "+ add adapter", className: "lohakr-add-row" });
    add.onclick = () => {
      rows.push({ name: names()[0] || "", strength_model: 1, strength_clip: 1, block_weights: "", enabled: true });
      save();
    };
    body.append(add);
    fit(node);
  };
  node.lohakrRows = {
    load() {
      try { rows = core.parseRows(rowsWidget.value); } catch { rows = []; }
      editing = null;
      render();
    },
  };
  node.lohakrRows.load();
}

app.registerExtension({
  name: "lohakr.ui",
  async setup() { injectCss(); },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!ALL_NODES.includes(nodeData.name)) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = created?.apply(this, args);
      injectCss();
      if (CARD_NODES.includes(nodeData.name)) setupCard(this);
      if (EDITOR_NODES.includes(nodeData.name)) setupEditor(this);
      if (nodeData.name === "LohakrStack") setupRows(this);
      fit(this);
      return result;
    };
    const configured = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (...args) {
      const result = configured?.apply(this, args);
      this.lohakrCard?.refresh();
      this.lohakrEditor?.refresh();
      this.lohakrRows?.load();
      return result;
    };
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = executed?.apply(this, arguments);
      try {
        if (message?.lohakr_report?.[0]) renderReports(this, JSON.parse(message.lohakr_report[0]));
        if (message?.lohakr_saved?.[0]) renderSaved(this, JSON.parse(message.lohakr_saved[0]));
        if (message?.lohakr_info?.[0]) {
          const data = JSON.parse(message.lohakr_info[0]);
          if (data.coverage && !data.coverage.error) renderReports(this, [{ ...data.coverage, adapter: data.adapter.name }]);
        }
      } catch (err) {
        console.warn("lohakr: could not show the report", err);
      }
      return result;
    };
  },
});
