// Refreshes the worklist table from /api/worklist without reloading the page (same filters as the page).
(function () {
  "use strict";
  const table = document.getElementById("worklist");
  if (!table) { return; }
  const every = Number(table.dataset.refreshMs) || 10000;
  const fields = (table.dataset.patientFields || "").split(",").filter(Boolean);
  const status = document.getElementById("refreshed");

  function cell(text, cls) {
    const td = document.createElement("td");
    if (cls) { td.className = cls; }
    td.textContent = text == null ? "" : String(text);
    return td;
  }

  function row(study) {
    const tr = document.createElement("tr");
    tr.dataset.study = study.study_instance_uid;
    const first = document.createElement("td");
    const badge = document.createElement("span");
    badge.className = "badge " + (study.priority || "pending");
    badge.textContent = study.priority || "pending";
    first.appendChild(badge);
    if (study.priority && !study.priority_final) {
      const note = document.createElement("span");
      note.className = "muted";
      note.textContent = " provisional";
      first.appendChild(note);
    }
    tr.appendChild(first);
    tr.appendChild(cell(study.priority_reason, "muted"));
    fields.forEach(function (f) { tr.appendChild(cell(study.patient[f])); });
    const link = document.createElement("a");
    link.href = "/studies/" + encodeURIComponent(study.study_instance_uid);
    link.textContent = study.study_instance_uid;
    const uid = document.createElement("td");
    uid.className = "uid";
    uid.appendChild(link);
    tr.appendChild(uid);
    const reasons = study.reasons && study.reasons.length ? " " + study.reasons.join("; ") : "";
    tr.appendChild(cell(study.status + reasons));
    tr.appendChild(cell(study.label));
    ["covid", "normal", "pneumonia"].forEach(function (c) {
      tr.appendChild(cell(study.probabilities ? study.probabilities[c].toFixed(3) : "", "num"));
    });
    tr.appendChild(cell(study.model_version, "muted"));
    tr.appendChild(cell((study.received_at || "").slice(0, 19), "muted"));
    tr.appendChild(cell(study.feedback_label));
    return tr;
  }

  function refresh() {
    fetch("/api/worklist" + window.location.search, { headers: { "Accept": "application/json" } })
      .then(function (response) { if (!response.ok) { throw new Error(response.status); } return response.json(); })
      .then(function (studies) {
        const body = document.createElement("tbody");
        studies.forEach(function (s) { body.appendChild(row(s)); });
        table.replaceChild(body, table.tBodies[0]);
        if (status) { status.textContent = "updated " + new Date().toLocaleTimeString(); }
      })
      .catch(function (error) { if (status) { status.textContent = "refresh failed (" + error.message + ")"; } });
  }

  window.setInterval(refresh, every);
}());
