// lohakr ComfyUI extension: an adapter card, the load report per block, a block-weight editor and
// stack rows on our nodes. Logic lives in lohakr_core.js; this file only builds DOM widgets.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import * as core from "./lohakr_core.js";

const CARD_NODES = ["LohakrLoader", "LohakrLoaderModelOnly", "LohakrStack", "LohakrInfo"];
const REPORT_NODES = ["LohakrLoader", "LohakrLoaderModelOnly", "LohakrApplyStack", "LohakrInfo"];
const EDITOR_NODES = ["LohakrLoader", "LohakrLoaderModelOnly", "LohakrStack"];
const ALL_NODES = [...new Set([...CARD_NODES, ...REPORT_NODES, ...EDITOR_NODES])];

const CSS = `
.lohakr { font: 11px/1.35 sans-serif; color: var(--input-text, #ddd); padding: 4px 6px; box-sizing: border-box;
  overflow: auto; background: var(--comfy-input-bg, #222); border-radius: 6px; }
.lohakr h4 { margin: 0 0 3px; font-size: 12px; }
.lohakr table { border-collapse: collapse; width: 100%; }
.lohakr td { padding: 0 4px 0 0; vertical-align: top; }
.lohakr td:first-child { opacity: .7; white-space: nowrap; }
.lohakr .tag { display: inline-block; margin: 1px 2px; padding: 0 5px; border-radius: 8px; background: #445; cursor: pointer; }
.lohakr .tag.copied { background: #364; }
.lohakr .warn { color: #f0b060; }
.lohakr .err { color: #ff7070; }
.lohakr .strip { display: flex; gap: 1px; margin: 3px 0; }
.lohakr .cell { flex: 1; height: 14px; min-width: 6px; border-radius: 2px; font-size: 8px; text-align: center; overflow: hidden; }
.lohakr .cell.ok { background: #3a7d44; } .lohakr .cell.partial { background: #b08a2e; }
.lohakr .cell.none { background: #9b3838; } .lohakr .cell.empty { background: #333; }
.lohakr .bw-grid { display: grid; grid-template-columns: 44px 1fr 34px; gap: 0 4px; align-items: center; }
.lohakr .bw-grid input[type=range] { width: 100%; height: 12px; margin: 0; }
.lohakr select, .lohakr input[type=number], .lohakr input[type=text] { font-size: 11px; background: #333; color: inherit;
  border: 1px solid #555; border-radius: 3px; }
.lohakr .rows td { padding: 1px 2px; } .lohakr .rows input[type=number] { width: 46px; }
.lohakr .rows select { max-width: 130px; } .lohakr button { font-size: 11px; padding: 0 4px; }
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

function addPanel(node, name, className) {
  const element = el("div", { className: `lohakr ${className}` });
  const widget = node.addDOMWidget(name, "lohakr-" + className, element, {
    serialize: false, hideOnZoom: false, getMinHeight: () => Math.min(Math.max(element.scrollHeight, 20), 420),
  });
  widget.serialize = false;
  return element;
}

function resize(node) {
  requestAnimationFrame(() => {
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0], 340), size[1]]);
    node.setDirtyCanvas?.(true, true);
  });
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
  if (!info) { element.append(el("div", { textContent: "choose an adapter file" })); return; }
  if (info.error) { element.append(el("div", { className: "err", textContent: info.error })); return; }
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
  for (const warning of [runWarning, ...card.warnings].filter(Boolean)) element.append(el("div", { className: "warn", textContent: warning }));
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
    resize(node);
  };
  if (nameWidget) {
    const callback = nameWidget.callback;
    nameWidget.callback = function (...args) { const r = callback?.apply(this, args); refresh(); return r; };
  }
  state.refresh = refresh;
  refresh();
}

// ---- report ------------------------------------------------------------------------------------
function renderReports(node, reports) {
  const element = node.lohakrReport ?? (node.lohakrReport = addPanel(node, "lohakr_report", "report"));
  element.replaceChildren();
  for (const report of reports) {
    const counts = report.counts || {};
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    element.append(el("div", { textContent: `${report.adapter}: ${counts.applied || 0}/${total} applied on ${report.model_family}` }));
    const strip = el("div", { className: "strip" });
    for (const cell of core.reportStrip(report)) {
      strip.append(el("div", { className: `cell ${cell.state}`, textContent: cell.block.replace(/^(IN|OUT)0?/, "$1"),
        title: `${cell.block}: ${cell.applied} applied, ${cell.unmatched} unmatched, ${cell.mismatched} mismatched, ${cell.unsupported} unsupported` +
          (cell.duplicate ? `, ${cell.duplicate} duplicate` : "") }));
    }
    element.append(strip);
    const missing = core.notApplied(report);
    if (missing.length) {
      const details = el("details", {}, el("summary", { className: "warn", textContent: `${missing.length} not applied` }));
      for (const line of missing.slice(0, 200)) details.append(el("div", { textContent: line }));
      element.append(details);
    }
    for (const warning of report.warnings || []) element.append(el("div", { className: "warn", textContent: warning }));
    const card = node.lohakrCard;
    if (card?.info && !card.info.error) {
      card.runWarning = core.baseModelWarning(card.info.base_model, report.model_family);
      renderCard(card);
    }
  }
  resize(node);
}

// ---- block-weight editor -----------------------------------------------------------------------
function setupEditor(node) {
  const textWidget = widgetOf(node, "block_weights");
  if (!textWidget) return;
  const element = addPanel(node, "lohakr_block_editor", "editor");
  const state = { family: "sdxl", weights: core.parseBlockWeights("", "sdxl").weights, sliders: {} };
  const status = el("div");
  const preset = el("select", { title: "preset" }, el("option", { value: "", textContent: "preset…" }),
    ...core.PRESET_NAMES.map((p) => el("option", { value: p, textContent: p })));
  const family = el("select", { title: "layout" }, el("option", { value: "sdxl", textContent: "SDXL" }),
    el("option", { value: "sd1", textContent: "SD1.5" }));
  const grid = el("div", { className: "bw-grid" });
  const toggle = el("details", {}, el("summary", { textContent: "block weights" }), el("div", {}, preset, " ", family), grid);
  element.append(toggle, status);
  toggle.addEventListener("toggle", () => resize(node));

  const write = (text) => {
    textWidget.value = text;
    textWidget.callback?.(text);
    fromText();
  };
  const build = () => {
    grid.replaceChildren();
    state.sliders = {};
    for (const block of core.layoutFor(state.family)) {
      const value = el("span", { textContent: "1" });
      const slider = el("input", { type: "range", min: -1, max: 2, step: 0.05, value: 1, title: block });
      slider.dataset.block = block;
      slider.oninput = () => {
        state.weights[block] = Number(slider.value);
        value.textContent = String(Number(slider.value));
        write(core.formatBlockWeights(state.weights, state.family));
      };
      state.sliders[block] = { slider, value };
      grid.append(el("span", { textContent: block }), slider, value);
    }
  };
  const fromText = () => {
    const parsed = core.parseBlockWeights(textWidget.value ?? "", state.family);
    element.dataset.valid = String(parsed.ok);
    if (!parsed.ok) {
      status.className = "err";
      status.textContent = `invalid block weights: ${parsed.error}`;
      return;
    }
    state.weights = parsed.weights;
    for (const [block, { slider, value }] of Object.entries(state.sliders)) {
      slider.value = String(parsed.weights[block] ?? 1);
      value.textContent = String(parsed.weights[block] ?? 1);
    }
    status.className = parsed.omitted.length ? "warn" : "";
    status.textContent = parsed.omitted.length ? `vector leaves ${parsed.omitted.join(", ")} at 0` :
      (parsed.kind === "empty" ? "" : `block weights: ${parsed.kind}`);
  };
  preset.onchange = () => { if (preset.value) write(preset.value); preset.value = ""; };
  family.onchange = () => { state.family = family.value; build(); fromText(); resize(node); };
  const callback = textWidget.callback;
  textWidget.callback = function (...args) { const r = callback?.apply(this, args); fromText(); return r; };
  node.lohakrEditor = {
    refresh: fromText,
    setFamily(base) {
      const next = base === "sd1" || base === "sd2" ? "sd1" : "sdxl";
      if (next !== state.family) { state.family = next; family.value = next; build(); fromText(); }
    },
  };
  build();
  fromText();
}

// ---- stack rows --------------------------------------------------------------------------------
function setupRows(node) {
  const rowsWidget = widgetOf(node, "rows");
  if (!rowsWidget) return;
  rowsWidget.hidden = true;
  if (rowsWidget.element) rowsWidget.element.style.display = "none";
  if (rowsWidget.inputEl) rowsWidget.inputEl.style.display = "none";
  rowsWidget.computeSize = () => [0, -4];
  const element = addPanel(node, "lohakr_rows", "rows");
  const names = () => (widgetOf(node, "lora_name")?.options?.values || []).filter((n) => n !== "None");
  let rows = [];
  const save = () => { rowsWidget.value = core.formatRows(rows); render(); };
  const render = () => {
    element.replaceChildren();
    const table = el("table", { className: "rows" });
    rows.forEach((row, i) => {
      const enabled = el("input", { type: "checkbox", checked: row.enabled, title: "enabled" });
      enabled.onchange = () => { row.enabled = enabled.checked; save(); };
      const name = el("select", {}, ...[...new Set([row.name, ...names()])].filter(Boolean)
        .map((n) => el("option", { value: n, textContent: n, selected: n === row.name })));
      name.onchange = () => { row.name = name.value; save(); };
      const num = (key, title) => {
        const input = el("input", { type: "number", step: 0.05, value: row[key], title });
        input.onchange = () => { row[key] = Number(input.value); save(); };
        return input;
      };
      const bw = el("input", { type: "text", value: row.block_weights, placeholder: "blocks", title: "block weights" });
      bw.onchange = () => { row.block_weights = bw.value; save(); };
      const button = (text, title, action) => { const b = el("button", { textContent: text, title }); b.onclick = action; return b; };
      table.append(el("tr", {}, el("td", {}, enabled), el("td", {}, name), el("td", {}, num("strength_model", "model")),
        el("td", {}, num("strength_clip", "clip")), el("td", {}, bw),
        el("td", {}, button("↑", "up", () => { rows = core.moveRow(rows, i, -1); save(); }),
          button("↓", "down", () => { rows = core.moveRow(rows, i, 1); save(); }),
          button("✕", "remove", () => { rows.splice(i, 1); save(); }))));
    });
    const add = el("button", { textContent: "+ add adapter", className: "lohakr-add-row" });
    add.onclick = () => {
      rows.push({ name: names()[0] || "", strength_model: 1, strength_clip: 1, block_weights: "", enabled: true });
      save();
    };
    element.append(table, add);
    resize(node);
  };
  node.lohakrRows = {
    load() {
      try { rows = core.parseRows(rowsWidget.value); } catch { rows = []; }
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
      resize(this);
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
