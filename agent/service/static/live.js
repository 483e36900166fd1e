// edge-agent live page: one EventSource on /events, one uPlot chart per stream.
"use strict";
(function () {
  const token = new URLSearchParams(location.search).get("token");
  const url = "events" + (token ? "?token=" + encodeURIComponent(token) : "");
  const streams = {};  // name -> {el, plot, ts, score, ep, status}
  let maxPoints = 300, snapshots = 0, dirty = new Set(), es = null;

  const $ = (id) => document.getElementById(id);
  const fmt = (v, d) => (v === null || v === undefined) ? "–" : Number(v).toFixed(d);
  const STATE_TEXT = {warming_up: "warming up", normal: "normal", anomaly: "anomaly"};

  function shadeEpisodes(u) {
    const s = u._stream, xs = u.data[0], ctx = u.ctx;
    if (!s || !xs.length) return;
    ctx.save();
    ctx.fillStyle = "rgba(217, 53, 43, 0.18)";
    for (let i = 0; i < xs.length; i++) {
      if (!(s.ep[i] > 0)) continue;
      let j = i;
      while (j + 1 < xs.length && s.ep[j + 1] > 0) j++;
      const x0 = u.valToPos(xs[i], "x", true), x1 = u.valToPos(xs[j], "x", true);
      ctx.fillRect(x0 - 2, u.bbox.top, Math.max(4, x1 - x0 + 4), u.bbox.height);
      i = j;
    }
    ctx.restore();
  }

  function makeStream(name) {
    const el = $("stream-tpl").content.firstElementChild.cloneNode(true);
    el.dataset.stream = name;
    el.querySelector(".name").textContent = name;
    $("streams").appendChild(el);
    const chart = el.querySelector(".chart");
    const s = {el, chart, ts: [], score: [], ep: [], plot: null};
    s.plot = new uPlot({
      width: Math.max(200, chart.clientWidth), height: 170,
      scales: {x: {time: true}, y: {range: [0, 1]}},
      legend: {show: false},
      series: [{}, {label: "score", stroke: "#2d6cdf", width: 1.5, points: {show: false}},
               {label: "threshold", stroke: "#d9352b", dash: [6, 4], width: 1,
                points: {show: false}}],
      axes: [{}, {values: (u, v) => v.map((x) => x.toFixed(1)), size: 36}],
      hooks: {drawClear: [shadeEpisodes]},
    }, [[], [], []], chart);
    s.plot._stream = s;
    streams[name] = s;
    return s;
  }

  function setStatus(s, st) {
    const q = (c) => s.el.querySelector(c);
    if (st.state !== undefined) {
      q(".state").dataset.state = st.state;
      q(".state").textContent = STATE_TEXT[st.state] || st.state;
    }
    if (st.model !== undefined) q(".model").textContent = st.model + " v" + st.model_version;
    if (st.windows_per_s !== undefined) q(".wps").textContent = fmt(st.windows_per_s, 1);
    if (st.windows !== undefined) q(".windows").textContent = st.windows;
    if (st.windows_dropped !== undefined) q(".dropped").textContent = st.windows_dropped;
    if (st.bad_input !== undefined) q(".bad").textContent = st.bad_input;
    if (st.alerts !== undefined) q(".alerts").textContent = st.alerts;
  }

  function addPoints(s, p, reset) {
    if (reset) { s.ts = []; s.score = []; s.ep = []; }
    if (p) {
      s.ts.push(...p.ts); s.score.push(...p.score); s.ep.push(...p.episode);
      const extra = s.ts.length - maxPoints;
      if (extra > 0) { s.ts.splice(0, extra); s.score.splice(0, extra); s.ep.splice(0, extra); }
    }
    dirty.add(s);
  }

  function setAgent(a) {
    if (a.device === undefined) return;
    $("device").textContent = a.device;
    $("version").textContent = "v" + a.version;
    $("local").dataset.ok = a.local_connected;
    $("local").textContent = "local broker " + (a.local_connected ? "connected" : "DOWN");
    $("upstream").dataset.ok = a.upstream_connected;
    $("upstream").textContent = "upstream " + (a.upstream_connected ? "connected" : "DOWN");
    $("backlog").textContent = a.backlog;
    $("bad").textContent = a.bad_input;
    const f = a.fleet;
    $("fleet").textContent = !f ? "fleet off" : f.rollout
      ? `fleet: ${f.rollout.model} v${f.rollout.version} ${f.rollout.phase}`
      : `fleet: idle (${f.swaps} swaps, ${f.rollbacks} rollbacks)`;
  }

  function apply(msg, snapshot) {
    if (snapshot) {
      maxPoints = msg.max_points || maxPoints;
      for (const name of Object.keys(streams)) {
        if (!(name in msg.streams)) { streams[name].el.remove(); delete streams[name]; }
      }
    }
    setAgent(msg);
    for (const [name, st] of Object.entries(msg.streams || {})) {
      const s = streams[name] || makeStream(name);
      setStatus(s, st);
      if (snapshot || st.points) addPoints(s, st.points, snapshot);
    }
    requestAnimationFrame(draw);
  }

  function draw() {
    for (const s of dirty) {
      const n = s.ts.length;
      s.plot.setData([s.ts, s.score, s.ts.map(() => 0.5)]);
      s.chart.dataset.points = n;
      s.chart.dataset.lastTs = n ? s.ts[n - 1] : "";
      s.el.querySelector(".score").textContent = n ? fmt(s.score[n - 1], 3) : "–";
    }
    dirty.clear();
  }

  function connect() {
    es = new EventSource(url);
    es.onopen = () => { $("conn").dataset.state = "open"; $("conn").textContent = "live"; };
    es.addEventListener("snapshot", (e) => {
      snapshots += 1;
      document.body.dataset.snapshots = snapshots;
      apply(JSON.parse(e.data), true);
    });
    es.addEventListener("update", (e) => apply(JSON.parse(e.data), false));
    es.onerror = () => {
      $("conn").dataset.state = "reconnecting";
      $("conn").textContent = "reconnecting…";
      // A refused or non-200 answer (agent restarting, too many pages) closes the
      // EventSource for good; open a new one, which gets a fresh snapshot.
      if (es.readyState === EventSource.CLOSED) setTimeout(connect, 2000);
    };
  }

  window.addEventListener("resize", () => {
    for (const s of Object.values(streams)) {
      s.plot.setSize({width: Math.max(200, s.chart.clientWidth), height: 170});
    }
  });
  connect();
})();
