// RadFed node UI: keyboard shortcuts and mask drawing. Served by the node, no dependencies.
(function () {
  "use strict";
  const viewer = document.getElementById("viewer");
  const image = document.getElementById("image");
  const overlay = document.getElementById("overlay");
  const rectanglesInput = document.getElementById("rectangles");
  const applyButton = document.getElementById("mask-apply");
  const countLabel = document.getElementById("mask-count");
  let masking = false;
  let start = null;
  const rectangles = [];

  function instances() {
    return viewer ? viewer.dataset.instances.split(" ").filter(Boolean) : [];
  }

  function go(offset) {
    const all = instances();
    const here = all.indexOf(viewer.dataset.current);
    const next = all[here + offset];
    if (next) { window.location.search = "?instance=" + encodeURIComponent(next); }
  }

  function toggleMasking() {
    if (!viewer) { return; }
    masking = !masking;
    viewer.querySelector(".stage").classList.toggle("masking", masking);
    if (masking) { resize(); }
  }

  function resize() {
    overlay.width = image.clientWidth;
    overlay.height = image.clientHeight;
    draw(null);
  }

  function toImage(event) {
    // Canvas coordinates -> the image's own pixel coordinates.
    const box = overlay.getBoundingClientRect();
    const sx = image.naturalWidth / box.width;
    const sy = image.naturalHeight / box.height;
    return { x: Math.round((event.clientX - box.left) * sx), y: Math.round((event.clientY - box.top) * sy), sx: sx, sy: sy };
  }

  function draw(current) {
    const ctx = overlay.getContext("2d");
    ctx.clearRect(0, 0, overlay.width, overlay.height);
    ctx.strokeStyle = "#ff3b30";
    ctx.fillStyle = "rgba(255, 59, 48, 0.35)";
    const sx = overlay.width / image.naturalWidth;
    const sy = overlay.height / image.naturalHeight;
    rectangles.concat(current ? [current] : []).forEach(function (r) {
      ctx.fillRect(r[0] * sx, r[1] * sy, r[2] * sx, r[3] * sy);
      ctx.strokeRect(r[0] * sx, r[1] * sy, r[2] * sx, r[3] * sy);
    });
  }

  function rectangle(a, b) {
    const left = Math.max(0, Math.min(a.x, b.x));
    const top = Math.max(0, Math.min(a.y, b.y));
    return [left, top, Math.abs(a.x - b.x), Math.abs(a.y - b.y)];
  }

  if (overlay) {
    overlay.addEventListener("mousedown", function (event) { start = toImage(event); });
    overlay.addEventListener("mousemove", function (event) {
      if (start) { draw(rectangle(start, toImage(event))); }
    });
    overlay.addEventListener("mouseup", function (event) {
      if (!start) { return; }
      const r = rectangle(start, toImage(event));
      start = null;
      if (r[2] > 1 && r[3] > 1) { rectangles.push(r); }
      rectanglesInput.value = JSON.stringify(rectangles);
      applyButton.disabled = rectangles.length === 0;
      countLabel.textContent = rectangles.length + " rectangle(s)";
      draw(null);
    });
    document.getElementById("mask-mode").addEventListener("click", toggleMasking);
    window.addEventListener("resize", function () { if (masking) { resize(); } });
  }

  document.addEventListener("keydown", function (event) {
    const tag = (event.target.tagName || "").toLowerCase();
    if (tag === "input" || tag === "textarea" || event.ctrlKey || event.metaKey || event.altKey) { return; }
    if (event.key === "j") { go(-1); }
    else if (event.key === "k") { go(1); }
    else if (event.key === "m") { toggleMasking(); }
    else if (event.key === "a" && document.getElementById("approve")) { event.preventDefault(); document.getElementById("approve-reason").focus(); }
    else if (event.key === "r" && document.getElementById("reject")) { event.preventDefault(); document.getElementById("reject-reason").focus(); }
    else if (event.key === "n" && viewer && viewer.dataset.next) { window.location.href = "/studies/" + viewer.dataset.next; }
  });
})();
