// Drive real ComfyUI (its real frontend) in headless Chromium with playwright-core and check our
// extension: no console errors from it, nodes can be added, the card, the block-weight editor
// (surviving a workflow save/reload), stack rows (context menu, drag handle, block-weight chip), the
// report after queueing, and a layout check of every panel in every view (see layoutCheck below).
// Usage: node drive.mjs <comfy url> <out dir> <lora file name> [canvas|vue]   (prints one JSON line)
// "vue" turns on the frontend's Vue "Nodes 2.0" renderer (setting Comfy.VueNodes.Enabled).
import { chromium } from "playwright-core";
import fs from "node:fs";
import path from "node:path";

const [url, outDir, lora, view = "canvas"] = process.argv.slice(2);
const vue = view === "vue";
fs.mkdirSync(outDir, { recursive: true });
const result = { view, steps: {}, layout: {}, consoleErrors: [], ourErrors: [] };
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const shot = async (page, name) => page.screenshot({ path: path.join(outDir, `${name}.png`) });
const settle = (page) => page.evaluate(() => new Promise((r) => setTimeout(() => requestAnimationFrame(() => requestAnimationFrame(r)), 250)));

// In-page layout check of one panel (class `cls`) of node `nodeId`: the content's bounding box lies
// inside the panel and the node; nothing scrolls in any direction; the panel is no taller than its
// content plus padding (and not shorter); every status line is on screen, inside the panel and on top.
function installLayoutCheck() {
  window.__lohakrLayout = (nodeId, cls, vue) => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const node = app.graph.getNodeById(nodeId);
    const panel = node?.widgets?.find((w) => w.element?.classList?.contains("lohakr") && w.element.classList.contains(cls))?.element;
    const problems = [];
    if (!node || !panel) return { problems: [`no ${cls} panel on node ${nodeId}`] };
    const round = (r) => ({ left: Math.round(r.left), top: Math.round(r.top), right: Math.round(r.right), bottom: Math.round(r.bottom) });
    const pr = panel.getBoundingClientRect();
    const scale = pr.width / panel.offsetWidth;
    let nr;
    if (vue) {
      nr = document.querySelector(`.lg-node[data-node-id="${nodeId}"]`)?.getBoundingClientRect();
      if (!nr) return { problems: ["no Vue node element"] };
    } else {
      const c = app.canvas.canvas.getBoundingClientRect();
      const [x0, y0] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1]]);
      const [x1, y1] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0], node.pos[1] + node.size[1]]);
      nr = { left: c.left + x0, top: c.top + y0, right: c.left + x1, bottom: c.top + y1 };
    }
    const tol = 1.5;
    const inside = (r, box) => r.left >= box.left - tol && r.top >= box.top - tol && r.right <= box.right + tol && r.bottom <= box.bottom + tol;
    const content = { left: Infinity, top: Infinity, right: -Infinity, bottom: -Infinity };
    for (const e of panel.querySelectorAll("*")) {
      if (e.checkVisibility && !e.checkVisibility({ visibilityProperty: true })) continue; // e.g. inside a closed <details>
      const r = e.getBoundingClientRect();
      if (r.width <= 0 || r.height <= 0) continue;
      content.left = Math.min(content.left, r.left); content.top = Math.min(content.top, r.top);
      content.right = Math.max(content.right, r.right); content.bottom = Math.max(content.bottom, r.bottom);
      if (!["INPUT", "SELECT", "TEXTAREA", "OPTION", "BUTTON"].includes(e.tagName) && e.clientWidth > 0 &&
        (e.scrollWidth > e.clientWidth + 1 || e.scrollHeight > e.clientHeight + 1)) {
        problems.push(`${e.tagName}.${e.className} overflows: scroll ${e.scrollWidth}x${e.scrollHeight} > client ${e.clientWidth}x${e.clientHeight}`);
      }
    }
    if (panel.scrollWidth > panel.clientWidth + 1 || panel.scrollHeight > panel.clientHeight + 1) {
      problems.push(`panel scrolls: ${panel.scrollWidth}x${panel.scrollHeight} > ${panel.clientWidth}x${panel.clientHeight}`);
    }
    if (content.right > content.left) {
      if (!inside(content, pr)) problems.push(`content ${JSON.stringify(round(content))} outside panel ${JSON.stringify(round(pr))}`);
      if (!inside(content, nr)) problems.push(`content ${JSON.stringify(round(content))} outside node ${JSON.stringify(round(nr))}`);
    }
    if (!inside(pr, nr)) problems.push(`panel ${JSON.stringify(round(pr))} outside node ${JSON.stringify(round(nr))}`);
    const body = panel.querySelector(".lohakr-body");
    const style = getComputedStyle(panel);
    const padding = parseFloat(style.paddingTop) + parseFloat(style.paddingBottom);
    const want = body.offsetHeight + padding;
    if (panel.offsetHeight > want + 6) problems.push(`panel ${panel.offsetHeight}px tall for ${want}px of content (empty space)`);
    if (panel.offsetHeight < want - 0.5) problems.push(`panel ${panel.offsetHeight}px tall for ${want}px of content (clipped)`);
    const statuses = [];
    for (const s of panel.querySelectorAll(".lohakr-status")) {
      if (!s.textContent.trim()) continue;
      const r = s.getBoundingClientRect();
      const hit = document.elementFromPoint((r.left + r.right) / 2, (r.top + r.bottom) / 2);
      const visible = r.height > 0 && inside(r, pr) && inside(r, nr) && panel.contains(hit);
      statuses.push({ text: s.textContent, visible });
      if (!visible) problems.push(`status line not visible: ${s.textContent}`);
    }
    if (!vue) {
      const fitHeight = node.computeSize()[1];
      if (node.size[1] > fitHeight + 2) problems.push(`node ${node.size[1]}px tall, content needs ${fitHeight}px`);
    }
    return { problems, scale: Math.round(scale * 100) / 100, panelHeight: panel.offsetHeight, contentHeight: want,
      nodeHeight: Math.round(nr.bottom - nr.top), statuses };
  };
}
const layout = async (page, name, nodeType, cls) => {
  await settle(page);
  const check = await page.evaluate(({ nodeType, cls, vue }) => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const node = app.graph._nodes.find((n) => n.type === nodeType);
    return window.__lohakrLayout(node.id, cls, vue);
  }, { nodeType, cls, vue });
  result.layout[name] = check;
  return check;
};

try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.on("console", (msg) => {
    if (msg.type() === "error") {
      const text = msg.text();
      result.consoleErrors.push(text);
      if (/lohakr/i.test(text) || /lohakr/.test(msg.location()?.url || "")) result.ourErrors.push(text);
    }
  });
  page.on("pageerror", (err) => {
    result.consoleErrors.push(String(err));
    if (/lohakr/i.test(err.stack || String(err))) result.ourErrors.push(String(err));
  });
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => (window.comfyAPI?.app?.app ?? window.app)?.graph && window.LiteGraph, null, { timeout: 90000 });
  await page.waitForTimeout(1500);
  // Close the first-run template browser so the canvas is visible in screenshots.
  await page.keyboard.press("Escape");
  await page.evaluate(() => document.querySelectorAll(".p-dialog-close-button").forEach((b) => b.click()));
  await page.waitForTimeout(300);
  await page.evaluate(installLayoutCheck);
  result.frontendVersion = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
  result.steps.extensionLoaded = await page.evaluate(() =>
    (window.comfyAPI?.app?.app ?? window.app).extensions.some((e) => e.name === "lohakr.ui"));
  // The renderer is a user setting stored on the server, so set it either way.
  result.steps.vueNodes = await page.evaluate(async (vue) => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    try {
      await app.extensionManager.setting.set("Comfy.VueNodes.Enabled", vue);
    } catch (err) {
      if (vue) throw err;
    }
    await new Promise((r) => setTimeout(r, 500));
    return app.extensionManager.setting.get("Comfy.VueNodes.Enabled") === true;
  }, vue);

  // Add our nodes.
  const added = await page.evaluate(async (lora) => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    app.graph.clear();
    const make = (type, pos) => { const n = window.LiteGraph.createNode(type); n.pos = pos; app.graph.add(n); return n; };
    const tiny = make("LohakrTestTinySDXL", [20, 60]);
    const loader = make("LohakrLoader", [320, 60]);
    const stack = make("LohakrStack", [760, 60]);
    const dump = make("LohakrTestWeightDump", [1200, 60]);
    tiny.connect(0, loader, 0);
    tiny.connect(1, loader, loader.inputs.findIndex((i) => i.name === "clip"));
    loader.connect(0, dump, 0);
    loader.connect(1, dump, 1);
    const w = (node, name) => node.widgets.find((x) => x.name === name);
    w(dump, "path").value = "/tmp/lohakr_browser_dump.safetensors";
    const nameWidget = w(loader, "lora_name");
    nameWidget.value = lora;
    nameWidget.callback?.(lora);
    app.canvas.ds.offset = [0, 0];
    app.canvas.ds.scale = 1;
    app.graph.setDirtyCanvas(true, true);
    return { ids: [tiny.id, loader.id, stack.id, dump.id], types: app.graph._nodes.map((n) => n.type) };
  }, lora);
  result.steps.nodesAdded = added.types.includes("LohakrLoader") && added.types.includes("LohakrStack");

  // The card shows the file.
  const stem = lora.replace(/\.safetensors$/, "");
  await page.waitForFunction((stem) => [...document.querySelectorAll(".lohakr.card h4")].some((h) => h.textContent === stem),
    stem, { timeout: 30000 });
  result.steps.cardText = await page.evaluate(() => document.querySelector(".lohakr.card")?.innerText);
  await layout(page, "card", "LohakrLoader", "card");
  await layout(page, "editor-closed", "LohakrLoader", "editor");
  const closedHeight = await page.evaluate(() => (window.comfyAPI?.app?.app ?? window.app).graph._nodes.find((n) => n.type === "LohakrLoader").size[1]);
  await shot(page, "1-card");

  // The block-weight editor changes the widget value (and redraws the canvas); hand-typed strings
  // round-trip; invalid ones are flagged.
  result.steps.editor = await page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const loader = app.graph._nodes.find((n) => n.type === "LohakrLoader");
    const editor = [...document.querySelectorAll(".lohakr.editor")][0];
    editor.querySelector("details").open = true;
    const slider = editor.querySelector('input[type=range][data-block="IN04"]');
    slider.value = "0.5";
    let redraws = 0;
    const dirty = app.graph.setDirtyCanvas;
    app.graph.setDirtyCanvas = function (...args) { redraws += 1; return dirty.apply(this, args); };
    slider.dispatchEvent(new Event("input"));
    app.graph.setDirtyCanvas = dirty;
    const widget = loader.widgets.find((x) => x.name === "block_weights");
    const afterSlider = widget.value;
    widget.value = "OUTALL, IN08=0.5";
    widget.callback(widget.value);
    const typedKept = widget.value;
    const in08 = editor.querySelector('input[type=range][data-block="IN08"]').value;
    const in00 = editor.querySelector('input[type=range][data-block="IN00"]').value;
    widget.value = "IN99=1";
    widget.callback(widget.value);
    const invalid = { value: widget.value, valid: editor.dataset.valid, status: editor.innerText.includes("invalid") };
    return { afterSlider, typedKept, in08, in00, invalid, redrawnOnSlider: redraws > 0 };
  });
  await layout(page, "editor-invalid", "LohakrLoader", "editor");
  await shot(page, "2-editor-invalid");
  await page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const widget = app.graph._nodes.find((n) => n.type === "LohakrLoader").widgets.find((x) => x.name === "block_weights");
    widget.value = "IN04=0.5";
    widget.callback(widget.value);
  });
  await layout(page, "editor-open", "LohakrLoader", "editor");
  const openHeight = await page.evaluate(() => (window.comfyAPI?.app?.app ?? window.app).graph._nodes.find((n) => n.type === "LohakrLoader").size[1]);
  await shot(page, "2-editor");
  await page.evaluate(() => { document.querySelector(".lohakr.editor details").open = false; });
  await layout(page, "editor-collapsed", "LohakrLoader", "editor");
  const collapsedHeight = await page.evaluate(() => (window.comfyAPI?.app?.app ?? window.app).graph._nodes.find((n) => n.type === "LohakrLoader").size[1]);
  result.steps.editorHeights = { closedHeight, openHeight, collapsedHeight };

  // Stack rows: add three, toggle one, set strengths, move with the context menu, drag with the handle,
  // edit one row's block weights through its chip, remove one with the context menu.
  const panelSel = ".lohakr.rows";
  const rows = () => page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    return JSON.parse(app.graph._nodes.find((n) => n.type === "LohakrStack").widgets.find((w) => w.name === "rows").value);
  });
  const menu = async (rowIndex, action) => {
    const row = page.locator(`${panelSel} .row`).nth(rowIndex);
    await row.locator(".handle").click({ button: "right" });
    await page.locator(`.lohakr-menu div[data-action=${action}]`).click();
    await settle(page);
  };
  for (let i = 0; i < 3; i += 1) await page.evaluate((sel) => document.querySelector(`${sel} .lohakr-add-row`).click(), panelSel);
  await settle(page);
  await page.evaluate((sel) => {
    const panel = document.querySelector(sel);
    const checkbox = panel.querySelectorAll(".row")[1].querySelector("input[type=checkbox]");
    checkbox.checked = false;
    checkbox.dispatchEvent(new Event("change"));
    const strength = panel.querySelectorAll(".row")[0].querySelector("input[type=number]");
    strength.value = "0.25";
    strength.dispatchEvent(new Event("change"));
    const clip = panel.querySelectorAll(".row")[2].querySelectorAll("input[type=number]")[1];
    clip.value = "0.5";
    clip.dispatchEvent(new Event("change"));
  }, panelSel);
  const beforeMove = await rows();
  await menu(1, "up");
  const afterMenu = await rows();
  // Drag the third row (clip 0.5) to the top, then back to the bottom.
  const drag = async (from, toRow, below) => {
    const handle = await page.locator(`${panelSel} .row`).nth(from).locator(".handle").boundingBox();
    const target = await page.locator(`${panelSel} .row`).nth(toRow).boundingBox();
    await page.mouse.move(handle.x + handle.width / 2, handle.y + handle.height / 2);
    await page.mouse.down();
    await page.mouse.move(handle.x + handle.width / 2, target.y + (below ? target.height - 2 : 2), { steps: 5 });
    await page.mouse.up();
    await settle(page);
  };
  await drag(2, 0, false);
  const afterDrag = await rows();
  await drag(0, 2, true);
  const afterDragBack = await rows();
  await page.locator(`${panelSel} .row`).nth(2).locator(".chip").click();
  await settle(page);
  await page.locator(`${panelSel} .row-editor input.bw-text`).fill("IN04=0");
  await page.locator(`${panelSel} .row-editor input.bw-text`).press("Enter");
  await page.evaluate((sel) => document.querySelector(`${sel} .row-editor input.bw-text`).dispatchEvent(new Event("change")), panelSel);
  await page.evaluate((sel) => {
    const slider = document.querySelector(`${sel} .row-editor input[type=range][data-block="OUT01"]`);
    slider.value = "0.5";
    slider.dispatchEvent(new Event("input"));
  }, panelSel);
  const afterChip = await rows();
  await layout(page, "stack-row-editor", "LohakrStack", "rows");
  await shot(page, "3-stack-row-editor");
  await page.locator(`${panelSel} .row`).nth(2).locator(".chip").click();
  await layout(page, "stack-3-rows", "LohakrStack", "rows");
  await shot(page, "3-stack");
  result.steps.stack = {
    beforeMove: beforeMove.map((r) => [r.enabled, r.strength_model, r.strength_clip]),
    afterMenu: afterMenu.map((r) => [r.enabled, r.strength_model, r.strength_clip]),
    afterDrag: afterDrag.map((r) => r.strength_clip),
    afterDragBack: afterDragBack.map((r) => r.strength_clip),
    chip: afterChip[2].block_weights,
    chipText: await page.locator(`${panelSel} .row`).nth(2).locator(".chip").innerText(),
    rowHeights: await page.evaluate((sel) => [...document.querySelectorAll(`${sel} .row`)].map((r) => r.offsetHeight), panelSel),
  };
  await menu(2, "remove");
  result.steps.rows = await rows();

  // Save and reload the workflow: values survive.
  result.steps.reload = await page.evaluate(async () => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const workflow = JSON.parse(JSON.stringify(app.graph.serialize()));
    app.graph.clear();
    await app.loadGraphData(workflow);
    await new Promise((r) => setTimeout(r, 500));
    const loader = app.graph._nodes.find((n) => n.type === "LohakrLoader");
    const stack = app.graph._nodes.find((n) => n.type === "LohakrStack");
    const editor = loader.widgets.find((w) => w.name === "lohakr_block_editor")?.element;
    return {
      blockWeights: loader.widgets.find((w) => w.name === "block_weights").value,
      slider: editor?.querySelector('input[type=range][data-block="IN04"]')?.value,
      rows: JSON.parse(stack.widgets.find((w) => w.name === "rows").value),
      renderedRows: stack.widgets.find((w) => w.name === "lohakr_rows")?.element.querySelectorAll(".row").length,
    };
  });
  await page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    app.canvas.ds.offset = [0, 0];
    app.canvas.ds.scale = 1;
    app.graph.setDirtyCanvas(true, true);
  });
  await layout(page, "reloaded-card", "LohakrLoader", "card");
  await layout(page, "reloaded-stack", "LohakrStack", "rows");
  await shot(page, "3-reloaded");

  // Queue the graph (the stack node is not connected to an output, so it does not run); the report appears.
  await page.evaluate(async () => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const stack = app.graph._nodes.find((n) => n.type === "LohakrStack");
    app.graph.remove(stack);
    await app.queuePrompt(0, 1);
  });
  await page.waitForFunction(() => document.querySelector(".lohakr.report .strip .cell"), null, { timeout: 120000 });
  result.steps.report = await page.evaluate(() => ({
    text: document.querySelector(".lohakr.report").innerText,
    cells: [...document.querySelectorAll(".lohakr.report .cell")].map((c) => `${c.title}|${c.className}`),
  }));
  await layout(page, "report", "LohakrLoader", "report");
  await layout(page, "report-card", "LohakrLoader", "card");
  await shot(page, "4-report");

  // 60 % zoom: the strip's labels still fit their cells and render at a readable size.
  const strip = async () => {
    await settle(page);
    return page.evaluate(() => [...document.querySelectorAll(".lohakr.report .cell, .lohakr.report .strip-caption")].map((c) => {
      const r = c.getBoundingClientRect();
      const px = parseFloat(getComputedStyle(c).fontSize) * (r.width / c.offsetWidth);
      return { text: c.textContent, fits: c.scrollWidth <= c.clientWidth + 0.5, screenPx: Math.round(px * 10) / 10 };
    }));
  };
  result.steps.strip100 = await strip();
  await page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    app.canvas.ds.scale = 0.6;
    app.canvas.ds.offset = [0, 0];
    app.graph.setDirtyCanvas(true, true);
  });
  result.steps.strip60 = await strip();
  await layout(page, "report-60", "LohakrLoader", "report");
  await shot(page, "5-report-60");
  await page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    app.canvas.ds.scale = 1.5;
    app.canvas.ds.offset = [-300, -100];
    app.graph.setDirtyCanvas(true, true);
  });
  await settle(page);
  await shot(page, "6-report-150");
  if (vue) {
    await page.evaluate(() => (window.comfyAPI?.app?.app ?? window.app).extensionManager.setting.set("Comfy.VueNodes.Enabled", false));
  }
} catch (err) {
  result.error = String(err.stack || err);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
