// The search page's script: answers as the user types (debounced), k slider, results, large view, failures.
// Talks only to this server (/api/..., /image/<index>); every text is set with textContent (never as HTML).
"use strict";

const DEBOUNCE_MS = 250;   // wait this long after the last keystroke before asking
const $ = (id) => document.getElementById(id);
let info = null;
let timer = null;
let latest = 0;            // sequence number of the newest request: older answers are dropped
let inflight = null;       // AbortController of the request in flight

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", !!isError);
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function tile(index, lines, cls, caption) {
  const b = el("button", "result" + (cls ? " " + cls : ""));
  b.type = "button";
  b.dataset.index = index;
  const img = el("img");
  img.src = "/image/" + index;
  img.alt = caption;
  img.addEventListener("error", () => { b.classList.add("unserved"); b.title = caption + " (image not served: " +
    "over the server's size cap, or unreadable)"; });
  b.appendChild(img);
  lines.forEach(([c, t]) => b.appendChild(el("span", "label " + c, t)));
  b.title = caption;
  b.addEventListener("click", () => openViewer(index, caption));
  return b;
}

function openViewer(index, caption) {
  $("viewer-img").src = "/image/" + index;
  $("viewer-caption").textContent = caption;
  $("viewer").hidden = false;
}

function closeViewer() { $("viewer").hidden = true; }

function render(data) {
  const results = $("results");
  results.replaceChildren();
  const truth = data.truth;
  $("truth").hidden = !truth;
  if (truth) {
    const verdict = truth.top1_correct ? "top-1 right" : "top-1 wrong";
    $("truth-about").textContent = `test query ${truth.index} · identity ${truth.pid} · ${verdict} · ` +
      `ground truth (${truth.images.length} image${truth.images.length === 1 ? "" : "s"} of this identity):`;
    $("truth-images").replaceChildren(...truth.images.map((j) =>
      tile(j, [["gt", "ground truth"], ["pid", "pid " + truth.pid]], "gt", `ground truth, pid ${truth.pid}`)));
  }
  data.results.forEach((r) => {
    let cls = "";
    if (r.match === true) cls = "match";
    else if (r.match === false) cls = "mismatch";
    const lines = [["rank", `#${r.rank}  ·  ${r.score.toFixed(3)}`], ["name", r.name]];
    if (r.pid !== undefined) lines.push(["pid", "pid " + r.pid]);
    const t = tile(r.index, lines, cls, `#${r.rank}  ${r.path}  (score ${r.score.toFixed(4)})`);
    t.dataset.rank = r.rank;
    t.dataset.name = r.name;
    results.appendChild(t);
  });
  setStatus(`top ${data.results.length} of ${data.gallery_size} images · ${data.ms} ms`
            + (truth ? "" : (info.mode === "test" ? " · a typed sentence has no ground truth: pick a failure, "
                                                 + "or type a test caption exactly" : "")));
  $("kept").hidden = !data.cut;
  if (data.cut) {
    $("kept").textContent = `The query is ${data.num_tokens} tokens long; the model reads the first ` +
      `${info.text_length}: “${data.kept_text}”`;
  }
}

async function ask(params) {
  const seq = ++latest;
  if (inflight) inflight.abort();
  inflight = new AbortController();
  params.set("k", $("k").value);
  setStatus("searching…");
  let resp, data;
  try {
    resp = await fetch("/api/search?" + params.toString(), { signal: inflight.signal });
    data = await resp.json();
  } catch (e) {
    if (e.name === "AbortError") return;
    if (seq === latest) setStatus("the search server does not answer: is it still running?", true);
    return;
  }
  if (seq !== latest) return;  // a newer query was sent meanwhile
  if (!resp.ok) {  // the message says what happened (e.g. the model did not answer within --model_timeout)
    $("results").replaceChildren();
    $("truth").hidden = true;
    $("kept").hidden = true;
    setStatus(data.error, true);
    return;
  }
  render(data);
}

function searchTyped() {
  const q = $("query").value;
  if (!q.trim()) {
    ++latest;
    if (inflight) inflight.abort();
    $("results").replaceChildren();
    $("truth").hidden = true;
    $("kept").hidden = true;
    setStatus("type a sentence describing the person");
    return;
  }
  if (q.length > info.max_query_chars) {
    ++latest;
    setStatus(`the query is ${q.length} characters long; at most ${info.max_query_chars} are accepted`, true);
    return;
  }
  ask(new URLSearchParams({ q }));
}

function searchTestQuery(index) {
  clearTimeout(timer);
  ask(new URLSearchParams({ test_query: String(index) }));
  $("query").value = failures.get(index) || $("query").value;
}

const failures = new Map();

async function showFailures(on) {
  $("failures").hidden = !on;
  $("show-failures").classList.toggle("on", on);
  $("show-search").classList.toggle("on", !on);
  if (!on || failures.size) return;
  const resp = await fetch("/api/failures");
  const list = await resp.json();
  if (!resp.ok) { setStatus(list.error, true); return; }
  $("failures-about").textContent = `${list.length} of ${info.num_queries} test queries have a top-1 of another ` +
    `identity (what visualize.py --failures draws). Click one:`;
  const ol = $("failure-list");
  list.forEach((f) => {
    failures.set(f.index, f.caption);
    const li = el("li", "", `[${f.index}] pid ${f.pid} (top-1 pid ${f.top1_pid}): ${f.caption}`);
    li.dataset.index = f.index;
    li.addEventListener("click", () => {
      ol.querySelectorAll("li.on").forEach((x) => x.classList.remove("on"));
      li.classList.add("on");
      searchTestQuery(f.index);
    });
    ol.appendChild(li);
  });
}

async function init() {
  try {
    const resp = await fetch("/api/info");
    info = await resp.json();
  } catch (e) {
    setStatus("the search server does not answer: is it still running?", true);
    return;
  }
  document.title = "IRRA search · " + info.title;
  $("title").textContent = "IRRA search · " + info.title;
  $("about").textContent = `${info.gallery_size} images of ${info.gallery}` +
    (info.skipped ? ` (${info.skipped} unreadable skipped)` : "") +
    (info.mode === "test" ? ` · ${info.num_queries} test queries` : "");
  if (info.metrics) {
    const m = info.metrics;
    $("metrics").textContent = `this run on the test split: R1 ${m.R1.toFixed(2)} · ` +
      (m.R5 !== undefined ? `R5 ${m.R5.toFixed(2)} · ` : "") + (m.R10 !== undefined ? `R10 ${m.R10.toFixed(2)} · ` : "") +
      `mAP ${m.mAP.toFixed(2)}` +
      (m.mSD !== undefined ? ` · mSD ${m.mSD.toFixed(2)} (rank order ${m.mSD_rank_order.toFixed(2)})` : "") +
      " (green = right identity, red = wrong, blue = ground truth)";
    $("metrics").hidden = false;
    $("views").hidden = false;
    $("show-failures").textContent = `Failures (${info.num_failures})`;
  }
  const k = $("k");
  k.max = info.max_topk;
  k.value = info.default_topk;
  $("k-value").textContent = k.value;
  $("query").maxLength = info.max_query_chars;
  k.addEventListener("input", () => {
    $("k-value").textContent = k.value;
    clearTimeout(timer);
    timer = setTimeout(rerun, DEBOUNCE_MS);
  });
  $("query").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(searchTyped, DEBOUNCE_MS);
  });
  $("show-search").addEventListener("click", () => showFailures(false));
  $("show-failures").addEventListener("click", () => showFailures(true));
  $("viewer").addEventListener("click", closeViewer);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeViewer(); });
  setStatus("type a sentence describing the person");
  if (info.start_view === "failures") showFailures(true);
}

function rerun() {
  const sel = document.querySelector("#failure-list li.on");
  if (sel && failures.get(Number(sel.dataset.index)) === $("query").value) searchTestQuery(Number(sel.dataset.index));
  else searchTyped();
}

init();
