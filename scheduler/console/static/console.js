// FaceGate console: live job progress and review in place. Plain script, no framework, nothing from elsewhere.
"use strict";

(function () {
  const csrf = document.body.dataset.csrf || "";

  function setText(root, field, text) {
    const el = root.querySelector('[data-field="' + field + '"]');
    if (el) el.textContent = text;
    return el;
  }

  // Jobs that are still queued or running: ask the JSON API (with the session cookie) until they finish.
  function follow(row) {
    const id = row.dataset.job;
    let timer = null;
    async function poll() {
      let job;
      try {
        const response = await fetch("/v1/jobs/" + encodeURIComponent(id), {headers: {"Accept": "application/json"},
                                                                             credentials: "same-origin"});
        if (!response.ok) return;  // signed out, or gone: leave the row as it was last shown
        job = await response.json();
      } catch (e) {
        return;
      }
      const state = setText(row, "state", job.state);
      if (state) state.className = "state state-" + job.state;
      const p = job.progress;
      setText(row, "progress", p.done + "/" + p.total + (p.failed ? ", " + p.failed + " failed" : ""));
      const bar = row.querySelector('[data-field="bar"]');
      if (bar) { bar.max = p.total || 1; bar.value = p.done; }
      if (job.state !== "queued" && job.state !== "running") {
        clearInterval(timer);
        row.dataset.finished = "true";
        if (row.dataset.reloadWhenFinished) window.location.reload();
      }
    }
    timer = setInterval(poll, 1500);
    poll();
  }
  document.querySelectorAll('[data-job][data-finished="false"]').forEach(follow);

  // A face whose image has gone (deleted, moved, or changed since it was indexed: the crop answers 410).
  function gone(img) {
    const note = document.createElement("p");
    note.className = "gone";
    note.textContent = "Image gone: deleted, moved or changed since it was indexed.";
    img.replaceWith(note);
  }
  document.querySelectorAll("img.crop").forEach(function (img) {
    if (img.complete && img.naturalWidth === 0) gone(img);
    else img.addEventListener("error", function () { gone(img); });
  });

  // Confirm / reject in place: the review API, as the signed-in user, with the session's CSRF token.
  document.querySelectorAll("form.review-form").forEach(function (form) {
    form.addEventListener("submit", async function (event) {
      event.preventDefault();
      const button = event.submitter;
      const match = form.closest(".match");
      const message = form.querySelector(".review-message");
      const body = {face_id: form.elements.face_id.value, decision: button ? button.value : "confirmed"};
      form.querySelectorAll("button").forEach(function (b) { b.disabled = true; });
      message.textContent = "…";
      try {
        const response = await fetch(form.dataset.api, {
          method: "POST", credentials: "same-origin",
          headers: {"Content-Type": "application/json", "Accept": "application/json", "X-CSRF-Token": csrf},
          body: JSON.stringify(body),
        });
        const answer = await response.json();
        if (!response.ok) {
          message.textContent = answer.detail || ("refused (" + response.status + ")");
        } else {
          const review = setText(match, "review", answer.review);
          if (review) review.className = "review review-" + answer.review;
          if (answer.reviewers_required) {
            setText(match, "confirmations", answer.confirmations + " of " + answer.reviewers_required + " confirmations");
          }
          const item = document.createElement("li");
          item.textContent = body.decision + " by " + (answer.reviewer || "you");
          match.querySelector('[data-field="history"]').appendChild(item);
          message.textContent = "recorded";
        }
      } catch (e) {
        message.textContent = "could not reach the server";
      } finally {
        form.querySelectorAll("button").forEach(function (b) { b.disabled = false; });
      }
    });
  });
})();
