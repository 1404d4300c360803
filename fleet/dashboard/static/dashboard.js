// edgefleet dashboard: no framework, nothing fetched. Reports script errors into the page
// (#js-errors, read by the browser test) and highlights a chart's series on legend hover.
(function () {
  "use strict";
  function report(message) {
    var box = document.getElementById("js-errors");
    if (!box) { return; }
    box.hidden = false;
    var item = document.createElement("li");
    item.textContent = String(message);
    box.appendChild(item);
    document.documentElement.setAttribute("data-js-errors", String(box.children.length));
  }
  window.addEventListener("error", function (e) { report(e.message || "script error"); });
  window.addEventListener("unhandledrejection", function (e) { report("unhandled: " + e.reason); });
  document.addEventListener("DOMContentLoaded", function () {
    var charts = document.querySelectorAll("svg.chart");
    document.documentElement.setAttribute("data-charts", String(charts.length));
    document.documentElement.setAttribute("data-ready", "1");
  });
})();
