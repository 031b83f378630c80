// The web UI's own script (no inline script is allowed by the CSP).
// Progressive: every page works without it; with it, the search page
// pages without a page load.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  // Sort change re-runs the search at once.
  var order = document.getElementById("order");
  if (order && order.form) {
    order.addEventListener("change", function () { order.form.submit(); });
  }
  searchPaging();
  exportForm();
});

// Next / previous / first page: fetch only the result section
// (/search?...&part=results, rendered by the server from the same
// template as the full page), swap it in, record the page in the history,
// move the focus to the results heading and announce the hit count.
// Any failure (an expired session, a refused cursor) falls back to
// loading the page itself, which shows what went wrong.
function searchPaging() {
  if (!document.getElementById("results-part") || !window.fetch || !window.history.pushState) {
    return;
  }
  function partUrl(href) {
    var u = new URL(href, window.location.href);
    u.searchParams.set("part", "results");
    return u.toString();
  }
  function swap(href, push) {
    var part = document.getElementById("results-part");
    if (!part) {
      window.location.assign(href);
      return;
    }
    part.setAttribute("aria-busy", "true");
    fetch(partUrl(href), {credentials: "same-origin", redirect: "error", headers: {"Accept": "text/html"}})
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (html) {
        var t = document.createElement("template");
        t.innerHTML = html;
        var fresh = t.content.getElementById("results-part");
        if (!fresh) { throw new Error("no result section"); }
        part.replaceWith(fresh);
        if (push) { window.history.pushState({searchPart: true}, "", href); }
        var heading = document.getElementById("hits");
        if (heading) { heading.focus(); }
        var live = document.getElementById("announce");
        if (live && heading) {
          live.textContent = heading.textContent.replace(/\s+/g, " ").trim();
        }
      })
      .catch(function () { window.location.assign(href); });
  }
  document.addEventListener("click", function (e) {
    var a = e.target.closest && e.target.closest("#results-part .paging a");
    if (!a || e.button !== 0 || e.ctrlKey || e.metaKey || e.shiftKey || e.altKey) { return; }
    e.preventDefault();
    swap(a.href, true);
  });
  window.addEventListener("popstate", function () { swap(window.location.href, false); });
}

// The export form: "Export all" sends the query, not the ticked rows;
// "Export selected" with nothing ticked says so instead of posting.
function exportForm() {
  var form = document.getElementById("export");
  if (!form) { return; }
  form.addEventListener("submit", function (e) {
    var boxes = Array.prototype.slice.call(document.querySelectorAll('input[name="id"][form="export"]'));
    var none = document.getElementById("export-none");
    if (e.submitter && e.submitter.id === "export-all") {
      boxes.forEach(function (b) {
        if (b.checked) {
          b.disabled = true;          // left out of the form's data, which is taken after this event
          window.setTimeout(function () { b.disabled = false; }, 0);
        }
      });
      return;
    }
    if (!boxes.some(function (b) { return b.checked; })) {
      e.preventDefault();
      if (none) { none.hidden = false; }
    } else if (none) {
      none.hidden = true;
    }
  });
}
