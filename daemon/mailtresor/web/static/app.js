// The web UI's own script (no inline script is allowed by the CSP).
// Progressive: every page works without it; with it, the search page
// searches and pages without a page load.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  // Sort change re-runs the search at once.
  var order = document.getElementById("order");
  if (order && order.form) {
    order.addEventListener("change", function () {
      if (order.form.requestSubmit) { order.form.requestSubmit(); } else { order.form.submit(); }
    });
  }
  searchInPlace();
  searchPaging();
  exportForm();
});

// A new search (Enter, the button, the sort): fetch everything under the
// form (/search?...&part=answer: errors, results, export form, facets,
// rendered by the server from the same templates as the full page) and
// swap it in, record it in the history (back/forward swap it again), and
// announce the hit count; the focus stays in the box.  The answer of a
// refused query (400) is shown as it comes; anything else unexpected (an
// expired session: the fetch refuses the redirect to the login) loads
// the page itself, which shows what went wrong.  "mt:results" is
// dispatched on the document once the answer is in (tests and bench/web
// wait for it).
function searchInPlace() {
  var form = document.getElementById("search-form");
  if (!form || !window.fetch || !window.history.pushState || !window.URLSearchParams) { return; }
  function fields(href) {
    // Back/forward: the form shows the search it answers.
    var u = new URL(href, window.location.href);
    ["q", "from", "to"].forEach(function (name) {
      var el = form.elements.namedItem(name);
      if (el) { el.value = u.searchParams.get(name) || ""; }
    });
    var order = form.elements.namedItem("order");
    if (order && u.searchParams.get("order")) { order.value = u.searchParams.get("order"); }
  }
  function swap(href, push) {
    var answer = document.getElementById("search-answer");
    if (!answer) { window.location.assign(href); return; }
    var u = new URL(href, window.location.href);
    u.searchParams.set("part", "answer");
    answer.setAttribute("aria-busy", "true");
    fetch(u.toString(), {credentials: "same-origin", redirect: "error", headers: {"Accept": "text/html"}})
      .then(function (r) {
        if (!r.ok && r.status !== 400) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (html) {
        var t = document.createElement("template");
        t.innerHTML = html;
        var fresh = t.content.getElementById("search-answer");
        if (!fresh) { throw new Error("no answer"); }
        answer.replaceWith(fresh);
        if (push) { window.history.pushState({searchAnswer: true}, "", href); } else { fields(href); }
        var dates = !!document.querySelector("#search-error[data-dates]");
        ["date-from", "date-to"].forEach(function (id) {
          var el = document.getElementById(id);
          if (!el) { return; }
          if (dates) {
            el.setAttribute("aria-invalid", "true");
            el.setAttribute("aria-describedby", "search-error");
          } else {
            el.removeAttribute("aria-invalid");
            el.removeAttribute("aria-describedby");
          }
        });
        var live = document.getElementById("announce");
        var said = document.getElementById("search-error") || document.getElementById("hits");
        if (live && said) { live.textContent = said.textContent.replace(/\s+/g, " ").trim(); }
        document.dispatchEvent(new CustomEvent("mt:results"));
      })
      .catch(function () { window.location.assign(href); });
  }
  form.addEventListener("submit", function (e) {
    e.preventDefault();
    var params = new URLSearchParams(new FormData(form));
    swap(form.getAttribute("action") + "?" + params.toString(), true);
  });
  // Back/forward, to a search or a page of one (the first entry, loaded
  // as a page, included): its whole answer, and the form shows its search.
  window.addEventListener("popstate", function () { swap(window.location.href, false); });
}

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
        document.dispatchEvent(new CustomEvent("mt:results"));
      })
      .catch(function () { window.location.assign(href); });
  }
  document.addEventListener("click", function (e) {
    var a = e.target.closest && e.target.closest("#results-part .paging a");
    if (!a || e.button !== 0 || e.ctrlKey || e.metaKey || e.shiftKey || e.altKey) { return; }
    e.preventDefault();
    swap(a.href, true);
  });
  // Back and forward are searchInPlace's: it swaps the whole answer in,
  // facets and form fields included, whichever kind of step made the entry.
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
