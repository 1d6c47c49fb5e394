// taskfleet dashboard: a request page follows its activity events over server-sent
// events (one event per state change, its id the event's sequence number, so the
// browser's reconnect resumes from Last-Event-ID) and refreshes its table through htmx.
// Whenever the stream is not open (blocked, refused, reconnecting), the page polls the
// same fragment every data-poll seconds instead.
(function () {
  "use strict";
  var stream = document.getElementById("stream");
  if (!stream) return;
  var fragment = stream.dataset.fragment;
  var every = Number(stream.dataset.poll || "5") * 1000;
  var state = document.getElementById("stream-state");
  var log = document.getElementById("events");
  var pending = null;

  function done() {
    var live = document.getElementById("live");
    return live && live.dataset.done === "yes";
  }
  function refresh() {
    if (pending) return;
    pending = setTimeout(function () {
      pending = null;
      htmx.ajax("GET", fragment, { target: "#live", swap: "outerHTML" });
    }, 150);
  }
  function show(text) { if (state) state.textContent = text; document.body.dataset.stream = text; }

  if (stream.dataset.done === "yes") { show("done"); return; }
  var es = window.EventSource ? new EventSource(stream.dataset.events) : null;
  var timer = setInterval(function () {
    if (done()) { clearInterval(timer); show("done"); return; }
    if (!es || es.readyState !== EventSource.OPEN) {
      show("polling every " + every / 1000 + " s");
      refresh();
    }
  }, every);
  if (!es) return;
  es.addEventListener("open", function () { show("live"); });
  es.addEventListener("change", function (ev) {
    var e = JSON.parse(ev.data);
    var li = document.createElement("li");  // every event as it came: no de-duplication here
    li.dataset.id = ev.lastEventId;
    li.textContent = "#" + ev.lastEventId + " activity " + e.activity_id + ": " +
      (e.from_state || "new") + " -> " + e.to_state + (e.reason ? " (" + e.reason + ")" : "");
    log.appendChild(li);
    refresh();
  });
  es.addEventListener("done", function () {
    es.close();
    clearInterval(timer);
    show("done");
    refresh();
  });
})();
