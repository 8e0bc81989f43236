// The worklist page: refreshes its rows from /api/worklist without reloading (the page's filters), shows arrival
// times in the browser's local time, sorts by a clicked column, moves and confirms with the keyboard, and raises
// an alert (banner and title badge) when a new urgent study arrives.
(function () {
  "use strict";
  const table = document.getElementById("worklist");
  if (!table) { return; }
  const every = Number(table.dataset.refreshMs) || 10000;
  const query = table.dataset.query || "";
  const fields = (table.dataset.patientFields || "").split(",").filter(Boolean);
  const viewer = Boolean(table.dataset.viewer);
  const status = document.getElementById("refreshed");
  const alertBox = document.getElementById("alert");
  const title = document.title;
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const RANK = { urgent: 0, priority: 1, review: 2, routine: 3, pending: 4 };
  const LABELS = { "1": "covid", "2": "normal", "3": "pneumonia" };
  let studies = null;  // the last answer of the API (null: the rows the server rendered)
  let sortBy = null;
  let selected = null;  // the selected study's UID
  let newUrgent = 0;
  const seenUrgent = new Set();
  Array.prototype.forEach.call(table.tBodies[0].rows, function (tr) {
    if (tr.dataset.priority === "urgent") { seenUrgent.add(tr.dataset.study); }
  });

  function cell(text, cls) {
    const td = document.createElement("td");
    if (cls) { td.className = cls; }
    td.textContent = text == null ? "" : String(text);
    return td;
  }

  function link(href, text, cls) {
    const a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    if (cls) { a.className = cls; }
    return a;
  }

  function ago(iso) {
    const minutes = Math.max(0, Math.round((Date.now() - new Date(iso).getTime()) / 60000));
    if (minutes < 1) { return "just now"; }
    if (minutes < 60) { return minutes + " min ago"; }
    if (minutes < 48 * 60) { return Math.floor(minutes / 60) + " h " + (minutes % 60) + " min ago"; }
    return Math.floor(minutes / 1440) + " days ago";
  }

  function showTimes() {
    table.querySelectorAll("time[datetime]").forEach(function (t) {
      const iso = t.getAttribute("datetime");
      if (!iso) { return; }
      t.textContent = ago(iso);
      t.title = new Date(iso).toLocaleString();
    });
  }

  function row(study) {
    const tr = document.createElement("tr");
    const p = study.patient || {};
    tr.dataset.study = study.study_instance_uid;
    tr.dataset.priority = study.priority || "pending";
    tr.dataset.label = study.label || "";
    tr.dataset.read = study.read ? "true" : "false";
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
    tr.appendChild(cell(study.reason_text));
    tr.appendChild(cell(["PatientName", "PatientID", "PatientAge", "PatientSex"]
      .filter(function (f) { return fields.indexOf(f) >= 0 && p[f]; })
      .map(function (f) { return p[f]; }).join(" ")));
    const studyCell = document.createElement("td");
    studyCell.appendChild(link("/studies/" + encodeURIComponent(study.study_instance_uid),
      p.StudyDescription || "study", "study-link"));
    if (p.AccessionNumber) {
      const acc = document.createElement("span");
      acc.className = "muted";
      acc.textContent = " " + p.AccessionNumber;
      studyCell.appendChild(acc);
    }
    tr.appendChild(studyCell);
    const when = cell("", "muted");
    const time = document.createElement("time");
    time.setAttribute("datetime", study.received_at || "");
    when.appendChild(time);
    tr.appendChild(when);
    const key = study.key_probability;
    tr.appendChild(cell(key ? key["class"] + " " + key.value.toFixed(2) : "", "num"));
    const reasons = study.reasons && study.reasons.length ? " " + study.reasons.join("; ") : "";
    tr.appendChild(cell(study.status + reasons));
    tr.appendChild(cell(study.feedback_label || "unread"));
    if (viewer) {
      const td = document.createElement("td");
      if (study.viewer_url) {
        const a = link(study.viewer_url, "viewer", "viewer-link");
        a.target = "_blank";
        a.rel = "noopener";
        td.appendChild(a);
      }
      tr.appendChild(td);
    }
    return tr;
  }

  function sorted(list) {
    const copy = list.map(function (s, i) { return { s: s, i: i }; });
    const prob = function (x) { return x.s.key_probability ? x.s.key_probability.value : -1; };
    const keys = {
      priority: function (a, b) { return a.i - b.i; },
      arrived: function (a, b) { return (b.s.received_at || "").localeCompare(a.s.received_at || "") || a.i - b.i; },
      probability: function (a, b) { return prob(b) - prob(a) || a.i - b.i; },
    };
    copy.sort(keys[sortBy] || keys.priority);
    return copy.map(function (x) { return x.s; });
  }

  function render() {
    if (studies === null) { showTimes(); select(selected); return; }
    const body = document.createElement("tbody");
    sorted(studies).forEach(function (s) { body.appendChild(row(s)); });
    table.replaceChild(body, table.tBodies[0]);
    showTimes();
    select(selected);
  }

  function rows() { return Array.prototype.slice.call(table.tBodies[0].rows); }

  function select(uid) {
    const all = rows();
    let target = all.find(function (tr) { return tr.dataset.study === uid; }) || null;
    if (!target && uid !== null && all.length) { target = all[0]; }
    all.forEach(function (tr) { tr.classList.toggle("selected", tr === target); });
    selected = target ? target.dataset.study : null;
    if (target && target.scrollIntoView) { target.scrollIntoView({ block: "nearest" }); }
  }

  function move(step) {
    const all = rows();
    if (!all.length) { return; }
    const at = all.findIndex(function (tr) { return tr.dataset.study === selected; });
    const next = at < 0 ? 0 : Math.min(all.length - 1, Math.max(0, at + step));
    select(all[next].dataset.study);
  }

  function alertUrgent(list) {
    list.forEach(function (s) {
      if (s.priority === "urgent" && !seenUrgent.has(s.study_instance_uid)) {
        seenUrgent.add(s.study_instance_uid);
        newUrgent += 1;
      }
    });
    if (newUrgent && alertBox) {
      document.title = "(" + newUrgent + ") URGENT - " + title;
      document.getElementById("alert-text").textContent =
        newUrgent + (newUrgent === 1 ? " new urgent study" : " new urgent studies");
      alertBox.hidden = false;
    }
  }

  function showModels(list) {
    const line = document.getElementById("model");
    const names = Array.from(new Set(list.map(function (s) { return s.model_version || s.priority_model_version; })
      .filter(Boolean))).sort();
    if (line && names.length) { line.textContent = "model: " + names.join(", "); }
  }

  function seen() {
    newUrgent = 0;
    document.title = title;
    if (alertBox) { alertBox.hidden = true; }
  }

  function refresh() {
    return fetch("/api/worklist" + query, { headers: { "Accept": "application/json" } })
      .then(function (response) { if (!response.ok) { throw new Error(response.status); } return response.json(); })
      .then(function (list) {
        studies = list;
        alertUrgent(list);
        showModels(list);
        render();
        if (status) { status.textContent = "updated " + new Date().toLocaleTimeString(); }
      })
      .catch(function (error) { if (status) { status.textContent = "refresh failed (" + error.message + ")"; } });
  }

  function feedback(uid, label) {
    if (!csrfMeta) { window.location.href = "/login?next=" + encodeURIComponent(window.location.pathname); return; }
    if (!label) { return; }
    fetch("/api/studies/" + encodeURIComponent(uid) + "/feedback", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrfMeta.content },
      body: JSON.stringify({ label: label }),
    }).then(function (response) {
      if (!response.ok) { throw new Error(response.status); }
      if (status) { status.textContent = "recorded " + label; }
      const all = rows();
      const at = all.findIndex(function (tr) { return tr.dataset.study === uid; });
      const after = all[at + 1] || all[at - 1];
      selected = after ? after.dataset.study : null;  // the next study stays selected if this one leaves
      return refresh();
    }).catch(function (error) { if (status) { status.textContent = "feedback failed (" + error.message + ")"; } });
  }

  document.addEventListener("keydown", function (event) {
    const tag = (event.target && event.target.tagName) || "";
    if (["INPUT", "SELECT", "TEXTAREA", "BUTTON"].indexOf(tag) >= 0 || event.ctrlKey || event.metaKey || event.altKey) {
      return;
    }
    const tr = rows().find(function (r) { return r.dataset.study === selected; });
    if (event.key === "j" || event.key === "ArrowDown") { move(1); } else if (event.key === "k" || event.key === "ArrowUp") {
      move(-1);
    } else if (event.key === "Enter" && tr) {
      window.location.href = tr.querySelector("a.study-link").href;
    } else if (event.key === "c" && tr) {
      feedback(tr.dataset.study, tr.dataset.label);
    } else if (LABELS[event.key] && tr) {
      feedback(tr.dataset.study, LABELS[event.key]);
    } else if (event.key === "v" && tr && tr.querySelector("a.viewer-link")) {
      window.open(tr.querySelector("a.viewer-link").href, "_blank", "noopener");
    } else {
      return;
    }
    seen();
    event.preventDefault();
  });

  table.querySelectorAll("th[data-sort]").forEach(function (th) {
    th.addEventListener("click", function () {
      sortBy = th.dataset.sort;
      if (studies === null) { refresh(); } else { render(); }
    });
  });
  if (alertBox) { document.getElementById("alert-seen").addEventListener("click", seen); }
  showTimes();
  window.setInterval(refresh, every);
}());
