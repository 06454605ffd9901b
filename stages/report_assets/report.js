(function () {
  "use strict";
  var errors = [];
  window.addEventListener("error", function (e) { errors.push(String(e.message)); });
  var D = JSON.parse(document.getElementById("report-data").textContent);
  var $ = function (id) { return document.getElementById(id); };
  var state = { mode: D.selections.length ? "weight" : "gap", sel: D.default_selection,
                limit: D.page, pinned: null };

  function tokText(id) { var s = D.vocab[String(id)]; return s === undefined ? "#" + id : s; }
  function visible(s) { return s.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5") || "\u2205"; }
  function mix(c, t) {  // white -> colour c by t in [0, 1]
    t = Math.max(0, Math.min(1, t));
    return "rgb(" + c.map(function (v) { return Math.round(255 + (v - 255) * t); }).join(",") + ")";
  }
  function weightOf(r, i) {
    var w = state.sel && r.w[state.sel];
    return w ? w[i] : null;
  }
  function colour(r, i) {
    if (state.mode === "weight") {
      var w = weightOf(r, i);
      if (w === null || w === undefined) return "rgb(255,255,255)";
      if (w <= 0) return "rgb(236,238,241)";
      return mix([44, 160, 44], 0.25 + 0.75 * Math.min(w / D.wmax, 1));
    }
    var g = r.gap[i];
    if (g === null || g === undefined) return "rgb(255,255,255)";
    var a = Math.max(-1, Math.min(1, g / D.gapscale));
    // teacher finds the token less likely than the student did: red; more likely: blue
    return a < 0 ? mix([214, 39, 40], -a) : mix([31, 119, 180], a);
  }
  function matches(r) {
    var q = $("filter-prompt").value.trim().toLowerCase();
    var kind = $("filter-kind").value, guided = $("filter-guided").value;
    if (q && r.pid.toLowerCase().indexOf(q) < 0 && r.sid.toLowerCase().indexOf(q) < 0) return false;
    if (kind !== "__all" && String(r.kind) !== kind) return false;
    if (guided === "guided" && !r.guided) return false;
    if (guided === "unguided" && r.guided) return false;
    return true;
  }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }
  function renderRollout(r, ri) {
    var box = el("div", "rollout" + (r.guided ? " guided" : ""));
    box.dataset.r = ri;
    var meta = el("div", "meta");
    if (r.guided) meta.appendChild(el("span", "badge g", "guided"));
    if (r.kind !== null) meta.appendChild(el("span", "badge", r.kind));
    meta.appendChild(el("span", "badge", r.finish));
    if (r.correct !== null) meta.appendChild(el("span", "badge " + (r.correct ? "ok" : "bad"),
                                               r.correct ? "correct" : "wrong"));
    meta.appendChild(document.createTextNode(" prompt " + r.pid + " \u00b7 sample " + r.sid +
      (r.answer ? " \u00b7 answer: " + r.answer : "")));
    box.appendChild(meta);
    if (r.rprompt !== null) box.appendChild(el("div", "prompt ctx", "rollout prompt (with context): " + r.rprompt));
    box.appendChild(el("div", "prompt", "train prompt: " + r.prompt));
    var toks = el("div", "toks");
    for (var i = 0; i < r.ids.length; i++) {
      var s = el("span", "tok" + (r.seg[i] ? " prefix" : ""), visible(tokText(r.ids[i])));
      s.dataset.r = ri; s.dataset.i = i;
      s.style.backgroundColor = colour(r, i);
      var w = weightOf(r, i);
      if (state.mode === "weight" && w !== null && w !== undefined && w <= 0) s.classList.add("zero");
      toks.appendChild(s);
    }
    box.appendChild(toks);
    return box;
  }
  function render() {
    hidePopup(true);
    var list = $("rollouts");
    list.textContent = "";
    var hits = [];
    D.rollouts.forEach(function (r, i) { if (matches(r)) hits.push(i); });
    hits.slice(0, state.limit).forEach(function (i) { list.appendChild(renderRollout(D.rollouts[i], i)); });
    $("count").textContent = "Showing " + D.shown + " of " + D.total + " rollouts" +
      (D.shown < D.total ? " (seeded sample, seed " + D.seed + ")" : "") + "; " + hits.length +
      " match the filter" + (hits.length > state.limit ? ", first " + state.limit + " rendered" : "") + ".";
    $("show-more").style.display = hits.length > state.limit ? "" : "none";
    legend();
  }
  function legend() {
    var lg = $("legend"), lt = $("legend-text");
    if (state.mode === "weight") {
      lg.style.background = "linear-gradient(90deg, rgb(236,238,241) 0 12%, " + mix([44, 160, 44], 0.25) +
        " 12%, " + mix([44, 160, 44], 1) + ")";
      lt.textContent = "weight 0 (grey) \u2192 " + D.wmax + " (green) in selection " + state.sel;
    } else {
      lg.style.background = "linear-gradient(90deg, " + mix([214, 39, 40], 1) + ", #fff, " +
        mix([31, 119, 180], 1) + ")";
      lt.textContent = "teacher \u2212 student log-prob: \u2212" + D.gapscale + " (teacher disagrees, red) \u2192 +" +
        D.gapscale + " nats (blue)";
    }
  }
  function fmt(x, nd) { return x === null || x === undefined ? "\u2013" : Number(x).toFixed(nd === undefined ? 3 : nd); }
  function showPopup(span, pin) {
    var r = D.rollouts[+span.dataset.r], i = +span.dataset.i, pop = $("topk-popup");
    pop.textContent = "";
    pop.appendChild(el("div", "hdr", "\u201c" + visible(tokText(r.ids[i])) + "\u201d  pos " + i +
      (r.seg[i] ? " (teacher prefix)" : "") + "  \u00b7 id " + r.ids[i]));
    var kv = "teacher lp " + fmt(r.tlp[i]) + " \u00b7 student lp " + fmt(r.blp[i]) + " \u00b7 gap " + fmt(r.gap[i]) +
      "\nstudent entropy " + fmt(r.ent[i]) + " \u00b7 teacher entropy " + fmt(r.tent[i]);
    D.selections.forEach(function (n) { if (r.w[n]) kv += "\nweight in " + n + ": " + fmt(r.w[n][i]); });
    var k = el("div", "kv", kv); k.style.whiteSpace = "pre-line"; pop.appendChild(k);
    var tk = r.topk[i];
    if (tk) {
      var tbl = el("table");
      tbl.appendChild(el("caption", null, "teacher top-" + tk[0].length + " (probability)"));
      for (var j = 0; j < tk[0].length; j++) {
        var tr = el("tr", "topk-row" + (tk[0][j] === r.ids[i] ? " sampled" : ""));
        tr.appendChild(el("td", null, String(j + 1)));
        tr.appendChild(el("td", null, visible(tokText(tk[0][j]))));
        tr.appendChild(el("td", null, fmt(tk[1][j], 4)));
        var bc = el("td"); var bar = el("div", "bar"); bar.style.width = Math.round(100 * tk[1][j]) + "px";
        bc.appendChild(bar); tr.appendChild(bc); tbl.appendChild(tr);
      }
      pop.appendChild(tbl);
      if (r.tm[i] !== null) pop.appendChild(el("div", "kv", "mass outside the stored top-K: " + fmt(1 - r.tm[i], 4)));
    } else {
      pop.appendChild(el("div", "kv", "no teacher scores for this token (run the score stage)"));
    }
    pop.style.display = "block";
    var b = span.getBoundingClientRect();
    var left = Math.min(b.left + window.scrollX, window.scrollX + document.documentElement.clientWidth - pop.offsetWidth - 8);
    pop.style.left = Math.max(4, left) + "px";
    pop.style.top = (b.bottom + window.scrollY + 4) + "px";
    if (pin) {
      if (state.pinned) state.pinned.classList.remove("active");
      state.pinned = span; span.classList.add("active");
    }
  }
  function hidePopup(force) {
    if (state.pinned && !force) return;
    if (state.pinned) state.pinned.classList.remove("active");
    state.pinned = null;
    $("topk-popup").style.display = "none";
  }
  var list = $("rollouts");
  list.addEventListener("mouseover", function (e) {
    if (e.target.classList.contains("tok") && !state.pinned) showPopup(e.target, false);
  });
  list.addEventListener("mouseout", function (e) {
    if (e.target.classList.contains("tok")) hidePopup(false);
  });
  document.addEventListener("click", function (e) {
    var t = e.target;
    if (t.classList && t.classList.contains("tok")) {
      if (state.pinned === t) hidePopup(true); else showPopup(t, true);
    } else if (!$("topk-popup").contains(t)) {
      hidePopup(true);
    }
  });
  document.addEventListener("keydown", function (e) { if (e.key === "Escape") hidePopup(true); });
  ["color-weight", "color-gap"].forEach(function (id) {
    $(id).addEventListener("change", function () { state.mode = $(id).value; render(); });
  });
  $("selection").addEventListener("change", function () { state.sel = $("selection").value; render(); });
  ["filter-prompt", "filter-kind", "filter-guided"].forEach(function (id) {
    $(id).addEventListener(id === "filter-prompt" ? "input" : "change", function () { state.limit = D.page; render(); });
  });
  $("show-more").addEventListener("click", function () { state.limit += D.page; render(); });
  Array.prototype.forEach.call(document.querySelectorAll("#plots figure:not(.wide)"), function (f) {
    f.addEventListener("click", function () { f.classList.toggle("zoom"); });
  });

  // controls
  if (!D.selections.length) { $("color-weight").disabled = true; $("selection").disabled = true; }
  if (!D.has_tokens) { $("color-gap").disabled = !D.selections.length ? false : true; }
  $(state.mode === "weight" ? "color-weight" : "color-gap").checked = true;
  D.selections.forEach(function (n) { var o = el("option", null, n); o.value = n; $("selection").appendChild(o); });
  if (state.sel) $("selection").value = state.sel;
  var kinds = [];
  D.rollouts.forEach(function (r) { if (r.kind !== null && kinds.indexOf(r.kind) < 0) kinds.push(r.kind); });
  kinds.sort().forEach(function (k) { var o = el("option", null, k); o.value = k; $("filter-kind").appendChild(o); });
  render();

  // Browser self-test (report.html#selftest): render, switch the colouring, open a popup, filter,
  // and write what happened into a pre#selftest element for tests/test_report.py (chromium --dump-dom).
  if (location.hash === "#selftest") {
    var out = { errors: errors };
    try {
      var toks = document.querySelectorAll("#rollouts .tok");
      out.tokens_rendered = toks.length;
      out.rollouts_rendered = document.querySelectorAll("#rollouts .rollout").length;
      out.mode_before = state.mode;
      var before = Array.prototype.map.call(toks, function (t) { return getComputedStyle(t).backgroundColor; });
      var other = state.mode === "weight" ? "color-gap" : "color-weight";
      $(other).click();
      out.mode_after = state.mode;
      var after = Array.prototype.map.call(document.querySelectorAll("#rollouts .tok"),
        function (t) { return getComputedStyle(t).backgroundColor; });
      out.colours_changed = before.filter(function (c, i) { return c !== after[i]; }).length;
      out.distinct_colours_after = after.filter(function (c, i) { return after.indexOf(c) === i; }).length;
      var target = Array.prototype.find.call(document.querySelectorAll("#rollouts .tok"), function (t) {
        return D.rollouts[+t.dataset.r].topk[+t.dataset.i]; });
      if (target) target.click();
      var pop = $("topk-popup");
      out.popup_visible = getComputedStyle(pop).display !== "none" && pop.offsetHeight > 0;
      out.popup_rows = pop.querySelectorAll("tr.topk-row").length;
      out.popup_text = pop.textContent.slice(0, 400);
      document.body.click();
      out.popup_closed = getComputedStyle(pop).display === "none";
      $("filter-guided").value = "guided";
      $("filter-guided").dispatchEvent(new Event("change"));
      var boxes = document.querySelectorAll("#rollouts .rollout");
      out.guided_filter_rendered = boxes.length;
      out.guided_filter_all_guided = Array.prototype.every.call(boxes, function (b) { return b.classList.contains("guided"); });
      out.guided_in_data = D.rollouts.filter(function (r) { return r.guided; }).length;
      $("filter-guided").value = "all";
      $("filter-guided").dispatchEvent(new Event("change"));
      out.count_text = $("count").textContent;
    } catch (e) { errors.push(String(e && e.stack || e)); }
    var pre = document.createElement("pre"); pre.id = "selftest";
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }
})();
