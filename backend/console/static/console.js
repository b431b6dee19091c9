// The fleet table's live update: every few seconds, ask /fleet/rows (the same query as
// the page) for the table body the server renders, and swap it in. Polling rather than
// server-sent events: docs/console.md and the decision notes say why.
(function () {
  "use strict";
  var table = document.getElementById("fleet");
  if (!table) { return; }
  var url = table.getAttribute("data-live");
  var every = parseInt(table.getAttribute("data-every") || "5000", 10);
  var rows = document.getElementById("fleet-rows");
  var summary = document.getElementById("summary");
  var status = document.getElementById("live-status");
  var etag = null;
  var stopped = false;

  function stamp() {
    status.textContent = "Updated " + new Date().toLocaleTimeString();
  }

  function schedule() {
    if (!stopped) { window.setTimeout(tick, every); }
  }

  function tick() {
    // A hidden tab asks nothing; a keyboard user inside the table keeps their focus.
    if (document.hidden || rows.contains(document.activeElement)) { schedule(); return; }
    var headers = { "Accept": "application/json" };
    if (etag) { headers["If-None-Match"] = etag; }
    fetch(url, { headers: headers, credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (response.status === 401) {
          stopped = true;
          status.textContent = "Signed out: reload the page to sign in again.";
          return null;
        }
        if (response.status === 304) { stamp(); return null; }
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        etag = response.headers.get("ETag");
        return response.json();
      })
      .then(function (data) {
        if (data) {
          rows.innerHTML = data.rows;
          summary.innerHTML = data.summary;
          stamp();
        }
        schedule();
      })
      .catch(function (error) {
        status.textContent = "Live update failed (" + error.message + "); trying again.";
        schedule();
      });
  }

  schedule();
}());
