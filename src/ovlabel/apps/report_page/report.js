const D = JSON.parse(document.getElementById('ovlabel-data').textContent);
const pages = {}; let page = 1;
const state = {on: new Set(D.classes.map((_, i) => i)), min: D.default_score};
const color = i => `hsl(${(i * 137.5) % 360},80%,45%)`;
function el(tag, attrs, ...kids) { const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) { if (k === 'text') e.textContent = v; else e.setAttribute(k, v); }
  kids.forEach(k => e.appendChild(k)); return e; }
function visible(d) { return state.on.has(d.c) && d.s >= state.min; }
function draw(canvas, img, entry, scale) {
  const g = canvas.getContext('2d'); g.clearRect(0, 0, canvas.width, canvas.height);
  if (img) g.drawImage(img, 0, 0, canvas.width, canvas.height);
  else { g.fillStyle = '#eee'; g.fillRect(0, 0, canvas.width, canvas.height); }
  g.lineWidth = 1.5; g.font = '11px sans-serif';
  for (const d of entry.dets.filter(visible)) {
    g.strokeStyle = g.fillStyle = color(d.c);
    for (const p of d.p) { g.beginPath(); for (let i = 0; i < p.length; i += 2) g.lineTo(p[i] * scale, p[i + 1] * scale);
      g.closePath(); g.globalAlpha = .3; g.fill(); g.globalAlpha = 1; g.stroke(); }
    const [x, y, w, h] = d.b.map(v => v * scale); g.strokeRect(x, y, w, h);
    const t = `${D.classes[d.c]} ${d.s.toFixed(2)}`; const tw = g.measureText(t).width;
    g.fillRect(x, Math.max(0, y - 13), tw + 4, 13); g.fillStyle = '#fff'; g.fillText(t, x + 2, Math.max(10, y - 3)); }
}
function card(entry) {
  const k = Math.min(4, Math.max(1, 220 / Math.max(entry.tw, entry.th)));  // small images drawn larger
  const c = el('div', {class: 'card', 'data-id': entry.id});
  const canvas = el('canvas', {width: Math.round(entry.tw * k), height: Math.round(entry.th * k)});
  const dets = entry.dets.filter(visible); c.dataset.shown = dets.length;
  let cap = `${entry.file} — ${dets.length} shown`;
  if (entry.gt !== undefined) {
    const hits = dets.filter(d => d.t === 1).length, fp = dets.filter(d => d.t === 0).length;
    const truth = Object.entries(entry.gt).reduce((n, [c, k]) => n + (state.on.has(Number(c)) ? k : 0), 0);
    c.dataset.fp = fp; c.dataset.missed = truth - hits; cap += `, ${fp} FP, ${truth - hits} missed`;
  }
  c.appendChild(canvas); c.appendChild(el('div', {class: 'cap' + (entry.missing ? ' bad' : ''),
    text: entry.missing ? `${entry.file}: ${entry.missing}` : cap, title: entry.file}));
  if (entry.thumb) { const img = new Image(); img.onload = () => { c.dataset.loaded = '1'; draw(canvas, img, entry, k); };
    img.src = entry.thumb; c._img = img; } else draw(canvas, null, entry, k);
  c.onclick = () => openImage(entry, c._img); c._entry = entry; c._canvas = canvas; return c;
}
function render() {
  const g = document.getElementById('gallery'); g.textContent = '';
  const entries = pages[page] || []; let shown = 0;
  for (const e of entries) { const c = card(e); shown += Number(c.dataset.shown); g.appendChild(c); }
  document.getElementById('shown').textContent = `${shown} detections shown on this page (score ≥ ${state.min.toFixed(2)})`;
  document.getElementById('pageno').textContent = `page ${page} of ${D.pages}`;
}
function loadPage(n) {
  page = n; if (pages[n]) { render(); return; }
  const s = document.createElement('script'); s.src = `pages/page-${String(n).padStart(4, '0')}.js`;
  s.onerror = () => { document.getElementById('shown').textContent = `page ${n} could not be loaded`; };
  document.head.appendChild(s);
}
window.ovlabelPage = (n, entries) => { pages[n] = entries; if (n === page) render(); };
function openImage(entry, img) {
  const box = document.querySelector('#modal .box'); box.textContent = '';
  const scale = Math.min(3, 768 / Math.max(entry.tw, entry.th));
  const canvas = el('canvas', {width: Math.round(entry.tw * scale), height: Math.round(entry.th * scale)});
  box.appendChild(el('div', {text: `${entry.file} (${entry.w}×${entry.h})`})); box.appendChild(canvas);
  draw(canvas, img && img.complete ? img : null, entry, scale);
  for (const m of entry.maps || []) { const i = el('img', {src: m.src, title: D.classes[m.c], width: entry.tw});
    box.appendChild(el('figure', {}, i, el('figcaption', {text: `map of ${D.classes[m.c]}`}))); }
  document.getElementById('modal').style.display = 'flex';
}
function bars(values, labels, width, height) {
  const ns = 'http://www.w3.org/2000/svg'; const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('width', width); svg.setAttribute('height', height); const max = Math.max(1, ...values);
  const bw = width / Math.max(1, values.length);
  values.forEach((v, i) => { const r = document.createElementNS(ns, 'rect'); const h = (height - 12) * v / max;
    r.setAttribute('x', i * bw + 1); r.setAttribute('y', height - 12 - h); r.setAttribute('width', Math.max(1, bw - 2));
    r.setAttribute('height', h); r.setAttribute('fill', '#546e7a');
    const t = document.createElementNS(ns, 'title'); t.textContent = `${labels[i]}: ${v}`; r.appendChild(t); svg.appendChild(r); });
  return svg;
}
function curves(pr) {
  const ns = 'http://www.w3.org/2000/svg'; const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('width', 240); svg.setAttribute('height', 160); svg.setAttribute('id', 'pr');
  Object.entries(pr).forEach(([name, p], k) => { const i = D.classes.indexOf(name);
    const pts = p.map((v, r) => v < 0 ? null : `${10 + 220 * r / 100},${150 - 140 * v}`).filter(x => x);
    if (!pts.length) return; const l = document.createElementNS(ns, 'polyline'); l.setAttribute('points', pts.join(' '));
    l.setAttribute('fill', 'none'); l.setAttribute('stroke', color(i)); const t = document.createElementNS(ns, 'title');
    t.textContent = name; l.appendChild(t); svg.appendChild(l); });
  return svg;
}
function setup() {
  document.getElementById('summary').textContent = `${D.images} images, ${D.detections} detections, ` +
    `${D.failures.length} failed` + (D.model ? ` — model ${D.model}` : '');
  const list = document.getElementById('classes');
  D.classes.forEach((name, i) => { const box = el('input', {type: 'checkbox', 'data-class': i}); box.checked = true;
    box.onchange = () => { box.checked ? state.on.add(i) : state.on.delete(i); render(); };
    const lab = el('label', {}, box); lab.appendChild(document.createTextNode(` ${name} (${D.counts[i]})`));
    lab.style.color = color(i); list.appendChild(lab); });
  const slider = document.getElementById('score'); slider.value = state.min;
  const out = document.getElementById('scoreval'); out.textContent = state.min.toFixed(2);
  slider.oninput = () => { state.min = Number(slider.value); out.textContent = state.min.toFixed(2); render(); };
  document.getElementById('all').onclick = () => { D.classes.forEach((_, i) => state.on.add(i));
    list.querySelectorAll('input').forEach(b => b.checked = true); render(); };
  document.getElementById('none').onclick = () => { state.on.clear(); list.querySelectorAll('input').forEach(b => b.checked = false); render(); };
  document.getElementById('prev').onclick = () => { if (page > 1) loadPage(page - 1); };
  document.getElementById('next').onclick = () => { if (page < D.pages) loadPage(page + 1); };
  document.getElementById('counts').appendChild(bars(D.counts, D.classes, 240, 80));
  const hist = document.getElementById('hists');
  D.classes.forEach((name, i) => { if (!D.counts[i]) return; const row = el('div', {text: name});
    row.appendChild(bars(D.histograms[i], D.histograms[i].map((_, b) => `score ${(b / D.histograms[i].length).toFixed(2)}+`), 240, 40));
    hist.appendChild(row); });
  const fails = document.getElementById('failures');
  if (!D.failures.length) fails.appendChild(el('p', {text: 'none'}));
  else { const t = el('table'); D.failures.forEach(f => t.appendChild(el('tr', {}, el('td', {text: f.file}), el('td', {text: f.error}))));
    fails.appendChild(t); }
  const ev = document.getElementById('evaluation');
  if (!D.evaluation) ev.appendChild(el('p', {text: 'no ground truth (ovlabel report RUN --gt FILE)'}));
  else { ev.appendChild(el('p', {text: `segm AP ${(100 * D.evaluation.segm_ap).toFixed(1)}, bbox AP ${(100 * D.evaluation.bbox_ap).toFixed(1)}`}));
    const t = el('table', {id: 'ap'}); t.appendChild(el('tr', {}, el('th', {text: 'class'}), el('th', {text: 'segm AP'}), el('th', {text: 'bbox AP'})));
    const f = v => v === null || v < 0 || Number.isNaN(v) ? '–' : (100 * v).toFixed(1);
    Object.entries(D.evaluation.per_class).forEach(([n, v]) => t.appendChild(el('tr', {}, el('td', {text: n}), el('td', {text: f(v.segm)}), el('td', {text: f(v.bbox)}))));
    ev.appendChild(t); ev.appendChild(el('div', {text: 'precision–recall at IoU 0.5 (segm)'})); ev.appendChild(curves(D.evaluation.pr50)); }
  document.getElementById('modal').onclick = e => { if (e.target.id === 'modal') e.target.style.display = 'none'; };
  loadPage(1);
}
setup();
