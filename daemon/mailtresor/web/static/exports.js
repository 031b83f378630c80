// The export progress page (templates/export.html): polls the API's
// /api/v1/exports/{id} (the session cookie authorises it; a GET needs no
// CSRF token) while the job is queued or running, and updates the bar and
// the counts.  No inline script (CSP script-src 'self'); without this file
// the page refreshes itself (<noscript> meta refresh) and has a link.
"use strict";
(function () {
  // Each poll is an audited call (one `export` record, as an API
  // client's): start quick, then back off, so a long export does not fill
  // the auditors' trail with polls.
  var FIRST = 500, FACTOR = 1.5, LONGEST = 5000;   // ms
  var interval = FIRST;
  var MAX_ERRORS = 10;          // network errors in a row before giving up
  var timer = null, inflight = false, errors = 0;

  function $(id) { return document.getElementById(id); }

  function active(box) {
    var s = box.getAttribute("data-state");
    return s === "queued" || s === "running";
  }

  // As site.human_size: "812 B", "3.4 KB", "1.2 MB".
  function size(n) {
    var units = ["B", "KB", "MB", "GB"];
    n = Number(n) || 0;
    for (var i = 0; i < units.length; i++) {
      if (n < 1024 || i === units.length - 1) {
        return i === 0 ? n + " B" : n.toFixed(1) + " " + units[i];
      }
      n /= 1024;
    }
    return String(n);
  }

  function text(id, value) {
    var el = $(id);
    if (el && el.textContent !== String(value)) { el.textContent = value; }
  }

  function show(box, job) {
    var bar = $("export-progress");
    var total = job.total > 0 ? job.total : 1;
    var done = job.total > 0 ? job.done : (job.state === "done" ? 1 : 0);
    if (bar) { bar.max = total; bar.value = done; bar.textContent = Math.floor(100 * done / total) + " %"; }
    box.setAttribute("data-state", job.state);
    text("export-state", box.getAttribute("data-label-" + job.state) || job.state);
    text("export-done", job.done);
    text("export-missing", job.missing);
    text("export-size", size(job.size));
    $("export-download").hidden = job.state !== "done";
    $("export-failed").hidden = job.state !== "failed";
    $("export-refresh").hidden = !active(box);
  }

  function stop() {
    if (timer !== null) { clearTimeout(timer); timer = null; }
  }

  function schedule(box, delay) {
    stop();
    if (active(box) && !document.hidden) { timer = setTimeout(function () { poll(box); }, delay); }
  }

  function poll(box) {
    timer = null;
    if (inflight || !active(box)) { return; }
    inflight = true;
    fetch(box.getAttribute("data-status-url"), {credentials: "same-origin", cache: "no-store",
                                                headers: {"Accept": "application/json"}})
      .then(function (r) {
        if (!r.ok) { throw {status: r.status}; }
        return r.json();
      })
      .then(function (job) {
        inflight = false;
        errors = 0;
        show(box, job);
        interval = Math.min(LONGEST, interval * FACTOR);
        schedule(box, interval);
      })
      .catch(function (e) {
        inflight = false;
        // Gone, not ours, or the session ended: stop; the Refresh link
        // (a page load) says what happened.  A network hiccup: try again.
        if (e && e.status && e.status < 500) { $("export-refresh").hidden = false; return; }
        if (++errors < MAX_ERRORS) { schedule(box, LONGEST); }
      });
  }

  function start() {
    var box = $("export-job");
    if (box) { errors = 0; interval = FIRST; schedule(box, 0); }
  }

  // pageshow: the first load and a return from the back/forward cache.
  window.addEventListener("pageshow", start);
  window.addEventListener("pagehide", stop);
  document.addEventListener("visibilitychange", function () {
    if (document.hidden) { stop(); } else { start(); }
  });
})();
