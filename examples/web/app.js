// app.js: the browser example's behaviour. Loads the real schema (/presence.proto, served by
// `presencectl web`) with protobufjs, opens the broker's WebSocket with subprotocol
// "presence.v1" (one ClientFrame / ServerFrame per binary message, no length prefix), sends
// Connect, then keeps four things on screen: the connection status line, your own presence
// (SetPresence), a watch list (Subscribe; live from PresenceEvents, stale versions dropped) and
// one room (JoinChannel + WhoNow; live from ChannelEvents). Pings at half the keepalive from
// ConnAck. The URL fragment can fill the form and connect at once (keepalive: seconds wished):
//   #ws=wss://127.0.0.1:7885/v1/ws&token=...&device=web-1&watch=bob,carol&room=lobby&keepalive=60
"use strict";

(function () {
  const SUBPROTOCOL = "presence.v1";
  const $ = (id) => document.getElementById(id);

  const app = {
    ClientFrame: null,
    ServerFrame: null,
    enums: {},
    ws: null,
    opened: false,
    nextId: 1,
    pending: new Map(), // request_id -> { op, onReply, onError }
    me: null, // ConnAck.user_id
    keepaliveTimer: null,
    closeFrame: null,
    watched: new Map(), // user id -> last version applied (0 = none yet)
    room: "", // the channel joined (or to join once connected)
    members: new Map(), // user id -> Map(device id -> ChannelMember)
    occupancy: 0,
    keepaliveWish: 0, // Connect.keepalive_seconds; 0 = the server's default
  };

  // --- helpers ---------------------------------------------------------------------------

  // uint64 fields decode to numbers in the browser build (no Long.js); tolerate Long anyway.
  function num(v) {
    if (v === null || v === undefined) return 0;
    if (typeof v === "number") return v;
    if (typeof v.toNumber === "function") return v.toNumber();
    return Number(v);
  }

  // "AVAILABILITY_AWAY" -> "away", by the enum's own names.
  function enumName(name, value) {
    const e = app.enums[name];
    const full = e && e.valuesById[value];
    if (!full) return "unknown";
    const prefix = name.replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase() + "_";
    return full.startsWith(prefix) ? full.slice(prefix.length).toLowerCase() : full.toLowerCase();
  }

  function log(text) {
    const list = $("log");
    const item = document.createElement("li");
    item.textContent = `${new Date().toLocaleTimeString()} ${text}`;
    list.prepend(item);
    while (list.children.length > 200) list.lastChild.remove();
  }

  function setStatus(state, text) {
    const line = $("status-line");
    line.dataset.state = state;
    line.textContent = text;
  }

  function showError(text) {
    const line = $("error-line");
    line.hidden = !text;
    line.textContent = text || "";
    if (text) log(`error: ${text}`);
  }

  function errorText(e) {
    return `${enumName("ErrorCode", e.code)} in ${e.operation}: ${e.reason}`;
  }

  function setConnectedControls(connected) {
    for (const id of ["set-presence", "watch-button", "join-button", "disconnect-button"]) {
      $(id).disabled = !connected;
    }
  }

  // --- wire ------------------------------------------------------------------------------

  function send(frame) {
    const message = app.ClientFrame.fromObject(frame);
    app.ws.send(app.ClientFrame.encode(message).finish());
  }

  // Sends `{[op]: body}` with a fresh request id; the reply (or Error) goes to the callbacks.
  function request(op, body, onReply, onError) {
    if (!app.ws || app.ws.readyState !== WebSocket.OPEN) return;
    const id = app.nextId++;
    app.pending.set(id, { op, onReply, onError });
    send({ request_id: id, [op]: body });
  }

  function onMessage(event) {
    if (typeof event.data === "string") {
      log(`ignored a text message (the protocol is binary): ${event.data.slice(0, 80)}`);
      return;
    }
    let frame;
    try {
      frame = app.ServerFrame.decode(new Uint8Array(event.data));
    } catch (e) {
      log(`undecodable ServerFrame: ${e.message}`);
      return;
    }
    const kind = frame.body; // the name of the oneof field that is set
    const body = kind ? frame[kind] : null;
    const id = num(frame.request_id);
    if (kind === "close") {
      app.closeFrame = body;
      log(`Close ${enumName("CloseCode", body.code)} ${body.reason}`);
      return;
    }
    const waiter = id !== 0 ? app.pending.get(id) : undefined;
    if (waiter) {
      app.pending.delete(id);
      if (kind === "error") {
        showError(errorText(body));
        if (waiter.onError) waiter.onError(body);
      } else if (waiter.onReply) {
        waiter.onReply(body, kind);
      }
      return;
    }
    switch (kind) {
      case "presence_event":
        onPresenceEvent(body);
        break;
      case "channel_event":
        onChannelEvent(body);
        break;
      case "error":
        showError(errorText(body));
        break;
      default:
        log(`unexpected ${kind || "empty frame"} (request ${id})`);
    }
  }

  // --- connection ------------------------------------------------------------------------

  function connect(url, token, device) {
    if (app.ws) app.ws.close(1000, "reconnecting");
    showError("");
    app.closeFrame = null;
    app.opened = false;
    app.pending.clear();
    setStatus("connecting", `connecting to ${url} …`);
    let ws;
    try {
      ws = new WebSocket(url, SUBPROTOCOL);
    } catch (e) {
      setStatus("closed", `closed: ${e.message}`);
      return;
    }
    ws.binaryType = "arraybuffer";
    app.ws = ws;
    ws.onopen = () => {
      if (ws !== app.ws) return;
      app.opened = true;
      if (ws.protocol !== SUBPROTOCOL) {
        ws.close(1002, "subprotocol");
        showError(`the server did not accept subprotocol ${SUBPROTOCOL} (got "${ws.protocol}")`);
        return;
      }
      setStatus("connecting", `connected to ${url}, authenticating …`);
      request(
        "connect",
        { token, device_id: device, platform: "web", keepalive_seconds: app.keepaliveWish },
        onConnAck,
      );
    };
    ws.onmessage = (event) => {
      if (ws === app.ws) onMessage(event);
    };
    ws.onclose = (event) => {
      if (ws === app.ws) onClose(event);
    };
  }

  function onConnAck(ack) {
    app.me = ack.user_id;
    $("me").dataset.user = ack.user_id;
    $("me-user").textContent = ack.user_id;
    $("device").value = ack.device_id;
    const keepalive = Math.max(1, ack.keepalive_seconds);
    setStatus(
      "connected",
      `connected as ${ack.user_id} (device ${ack.device_id}, keepalive ${keepalive} s)`,
    );
    renderMe(ack.presence);
    setConnectedControls(true);
    // Any frame counts; a Ping at half the keepalive keeps an idle page connected.
    clearInterval(app.keepaliveTimer);
    const line = $("status-line");
    line.dataset.pongs = "0";
    app.keepaliveTimer = setInterval(() => {
      request("ping", {}, () => {
        line.dataset.pongs = String(Number(line.dataset.pongs) + 1);
      });
    }, (keepalive * 1000) / 2);
    // (Re)subscribe to the watch list for fresh snapshots, and (re)join the room.
    const users = [...app.watched.keys()].filter((u) => u !== app.me);
    if (users.length) subscribe(users);
    if (app.room) joinRoom(app.room);
  }

  function onClose(event) {
    clearInterval(app.keepaliveTimer);
    app.pending.clear();
    setConnectedControls(false);
    let reason;
    if (app.closeFrame) {
      const c = app.closeFrame;
      reason = enumName("CloseCode", c.code) + (c.reason ? `: ${c.reason}` : "");
      const after = num(c.reconnect_after_ms);
      if (after) reason += ` (reconnect after ${after} ms)`;
    } else if (event.code >= 4000 && event.code < 5000) {
      // The WebSocket close code is 4000 + CloseCode when the Close frame itself was missed.
      reason = enumName("CloseCode", event.code - 4000) + (event.reason ? `: ${event.reason}` : "");
    } else if (!app.opened) {
      reason =
        `could not open ${event.target.url} (WebSocket code ${event.code}): is the broker ` +
        `listening there, and does this browser trust its certificate?`;
    } else {
      reason = event.reason || `WebSocket closed (code ${event.code})`;
    }
    setStatus("closed", `closed: ${reason}`);
    for (const badge of document.querySelectorAll("#watch-list .badge")) {
      badge.classList.add("stale");
    }
  }

  // --- your own presence -----------------------------------------------------------------

  function renderMe(p) {
    if (!p) return;
    const avail = enumName("Availability", p.availability);
    const badge = $("me-badge");
    badge.textContent = avail;
    badge.dataset.availability = avail;
    $("me-status").textContent = p.status || "";
  }

  function setPresence() {
    const availability = Number($("availability").value);
    const status = $("status-text").value;
    request("set_presence", { availability, status }, (r) => {
      renderMe(r.presence);
      log(`presence set: ${enumName("Availability", availability)} "${status}"`);
    });
  }

  // --- watch list ------------------------------------------------------------------------

  function watchRow(user) {
    let row = document.querySelector(`#watch-list li[data-user="${CSS.escape(user)}"]`);
    if (row) return row;
    row = document.createElement("li");
    row.dataset.user = user;
    for (const [cls, text] of [
      ["user", user],
      ["badge", "unknown"],
      ["status-text", ""],
      ["last-seen", ""],
    ]) {
      const span = document.createElement("span");
      span.className = cls;
      span.textContent = text;
      row.append(span);
    }
    row.querySelector(".badge").dataset.availability = "unknown";
    $("watch-list").append(row);
    return row;
  }

  // Applies a user's presence unless its version is not newer than the one shown. A subscribe
  // reply can arrive after an event it does not know about (the reply waits until the
  // subscription is stored): its older snapshot, even one of version 0 (never seen), is stale.
  function renderWatched(p) {
    if (!app.watched.has(p.user_id)) return;
    const version = num(p.version);
    const last = app.watched.get(p.user_id);
    if (last !== 0 && version <= last) return;
    app.watched.set(p.user_id, version);
    const row = watchRow(p.user_id);
    const avail = enumName("Availability", p.availability);
    const badge = row.querySelector(".badge");
    badge.textContent = avail;
    badge.dataset.availability = avail;
    badge.classList.remove("stale");
    row.dataset.version = String(version);
    row.querySelector(".status-text").textContent = p.status || "";
    const lastSeen = num(p.last_seen_ms);
    const seen = row.querySelector(".last-seen");
    seen.dataset.lastSeenMs = String(lastSeen);
    if (avail === "offline") {
      seen.textContent = lastSeen ? `last seen ${new Date(lastSeen).toLocaleString()}` : "never seen";
    } else {
      const devices = (p.devices || []).map((d) => d.platform || d.device_id);
      seen.textContent = devices.length ? `on ${devices.join(", ")}` : "";
    }
  }

  function subscribe(users) {
    request("subscribe", { user_ids: users }, (r) => {
      for (const p of r.presences) renderWatched(p);
      log(`watching ${users.join(", ")} (${r.subscription_count} subscriptions)`);
    }, (e) => {
      for (const user of users) {
        const badge = watchRow(user).querySelector(".badge");
        badge.textContent = "error";
        badge.dataset.availability = "unknown";
        badge.title = e.reason;
      }
    });
  }

  function watchUser(user) {
    user = user.trim();
    if (!user || app.watched.has(user)) return;
    app.watched.set(user, 0);
    watchRow(user);
    if (app.me) subscribe([user]);
  }

  function onPresenceEvent(e) {
    const kind = enumName("EventKind", e.kind);
    const reason = e.reason ? ` (${enumName("OfflineReason", e.reason)})` : "";
    log(`${e.user_id}: ${kind}${reason}`);
    if (!e.presence) return;
    if (kind === "directed") return; // ephemeral, addressed to you: not the stored presence
    if (e.user_id === app.me) renderMe(e.presence);
    renderWatched(e.presence);
  }

  // --- room ------------------------------------------------------------------------------

  function renderRoom() {
    $("room").dataset.channel = app.room;
    $("room-name").textContent = app.room || "–";
    $("room-occupancy").textContent = app.room ? `· ${app.occupancy} here` : "";
    const list = $("room-members");
    list.replaceChildren();
    for (const user of [...app.members.keys()].sort()) {
      const item = document.createElement("li");
      item.dataset.member = user;
      const name = document.createElement("span");
      name.className = "user";
      name.textContent = user;
      const devices = document.createElement("span");
      devices.className = "devices";
      devices.textContent = [...app.members.get(user).keys()].sort().join(", ");
      item.append(name, devices);
      list.append(item);
    }
  }

  function addMember(m) {
    if (!app.members.has(m.user_id)) app.members.set(m.user_id, new Map());
    app.members.get(m.user_id).set(m.device_id, m);
  }

  function removeMember(m) {
    const devices = app.members.get(m.user_id);
    if (!devices) return;
    devices.delete(m.device_id);
    if (devices.size === 0) app.members.delete(m.user_id);
  }

  // Reads every page of who-now, then replaces the member list.
  function refreshMembers() {
    const channel = app.room;
    const fresh = new Map();
    const page = (cursor) =>
      request("who_now", { channel, mode: 0, cursor, page_size: 100 }, (r) => {
        if (channel !== app.room) return;
        for (const m of r.members) {
          if (!fresh.has(m.user_id)) fresh.set(m.user_id, new Map());
          fresh.get(m.user_id).set(m.device_id, m);
        }
        if (r.next_cursor) return page(r.next_cursor);
        app.members = fresh;
        app.occupancy = r.occupancy;
        renderRoom();
      });
    page("");
  }

  function joinRoom(channel) {
    channel = channel.trim();
    if (!channel) return;
    if (app.room && app.room !== channel && app.me) {
      request("leave_channel", { channel: app.room });
    }
    app.room = channel;
    app.members = new Map();
    renderRoom();
    if (!app.me) return;
    request("join_channel", { channel }, (r) => {
      app.occupancy = r.occupancy;
      log(`joined ${channel} (${r.occupancy} here)`);
      refreshMembers();
    });
  }

  function onChannelEvent(e) {
    if (e.channel !== app.room) return;
    const kind = enumName("ChannelEventKind", e.kind);
    const m = e.member;
    log(`${e.channel}: ${kind}${m ? ` ${m.user_id}/${m.device_id}` : ""}`);
    app.occupancy = e.occupancy;
    switch (kind) {
      case "join":
      case "state_changed":
        if (m) addMember(m);
        break;
      case "leave":
      case "timeout":
        if (m) removeMember(m);
        break;
      case "offline":
        if (m) app.members.delete(m.user_id);
        break;
      case "interval": {
        const i = e.interval || {};
        if (i.here_now_refresh) return refreshMembers();
        for (const j of i.joins || []) addMember(j);
        for (const s of i.state_changes || []) addMember(s);
        for (const l of [...(i.leaves || []), ...(i.timeouts || [])]) removeMember(l);
        break;
      }
    }
    renderRoom();
  }

  // --- start -----------------------------------------------------------------------------

  async function start() {
    const params = new URLSearchParams(location.hash.slice(1));
    if (params.get("ws")) $("ws-url").value = params.get("ws");
    if (params.get("token")) $("token").value = params.get("token");
    let device = params.get("device") || sessionStorage.getItem("presenced-device");
    if (!device) device = `web-${Math.random().toString(16).slice(2, 8)}`;
    sessionStorage.setItem("presenced-device", device);
    $("device").value = device;
    for (const user of (params.get("watch") || "").split(",")) watchUser(user);
    if (params.get("room")) joinRoom(params.get("room"));
    app.keepaliveWish = Number(params.get("keepalive")) || 0;

    setStatus("loading", "loading the schema …");
    try {
      const root = await new protobuf.Root().load("/presence.proto", { keepCase: true });
      app.ClientFrame = root.lookupType("presence.v1.ClientFrame");
      app.ServerFrame = root.lookupType("presence.v1.ServerFrame");
      for (const name of ["Availability", "EventKind", "OfflineReason", "CloseCode", "ErrorCode",
        "ChannelEventKind"]) {
        app.enums[name] = root.lookupEnum(`presence.v1.${name}`);
      }
    } catch (e) {
      setStatus("closed", `closed: cannot load /presence.proto: ${e.message}`);
      return;
    }
    const select = $("availability");
    for (const [value, full] of Object.entries(app.enums.Availability.valuesById)) {
      if (Number(value) === 0) continue; // UNSPECIFIED: "leave unchanged"
      const option = document.createElement("option");
      option.value = value;
      option.textContent = enumName("Availability", Number(value));
      option.title = full;
      select.append(option);
    }

    $("connect-form").addEventListener("submit", (event) => {
      event.preventDefault();
      connect($("ws-url").value.trim(), $("token").value.trim(), $("device").value.trim());
    });
    $("disconnect-button").addEventListener("click", () => {
      if (app.ws && app.ws.readyState === WebSocket.OPEN) {
        send({ request_id: 0, disconnect: { reason: "disconnect button" } });
      }
    });
    $("presence-form").addEventListener("submit", (event) => {
      event.preventDefault();
      setPresence();
    });
    $("watch-form").addEventListener("submit", (event) => {
      event.preventDefault();
      watchUser($("watch-user").value);
      $("watch-user").value = "";
    });
    $("room-form").addEventListener("submit", (event) => {
      event.preventDefault();
      joinRoom($("room-input").value);
    });

    setStatus("idle", "not connected");
    if ($("ws-url").value && $("token").value && params.get("token")) {
      connect($("ws-url").value.trim(), $("token").value.trim(), device);
    }
  }

  start();
})();
