// The web UI's only script (no inline script is allowed by the CSP).
// Progressive: every page works without it.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  // Sort change re-runs the search at once.
  var order = document.getElementById("order");
  if (order && order.form) {
    order.addEventListener("change", function () { order.form.submit(); });
  }
});
