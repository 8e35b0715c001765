// Hangar's operator dashboard: plain JavaScript, no framework, no build step, nothing
// fetched but this API's own endpoints.
//
// Views are rendered from the JSON API (/v1/...) and kept live by the cluster's event stream
// (GET /v1/events), which is read with fetch() and a stream reader rather than EventSource so
// that the API token can go in the Authorization header. The token, asked for on the first 401,
// is kept in sessionStorage (this tab only).
'use strict';

(() => {
  const TOKEN = 'hangar.token';
  const STATES = ['scheduled', 'starting', 'waiting', 'ready', 'terminating', 'terminated'];
  const PAGE = 100;

  // ---------------------------------------------------------------------------------------
  // DOM helpers: every text goes through textContent, never innerHTML.

  function h(tag, props, ...kids) {
    const el = document.createElement(tag);
    setProps(el, props);
    append(el, kids);
    return el;
  }

  function setProps(el, props) {
    if (!props) return;
    for (const [k, v] of Object.entries(props)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') el.setAttribute('class', v);
      else if (k === 'text') el.textContent = v;
      else if (k === 'data') Object.assign(el.dataset, v);
      else if (k === 'style') Object.assign(el.style, v);
      else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
  }

  function append(el, kids) {
    for (const k of kids.flat(Infinity)) {
      if (k === null || k === undefined || k === false) continue;
      el.append(k instanceof Node ? k : String(k));
    }
  }

  // SVG elements live in their own namespace (an identifier, not a URL anything is fetched from).
  const SVG_NS = 'http://www.w3.org/2000/svg';

  function s(tag, attrs, ...kids) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'text') el.textContent = v;
      else el.setAttribute(k, String(v));
    }
    append(el, kids);
    return el;
  }

  const $ = (sel, root = document) => root.querySelector(sel);
  const enc = encodeURIComponent;

  // ---------------------------------------------------------------------------------------
  // Formatting.

  function fmtNum(v, digits = 1) {
    if (v === null || v === undefined || Number.isNaN(v)) return '—';
    if (Math.abs(v) >= 100) return Math.round(v).toLocaleString();
    return v.toFixed(digits).replace(/\.0+$/, '');
  }

  function fmtAge(ms) {
    if (ms === null || ms === undefined) return '—';
    if (ms < 1000) return `${(ms / 1000).toFixed(1)} s`;
    const sec = Math.round(ms / 1000);
    if (sec < 90) return `${sec} s`;
    const min = Math.round(sec / 60);
    if (min < 90) return `${min} min`;
    const hours = Math.round(min / 60);
    if (hours < 48) return `${hours} h`;
    return `${Math.round(hours / 24)} d`;
  }

  function ago(at) {
    if (!at) return '—';
    return `${fmtAge(Math.max(0, Date.now() - at))} ago`;
  }

  function fmtTime(at) {
    if (!at) return '—';
    const d = new Date(at);
    const sameDay = d.toDateString() === new Date().toDateString();
    const time = d.toLocaleTimeString([], { hour12: false });
    return sameDay ? time : `${d.toLocaleDateString()} ${time}`;
  }

  function keyText(key) {
    return key ? `${key.namespace}/${key.name}` : '';
  }

  function reasonText(reason) {
    if (!reason) return '';
    if (reason.kind === 'failed') {
      return reason.exit_code === null || reason.exit_code === undefined
        ? 'failed'
        : `failed (exit ${reason.exit_code})`;
    }
    return String(reason.kind).replace(/_/g, ' ');
  }

  function badge(state, text) {
    return h('span', { class: 'badge', data: { state }, text: text || state });
  }

  function backendBadge(b) {
    const reason = reasonText(b.reason);
    const failed = b.reason && ['failed', 'lost', 'fenced', 'startup_timeout'].includes(b.reason.kind);
    return h('span', { class: 'badge', data: { state: failed ? 'failed' : b.status }, title: reason || null,
      text: reason ? `${b.status}: ${reason}` : b.status });
  }

  // `full` says what a full bar means: trouble (capacity), or the goal (warm backends).
  function meter(used, cap, unit, full = 'bad') {
    // A drone without a limit reports the largest value it can (dev's embedded drone).
    if (cap !== null && cap !== undefined && cap >= 2 ** 31) {
      return h('div', { class: 'meter', title: 'no limit' },
        h('div', { class: 'track' }, h('div', { class: 'fill', style: { width: '0%' } })),
        h('span', { class: 'meter-text', text: `${used.toLocaleString()}${unit} · no limit` }));
    }
    const known = cap !== null && cap !== undefined && cap > 0;
    const pct = known ? Math.min(100, (100 * used) / cap) : 0;
    const level = full === 'good' ? (pct >= 100 ? 'good' : '') : pct >= 95 ? 'full' : pct >= 80 ? 'high' : '';
    return h('div', { class: 'meter', title: known ? `${Math.round(pct)}%` : 'capacity unknown' },
      h('div', { class: 'track' }, h('div', { class: `fill ${level}`, style: { width: `${pct}%` } })),
      h('span', { class: 'meter-text', text: `${used.toLocaleString()} / ${known ? cap.toLocaleString() : '?'}${unit}` }));
  }

  function errorText(err) {
    if (err && err.status === 401) return 'This API needs a token: use the Token button.';
    return err && err.message ? err.message : String(err);
  }

  // ---------------------------------------------------------------------------------------
  // The API: every call sends the token; a 401 asks for one.

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function isAbort(err) {
    return err && err.name === 'AbortError';
  }

  async function errorMessage(resp) {
    const text = await resp.text().catch(() => '');
    try {
      const body = JSON.parse(text);
      if (body && body.error && body.error.message) return body.error.message;
    } catch (_) {
      // Not JSON: the text itself.
    }
    return text.trim() || `${resp.status} ${resp.statusText}`;
  }

  async function api(path, opts = {}) {
    const headers = Object.assign({}, opts.headers);
    const token = sessionStorage.getItem(TOKEN);
    if (token) headers.Authorization = `Bearer ${token}`;
    let body;
    if (opts.body !== undefined) {
      headers['Content-Type'] = 'application/json';
      body = JSON.stringify(opts.body);
    }
    let resp;
    try {
      resp = await fetch(path, { method: opts.method || 'GET', headers, body, signal: opts.signal, cache: 'no-store' });
    } catch (err) {
      if (isAbort(err)) throw err;
      throw new ApiError(0, 'the API does not answer');
    }
    if (resp.status === 401) {
      const msg = await errorMessage(resp);
      askToken(msg);
      throw new ApiError(401, msg);
    }
    if (!resp.ok) throw new ApiError(resp.status, await errorMessage(resp));
    if (opts.raw) return resp;
    if (resp.status === 204) return null;
    return resp.json();
  }

  // Reads a streaming response as text chunks until it ends (or its fetch is aborted).
  async function readChunks(resp, onChunk) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        onChunk(decoder.decode());
        return;
      }
      onChunk(decoder.decode(value, { stream: true }));
    }
  }

  // Server-Sent Events parsed by hand: `event:` and `data:` lines, a blank line ends an event.
  function sseParser(onEvent) {
    let buf = '';
    let type = '';
    let data = [];
    return (chunk) => {
      buf += chunk;
      const lines = buf.split('\n');
      buf = lines.pop();
      for (let line of lines) {
        if (line.endsWith('\r')) line = line.slice(0, -1);
        if (line === '') {
          if (data.length) onEvent(type || 'message', data.join('\n'));
          type = '';
          data = [];
          continue;
        }
        if (line.startsWith(':')) continue;
        const i = line.indexOf(':');
        const field = i < 0 ? line : line.slice(0, i);
        let val = i < 0 ? '' : line.slice(i + 1);
        if (val.startsWith(' ')) val = val.slice(1);
        if (field === 'event') type = val;
        else if (field === 'data') data.push(val);
      }
    };
  }

  async function sse(path, signal, onOpen, onEvent) {
    const resp = await api(path, { raw: true, signal, headers: { Accept: 'text/event-stream' } });
    onOpen();
    await readChunks(resp, sseParser(onEvent));
  }

  // ---------------------------------------------------------------------------------------
  // The token dialog.

  function askToken(why) {
    const dialog = $('#token-dialog');
    setLive('locked');
    $('#token-why').textContent = why || 'This API needs a token.';
    if (!dialog.hidden) return;
    dialog.hidden = false;
    $('#token-input').value = '';
    $('#token-input').focus();
  }

  function setupToken() {
    const dialog = $('#token-dialog');
    $('#token-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const t = $('#token-input').value.trim();
      if (!t) return;
      sessionStorage.setItem(TOKEN, t);
      dialog.hidden = true;
      restart();
    });
    $('#token-cancel').addEventListener('click', () => {
      dialog.hidden = true;
    });
    $('#token-forget').addEventListener('click', () => {
      sessionStorage.removeItem(TOKEN);
      dialog.hidden = true;
      restart();
    });
    $('#token-button').addEventListener('click', () => {
      $('#token-why').textContent = sessionStorage.getItem(TOKEN)
        ? 'A token is set for this tab. Enter another to replace it.'
        : 'No token is set: the API is used without one.';
      dialog.hidden = false;
      $('#token-input').value = '';
      $('#token-input').focus();
    });
  }

  // ---------------------------------------------------------------------------------------
  // The cluster's event stream, shared by every view.

  const listeners = new Set();
  let stream = null;
  let lastRevision = null;

  function setLive(state) {
    const el = $('#live');
    el.dataset.live = state;
    $('#live-text').textContent = { live: 'live', connecting: 'connecting', reconnecting: 'reconnecting', locked: 'needs a token' }[state] || state;
  }

  function banner(text) {
    const el = $('#banner');
    el.hidden = !text;
    el.textContent = text || '';
  }

  function publish(ev) {
    for (const f of Array.from(listeners)) f(ev);
  }

  function startStream() {
    if (stream) stream.abort();
    const ctl = new AbortController();
    stream = ctl;
    (async () => {
      let failures = 0;
      while (!ctl.signal.aborted) {
        setLive(failures ? 'reconnecting' : 'connecting');
        try {
          const from = lastRevision === null ? '' : `?from=${lastRevision + 1}`;
          await sse(`/v1/events${from}`, ctl.signal, () => {
            setLive('live');
            banner('');
            // Whatever happened while disconnected: every view reloads.
            if (failures) publish({ kind: 'resync' });
            failures = 0;
          }, (type, data) => {
            if (type !== 'cluster') return;
            let ev;
            try {
              ev = JSON.parse(data);
            } catch (_) {
              return;
            }
            lastRevision = ev.revision;
            publish(ev);
          });
        } catch (err) {
          if (ctl.signal.aborted) return;
          if (err.status === 401) return; // The token dialog is open; restart() resumes.
          if (err.status === 400) lastRevision = null; // Cannot resume there: start afresh.
          if (err.status === 403) {
            setLive('locked');
            banner(`Live updates are off: ${err.message}`);
            return;
          }
        }
        if (ctl.signal.aborted) return;
        failures += 1;
        setLive('reconnecting');
        if (failures > 2) banner('Live updates are disconnected: retrying…');
        await sleep(Math.min(10000, 500 * 2 ** Math.min(failures, 5)), ctl.signal);
      }
    })();
  }

  function sleep(ms, signal) {
    return new Promise((resolve) => {
      const t = setTimeout(resolve, ms);
      if (signal) signal.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
    });
  }

  // ---------------------------------------------------------------------------------------
  // Views: each gets a context that owns its timers, listeners and requests.

  function context() {
    const ctl = new AbortController();
    const intervals = new Set();
    const timeouts = new Set();
    const mine = new Set();
    const ctx = {
      signal: ctl.signal,
      get alive() {
        return !ctl.signal.aborted;
      },
      fetch(path, opts = {}) {
        return api(path, Object.assign({}, opts, { signal: ctl.signal }));
      },
      every(ms, fn) {
        intervals.add(setInterval(fn, ms));
      },
      later(ms, fn) {
        const t = setTimeout(() => {
          timeouts.delete(t);
          fn();
        }, ms);
        timeouts.add(t);
        return t;
      },
      cancel(t) {
        clearTimeout(t);
        timeouts.delete(t);
      },
      onCluster(fn) {
        listeners.add(fn);
        mine.add(fn);
      },
      // A reload that never runs twice at once and at most every `gap` ms (or three times
      // as long as it last took, on a slow API): events can come by the thousand.
      refresher(load, gap = 1000) {
        let running = false;
        let again = false;
        let timer = null;
        let last = -Infinity;
        let cost = 0;
        const run = async () => {
          timer = null;
          if (!ctx.alive) return;
          running = true;
          const t0 = performance.now();
          try {
            await load();
          } catch (_) {
            // Loaders show their own errors.
          }
          cost = performance.now() - t0;
          last = performance.now();
          running = false;
          if (again) {
            again = false;
            kick();
          }
        };
        const kick = () => {
          if (!ctx.alive || timer !== null) return;
          if (running) {
            again = true;
            return;
          }
          const wait = Math.max(0, last + Math.max(gap, 3 * cost) - performance.now());
          timer = ctx.later(wait, run);
        };
        return kick;
      },
      dispose() {
        ctl.abort();
        intervals.forEach(clearInterval);
        timeouts.forEach(clearTimeout);
        mine.forEach((f) => listeners.delete(f));
      },
    };
    return ctx;
  }

  function section(title, id, ...extra) {
    return h('section', { class: 'card', id }, h('h2', { text: title }), ...extra, h('div', { class: 'body' }, h('p', { class: 'muted', text: 'Loading…' })));
  }

  function fill(box, render, value) {
    const body = $('.body', box);
    try {
      body.replaceChildren(render(value));
    } catch (err) {
      body.replaceChildren(h('p', { class: 'error', text: `cannot show this: ${err.message}` }));
    }
  }

  function fail(box, err) {
    if (isAbort(err)) return;
    $('.body', box).replaceChildren(h('p', { class: 'error', text: errorText(err) }));
  }

  // ---------------------------------------------------------------------------------------
  // Overview: control plane, backends by state, drones.

  function overview(view, ctx) {
    const cluster = section('Control plane', 'cluster');
    const states = section('Backends by state', 'states');
    const drones = section('Drones', 'drones');
    view.append(h('div', { class: 'grid2' }, cluster, states), drones);

    const load = async () => {
      const [c, b, d] = await Promise.allSettled([
        ctx.fetch('/v1/cluster'),
        ctx.fetch('/v1/backends?limit=0'),
        ctx.fetch('/v1/drones'),
      ]);
      if (!ctx.alive) return;
      for (const [box, r, render] of [[cluster, c, renderCluster], [states, b, renderStates], [drones, d, renderDrones]]) {
        if (r.status === 'fulfilled') fill(box, render, r.value);
        else fail(box, r.reason);
      }
    };
    const kick = ctx.refresher(load, 500);
    kick();
    // Heartbeat ages move on their own.
    ctx.every(3000, kick);
    ctx.onCluster(kick);
  }

  function renderCluster(c) {
    const leader = c.leader;
    const rows = (c.instances || []).map((i) => h('tr', { data: { instance: i.instance } },
      h('td', {}, h('span', { class: 'mono', text: i.instance }), ' ',
        i.leader ? badge('leader') : null,
        i.instance === c.this_instance ? h('span', { class: 'muted small', text: ' (answering)' }) : null),
      h('td', { class: 'mono', text: i.api_url }),
      h('td', { text: ago(i.started_at) })));
    return h('div', {},
      h('p', {},
        'Leader: ',
        leader ? h('strong', { class: 'mono', text: leader.instance }) : h('span', { class: 'error', text: 'none known' }),
        leader ? h('span', { class: 'muted', text: ` · term ${leader.term} · elected ${ago(leader.elected_at)}` }) : null),
      h('p', {},
        'Store: ',
        c.store.healthy
          ? h('span', {}, badge('ready', 'healthy'), h('span', { class: 'muted', text: ` at revision ${c.store.revision}` }))
          : h('span', { class: 'error', text: c.store.error || 'unhealthy' })),
      rows.length
        ? h('table', { class: 'table' },
          h('thead', {}, h('tr', {}, h('th', { text: 'Instance' }), h('th', { text: 'API' }), h('th', { text: 'Started' }))),
          h('tbody', {}, rows))
        : h('p', { class: 'muted', text: 'No instance record (a single dev instance may have none).' }));
  }

  function renderStates(page) {
    const counts = page.counts || {};
    const total = STATES.reduce((n, st) => n + (counts[st] || 0), 0);
    const live = STATES.filter((st) => st !== 'terminated').reduce((n, st) => n + (counts[st] || 0), 0);
    const bar = h('div', { class: 'stack', title: `${total} backends` },
      STATES.filter((st) => counts[st]).map((st) => h('div', { class: `s-${st}`, title: `${st}: ${counts[st]}`, style: { width: `${(100 * counts[st]) / total}%` } })));
    return h('div', {},
      h('div', {}, h('span', { class: 'big', id: 'live-count', text: live.toLocaleString() }), h('span', { class: 'muted', text: ` live of ${total.toLocaleString()} recorded` })),
      bar,
      h('div', { class: 'legend' }, STATES.map((st) => h('a', { href: `#/backends?status=${st}`, data: { state: st } },
        h('span', { class: `swatch s-${st}` }), st, h('span', { class: 'count', text: (counts[st] || 0).toLocaleString() })))));
  }

  function renderDrones(list) {
    if (!list.drones.length) return h('p', { class: 'empty', text: 'No drone is known.' });
    const rows = list.drones.map((d) => {
      const cap = d.capacity || {};
      const res = d.reserved || { cpu_millis: 0, memory_mb: 0, backends: 0 };
      const byState = Object.entries(d.backends || {}).map(([st, n]) => `${st} ${n}`).join(' · ');
      return h('tr', { data: { drone: d.name } },
        h('td', {}, h('a', { href: `#/backends?drone=${enc(d.name)}&status=live`, class: 'mono', text: d.name })),
        h('td', { class: 'state' }, badge(d.state), d.message ? h('div', { class: 'muted small', text: d.message }) : null),
        h('td', { text: [d.runtime, d.pool].filter(Boolean).join(' · ') || '—' }),
        h('td', {}, meter(res.cpu_millis, cap.cpu_millis, ' m')),
        h('td', {}, meter(res.memory_mb, cap.memory_mb, ' MB')),
        h('td', {}, meter(res.backends, cap.max_backends, '')),
        h('td', { class: 'num heartbeat', text: fmtAge(d.heartbeat_age_ms) }),
        h('td', { class: 'small', text: byState || '—' }),
        h('td', { class: 'mono small', text: d.instance || '—' }));
    });
    return h('div', { class: 'table-wrap' }, h('table', { class: 'table', id: 'drone-table' },
      h('thead', {}, h('tr', {}, ['Drone', 'State', 'Runtime · pool', 'CPU reserved', 'Memory reserved', 'Backends / max', 'Heartbeat', 'Backends by state', 'Session on']
        .map((t) => h('th', { text: t, class: t === 'Heartbeat' ? 'num' : null })))),
      h('tbody', {}, rows)));
  }

  // ---------------------------------------------------------------------------------------
  // Backends: filters and server-side pages.

  function backendsList(view, ctx, params) {
    const f = {
      status: params.get('status') || '',
      key: params.get('key') || '',
      pool: params.get('pool') || '',
      drone: params.get('drone') || '',
      order: params.get('order') || 'desc',
    };
    // Cursors of the pages before this one (Previous pops one).
    const before = [];
    let after = null;
    let next = null;
    // The rows shown, by backend id: `{updated, tr}`.
    let rows_ = new Map();

    const statusSel = h('select', { id: 'filter-status' },
      h('option', { value: '', text: 'any' }), h('option', { value: 'live', text: 'live' }),
      STATES.map((st) => h('option', { value: st, text: st })));
    statusSel.value = f.status;
    const keyIn = h('input', { id: 'filter-key', type: 'search', placeholder: 'namespace/name', value: f.key });
    const poolIn = h('input', { id: 'filter-pool', type: 'search', placeholder: 'pool', value: f.pool });
    const droneSel = h('select', { id: 'filter-drone' }, h('option', { value: '', text: 'any' }));
    if (f.drone) droneSel.append(h('option', { value: f.drone, text: f.drone }));
    droneSel.value = f.drone;
    const orderSel = h('select', { id: 'filter-order' },
      h('option', { value: 'desc', text: 'newest first' }), h('option', { value: 'asc', text: 'oldest first' }));
    orderSel.value = f.order;
    const goId = h('input', { type: 'search', placeholder: 'backend id', id: 'goto-id' });

    const tbody = h('tbody', { id: 'backend-rows' });
    const summary = h('span', { class: 'muted', id: 'backend-summary', text: 'Loading…' });
    const prev = h('button', { type: 'button', class: 'quiet', text: '← Previous', disabled: true });
    const nextBtn = h('button', { type: 'button', class: 'quiet', text: 'Next →', disabled: true });
    const error = h('p', { class: 'error', hidden: true });

    view.append(h('section', { class: 'card', id: 'backends' },
      h('h2', { text: 'Backends' }),
      h('form', { class: 'filters', onsubmit: (ev) => {
        ev.preventDefault();
        const id = goId.value.trim();
        if (id) location.hash = `#/backends/${enc(id)}`;
      } },
      h('label', {}, 'State', statusSel), h('label', {}, 'Key contains', keyIn), h('label', {}, 'Pool', poolIn),
      h('label', {}, 'Drone', droneSel), h('label', {}, 'Order', orderSel), h('label', {}, 'Open by id', goId)),
      error,
      h('div', { class: 'table-wrap' }, h('table', { class: 'table', id: 'backend-table' },
        h('thead', {}, h('tr', {}, ['Backend', 'Key', 'State', 'Drone', 'Pool', 'Epoch', 'Created', 'Ready', 'Message'].map((t) => h('th', { text: t })))),
        tbody)),
      h('div', { class: 'pager' }, summary, prev, nextBtn)));

    const load = async () => {
      const q = new URLSearchParams({ limit: String(PAGE), order: f.order });
      for (const k of ['status', 'key', 'pool', 'drone']) if (f[k]) q.set(k, f[k]);
      if (after) q.set('after', after);
      let page;
      try {
        page = await ctx.fetch(`/v1/backends?${q}`);
      } catch (err) {
        if (isAbort(err)) return;
        error.hidden = false;
        error.textContent = errorText(err);
        return;
      }
      if (!ctx.alive) return;
      error.hidden = true;
      next = page.next || null;
      // Rows whose backend did not change are kept (not rebuilt), so that nothing moves under
      // a pointer about to click it.
      const kept = new Map();
      const rows = page.backends.map((b) => {
        const old = rows_.get(b.id);
        const tr = old && old.updated === b.updated_at ? old.tr : backendRow(b);
        kept.set(b.id, { updated: b.updated_at, tr });
        return tr;
      });
      rows_ = kept;
      tbody.replaceChildren(...rows);
      if (!page.backends.length) {
        tbody.append(h('tr', {}, h('td', { colspan: 9, class: 'empty', text: 'No backend matches.' })));
      }
      const first = before.length * PAGE;
      summary.textContent = page.backends.length
        ? `${(first + 1).toLocaleString()}–${(first + page.backends.length).toLocaleString()} of ${page.total.toLocaleString()}`
        : `0 of ${page.total.toLocaleString()}`;
      prev.disabled = before.length === 0;
      nextBtn.disabled = !next;
      for (const opt of statusSel.options) {
        const c = page.counts || {};
        const n = opt.value === '' ? STATES.reduce((a, st) => a + (c[st] || 0), 0)
          : opt.value === 'live' ? STATES.filter((st) => st !== 'terminated').reduce((a, st) => a + (c[st] || 0), 0)
            : c[opt.value] || 0;
        opt.textContent = `${opt.value || 'any'} (${n.toLocaleString()})`;
      }
    };
    // Short: a connect should show up at once; a slow API stretches it (see refresher).
    const kick = ctx.refresher(load, 250);

    const changed = () => {
      f.status = statusSel.value;
      f.key = keyIn.value.trim();
      f.pool = poolIn.value.trim();
      f.drone = droneSel.value;
      f.order = orderSel.value;
      before.length = 0;
      after = null;
      const q = new URLSearchParams();
      for (const k of ['status', 'key', 'pool', 'drone']) if (f[k]) q.set(k, f[k]);
      if (f.order !== 'desc') q.set('order', f.order);
      history.replaceState(null, '', `#/backends${q.toString() ? `?${q}` : ''}`);
      kick();
    };
    let typing = null;
    const typed = () => {
      if (typing !== null) ctx.cancel(typing);
      typing = ctx.later(300, () => {
        typing = null;
        changed();
      });
    };
    statusSel.addEventListener('change', changed);
    droneSel.addEventListener('change', changed);
    orderSel.addEventListener('change', changed);
    keyIn.addEventListener('input', typed);
    poolIn.addEventListener('input', typed);
    prev.addEventListener('click', () => {
      after = before.pop() || null;
      kick();
    });
    nextBtn.addEventListener('click', () => {
      if (!next) return;
      before.push(after);
      after = next;
      kick();
    });

    // The drones for the filter.
    ctx.fetch('/v1/drones').then((list) => {
      for (const d of list.drones) {
        if (d.name !== f.drone) droneSel.append(h('option', { value: d.name, text: d.name }));
      }
    }).catch(() => {});

    kick();
    ctx.every(5000, kick);
    ctx.onCluster((ev) => {
      if (ev.kind === 'backend') {
        // Shown at once where it is on this page; the page reloads for the rest.
        const row = tbody.querySelector(`tr[data-backend-id="${CSS.escape(ev.id)}"]`);
        if (row) {
          rows_.delete(ev.id);
          const cell = $('td.state', row);
          cell.replaceChildren(badge(ev.what === 'terminated' && /reason (failed|lost|fenced|startup_timeout)/.test(ev.detail || '') ? 'failed' : ev.what, ev.what));
          cell.firstChild.dataset.status = ev.what;
        }
      }
      if (ev.kind === 'backend' || ev.kind === 'resync') kick();
    });
  }

  function backendRow(b) {
    const stateBadge = backendBadge(b);
    stateBadge.dataset.status = b.status;
    return h('tr', { data: { backendId: b.id } },
      h('td', {}, h('a', { href: `#/backends/${enc(b.id)}`, class: 'mono', text: b.id })),
      h('td', { class: 'mono', text: keyText(b.key) || (b.pool ? '(warm)' : '—') }),
      h('td', { class: 'state' }, stateBadge),
      h('td', { class: 'mono', text: b.drone || '—' }),
      h('td', { text: b.pool || '—' }),
      h('td', { class: 'num', text: String(b.epoch) }),
      h('td', { text: fmtTime(b.created_at) }),
      h('td', { text: b.ready_at ? fmtTime(b.ready_at) : '—' }),
      h('td', { class: 'small', text: b.message || '' }));
  }

  // ---------------------------------------------------------------------------------------
  // One backend: facts, timeline, traffic, logs, terminate.

  function backendPage(view, ctx, id) {
    const head = h('section', { class: 'card', id: 'backend' }, h('p', { class: 'muted', text: 'Loading…' }));
    const timeline = h('ol', { class: 'timeline', id: 'timeline' });
    const traffic = h('div', { class: 'charts', id: 'traffic' }, h('p', { class: 'muted', text: 'Loading…' }));
    const logs = h('pre', { class: 'logs', id: 'logs' });
    const logNote = h('p', { class: 'notice', id: 'logs-note', hidden: true });
    view.append(
      h('p', {}, h('a', { href: '#/backends', text: '← Backends' })),
      head,
      h('div', { class: 'grid2' },
        h('section', { class: 'card' }, h('h2', { text: 'Timeline' }), timeline),
        h('section', { class: 'card' }, h('h2', {}, 'Traffic ', h('span', { class: 'muted small', text: 'last 5 minutes, from the proxies reporting to this instance' })), traffic)),
      h('section', { class: 'card' }, h('h2', { text: 'Logs' }), logNote, logs));

    const steps = [];
    let backend = null;
    const addStep = (at, state, note) => {
      const last = steps[steps.length - 1];
      if (last && last.state === state) return;
      steps.push({ at, state, note });
      timeline.append(h('li', { data: { state } }, h('time', { text: fmtTime(at) }), h('strong', { text: state }),
        note ? h('span', { class: 'muted', text: ` — ${note}` }) : null));
    };

    // Built once, then updated in place: the terminate buttons must not be rebuilt under a
    // pointer by a state event.
    const title = h('h1', { class: 'mono', text: id });
    const stateSlot = h('span');
    const actions = h('div', { class: 'actions' });
    const message = h('p', { class: 'muted', id: 'backend-message', hidden: true });
    const factList = h('dl', { class: 'facts' });
    let controls = null;
    const render = (b) => {
      backend = b;
      const live = b.status !== 'terminated';
      const facts = [
        ['Key', keyText(b.key) || (b.pool ? 'none (warm)' : 'none')],
        ['Drone', b.drone || '—'],
        ['Pool', b.pool || '—'],
        ['Epoch', String(b.epoch)],
        ['Address', b.address || '—'],
        ['User', b.user || '—'],
        ['Public', b.public ? 'yes' : 'no'],
        ['Idle timeout', b.idle_timeout_s ? `${b.idle_timeout_s} s` : '—'],
        ['Lifetime', b.lifetime_s ? `${b.lifetime_s} s` : '—'],
        ['Created', fmtTime(b.created_at)],
        ['Ready', fmtTime(b.ready_at)],
        ['Ended', fmtTime(b.terminated_at)],
        ['Updated', fmtTime(b.updated_at)],
      ];
      const stateBadge = backendBadge(b);
      stateBadge.id = 'backend-state';
      stateBadge.dataset.status = b.status;
      stateSlot.replaceChildren(stateBadge);
      if (live && !controls) {
        controls = terminateControls(ctx, b, render);
        actions.append(...controls);
      } else if (!live && controls) {
        actions.replaceChildren();
      }
      message.hidden = !b.message;
      message.textContent = b.message || '';
      factList.replaceChildren(...facts.map(([k, v]) => h('div', {}, h('dt', { text: k }), h('dd', { text: v }))));
      if (!title.isConnected) head.replaceChildren(h('div', { class: 'head-row' }, title, stateSlot, actions), message, factList);
    };

    const noteOf = (b) => [reasonText(b.reason), b.message].filter(Boolean).join(': ') || null;

    (async () => {
      let b;
      try {
        b = await ctx.fetch(`/v1/backends/${enc(id)}`);
      } catch (err) {
        if (isAbort(err)) return;
        head.replaceChildren(h('h1', { class: 'mono', text: id }), h('p', { class: 'error', text: errorText(err) }));
        traffic.replaceChildren();
        return;
      }
      if (!ctx.alive) return;
      render(b);
      addStep(b.created_at, 'scheduled');
      if (b.ready_at) addStep(b.ready_at, 'ready');
      if (b.status !== 'terminated' && b.status !== 'scheduled' && b.status !== 'ready') addStep(b.updated_at, b.status, noteOf(b));
      if (b.terminated_at) addStep(b.terminated_at, 'terminated', noteOf(b));
      followBackend();
      followLogs();
    })();

    // Its state changes: the current state first, then one event per change.
    const followBackend = async () => {
      let failures = 0;
      while (ctx.alive && backend && backend.status !== 'terminated') {
        try {
          await sse(`/v1/backends/${enc(id)}/events`, ctx.signal, () => { failures = 0; }, (type, data) => {
            if (type !== 'state') return;
            const b = JSON.parse(data);
            render(b);
            addStep(b.status === 'ready' && b.ready_at ? b.ready_at : b.status === 'terminated' && b.terminated_at ? b.terminated_at : b.updated_at,
              b.status, b.status === 'terminating' || b.status === 'terminated' ? noteOf(b) : null);
          });
        } catch (err) {
          if (isAbort(err) || err.status === 401 || err.status === 403 || err.status === 404) return;
        }
        failures += 1;
        await sleep(Math.min(10000, 500 * 2 ** Math.min(failures, 5)), ctx.signal);
      }
    };

    // Traffic, every 5 s (the samples are 5 s wide).
    const loadTraffic = async () => {
      let t;
      try {
        t = await ctx.fetch(`/v1/backends/${enc(id)}/traffic`);
      } catch (err) {
        if (isAbort(err)) return;
        traffic.replaceChildren(h('p', { class: 'error', text: errorText(err) }));
        return;
      }
      if (!ctx.alive) return;
      traffic.replaceChildren(
        barChart(t.samples, (x) => x.requests_per_second, 'Requests per second', 'req/s', t.window_s, 'rate'),
        barChart(t.samples, (x) => x.mean_latency_ms, 'Mean latency', 'ms', t.window_s, 'latency'));
    };
    loadTraffic();
    ctx.every(5000, loadTraffic);

    // Logs: followed as a text stream; the endpoint may not exist on this version.
    const MAX_LINES = 2000;
    const followLogs = async () => {
      let text = '';
      const show = (chunk) => {
        if (!chunk) return;
        const atBottom = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 4;
        text += chunk;
        const lines = text.split('\n');
        if (lines.length > MAX_LINES) text = lines.slice(lines.length - MAX_LINES).join('\n');
        // Terminal colours mean nothing here.
        logs.textContent = text.replace(/\x1b\[[0-9;]*[A-Za-z]/g, '');
        if (atBottom) logs.scrollTop = logs.scrollHeight;
      };
      try {
        const resp = await ctx.fetch(`/v1/backends/${enc(id)}/logs?follow=true&tail=200`, { raw: true, headers: { Accept: 'text/plain' } });
        await readChunks(resp, show);
        logNote.hidden = false;
        logNote.textContent = text ? 'End of the logs.' : 'No log lines.';
      } catch (err) {
        if (isAbort(err)) return;
        logNote.hidden = false;
        logs.hidden = !text;
        if (err.status === 404) logNote.textContent = `Logs are not available here (404): ${err.message}`;
        else if (err.status === 503) logNote.textContent = `Logs are not available right now (503): ${err.message}`;
        else logNote.textContent = `Logs are not available: ${errorText(err)}`;
      }
    };
  }

  function terminateControls(ctx, b, render) {
    const start = h('button', { type: 'button', class: 'danger', id: 'terminate', text: 'Terminate…' });
    const graceful = h('button', { type: 'button', class: 'danger', id: 'terminate-confirm', text: 'Stop gracefully', hidden: true });
    const kill = h('button', { type: 'button', class: 'danger', id: 'terminate-kill', text: 'Kill now', hidden: true });
    const cancel = h('button', { type: 'button', class: 'quiet', id: 'terminate-cancel', text: 'Cancel', hidden: true });
    const msg = h('span', { class: 'error small', id: 'terminate-error', hidden: true });
    const confirming = (on) => {
      start.hidden = on;
      graceful.hidden = !on;
      kill.hidden = !on;
      cancel.hidden = !on;
    };
    const go = async (hard) => {
      graceful.disabled = true;
      kill.disabled = true;
      try {
        const after = await ctx.fetch(`/v1/backends/${enc(b.id)}/terminate`, { method: 'POST', body: { hard } });
        if (!ctx.alive) return;
        confirming(false);
        msg.hidden = true;
        graceful.disabled = false;
        kill.disabled = false;
        render(after);
      } catch (err) {
        if (isAbort(err)) return;
        confirming(false);
        msg.hidden = false;
        msg.textContent = err.status === 403 ? `Not allowed: ${err.message}` : errorText(err);
        // A token without the scope stays without it: no use offering the button again.
        if (err.status === 403) start.disabled = true;
        graceful.disabled = false;
        kill.disabled = false;
      }
    };
    start.addEventListener('click', () => confirming(true));
    cancel.addEventListener('click', () => confirming(false));
    graceful.addEventListener('click', () => go(false));
    kill.addEventListener('click', () => go(true));
    return [msg, start, graceful, kill, cancel];
  }

  // A bar chart over the window: one bar per sample, drawn as inline SVG.
  function barChart(samples, value, label, unit, windowS, kind) {
    const W = 600;
    const H = 100;
    const vals = samples.map(value);
    const known = vals.filter((v) => v !== null && v !== undefined);
    const max = known.length ? Math.max(...known) : 0;
    const top = max > 0 ? max * 1.1 : 1;
    const bw = W / Math.max(1, samples.length);
    const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', class: 'chart', role: 'img', 'aria-label': label });
    for (const y of [0.25, 0.5, 0.75]) svg.append(s('line', { class: 'grid', x1: 0, x2: W, y1: H * y, y2: H * y }));
    samples.forEach((sample, i) => {
      const v = vals[i];
      if (v === null || v === undefined || v <= 0) return;
      const bh = Math.max(1, (v / top) * H);
      svg.append(s('rect', { class: `bar ${kind}`, x: i * bw + 0.5, y: H - bh, width: Math.max(1, bw - 1), height: bh },
        s('title', { text: `${fmtTime(sample.at)}: ${fmtNum(v, 2)} ${unit}` })));
    });
    const last = known.length ? vals[vals.length - 1] : null;
    return h('figure', { class: 'chart-box', data: { chart: kind } },
      h('figcaption', {}, h('span', { text: label }),
        h('span', { text: known.length ? `last ${fmtNum(last ?? 0, 2)} · max ${fmtNum(max, 2)} ${unit}` : 'no traffic' })),
      svg,
      h('div', { class: 'chart-axis' }, h('span', { text: `−${Math.round(windowS / 60)} min` }), h('span', { text: 'now' })));
  }

  function sparkline(samples) {
    const W = 160;
    const H = 28;
    const vals = samples.map((x) => x.requests_per_second);
    const max = Math.max(0, ...vals);
    const bw = W / Math.max(1, vals.length);
    const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', class: 'spark', role: 'img', 'aria-label': 'request rate' });
    vals.forEach((v, i) => {
      if (v <= 0) return;
      const bh = Math.max(1, (v / (max * 1.05)) * H);
      svg.append(s('rect', { class: 'bar', x: i * bw, y: H - bh, width: Math.max(0.5, bw - 0.5), height: bh },
        s('title', { text: `${fmtTime(samples[i].at)}: ${fmtNum(v, 2)} req/s` })));
    });
    return svg;
  }

  // ---------------------------------------------------------------------------------------
  // Hot shards.

  function hot(view, ctx) {
    const summary = section('Hot shards', 'hot-summary');
    const backends = section('Hot backends', 'hot-backends');
    const drones = section('Hot drones', 'hot-drones');
    view.append(summary, backends, drones);
    const charts = new Map();
    const fetched = new Map();

    const load = async () => {
      let list;
      try {
        list = await ctx.fetch('/v1/hot');
      } catch (err) {
        [summary, backends, drones].forEach((b) => fail(b, err));
        return;
      }
      if (!ctx.alive) return;
      fill(summary, renderHotSummary, list);
      fill(backends, (l) => renderHotBackends(l, charts), list);
      fill(drones, renderHotDrones, list);
      // Each hot backend's rate over the last minutes (the first 20), at most once a step.
      const now = Date.now();
      await Promise.all(list.backends.slice(0, 20).map(async (b) => {
        if (now - (fetched.get(b.backend) || 0) < 5000) return;
        fetched.set(b.backend, now);
        try {
          const t = await ctx.fetch(`/v1/backends/${enc(b.backend)}/traffic`);
          charts.set(b.backend, t.samples);
          const cell = backends.querySelector(`td[data-spark="${CSS.escape(b.backend)}"]`);
          if (cell) cell.replaceChildren(sparkline(t.samples));
        } catch (_) {
          // A backend that ended meanwhile: no chart.
        }
      }));
    };
    const kick = ctx.refresher(load, 2000);
    kick();
    ctx.every(2000, kick);
  }

  function renderHotSummary(l) {
    const st = l.settings;
    return h('div', {},
      h('p', {}, l.evaluated_at ? `Evaluated ${ago(l.evaluated_at)}` : 'Not evaluated yet',
        ` · ${l.backends.length} hot backend${l.backends.length === 1 ? '' : 's'} · ${l.drones.length} hot drone${l.drones.length === 1 ? '' : 's'} · ${l.relocated_total} relocated since start`),
      h('p', { class: 'muted small', text: `A backend is hot when, sustained for ${st.sustain_s} s over ${st.window_s} s, its request rate is above ${st.rate_multiple}× its pool's median (and at least ${st.min_rate}/s), or it uses more than ${Math.round(st.cpu_fraction * 100)}% of its CPU cap. A drone is hot above ${Math.round(st.drone_cpu_fraction * 100)}% CPU or ${Math.round(st.drone_reserved_fraction * 100)}% reserved. Relief of hot drones is ${st.relieve ? 'on' : 'off'}.` }));
  }

  function renderHotBackends(l, charts) {
    if (!l.backends.length) return h('p', { class: 'empty', text: 'Nothing is hot.' });
    return h('div', { class: 'table-wrap' }, h('table', { class: 'table', id: 'hot-table' },
      h('thead', {}, h('tr', {}, ['Backend', 'Drone', 'Pool', 'Why', 'Req/s', 'Pool median', 'CPU cores / cap', 'Hot since', 'Rate, last 5 min'].map((t) => h('th', { text: t })))),
      h('tbody', {}, l.backends.map((b) => h('tr', { data: { backendId: b.backend } },
        h('td', {}, h('a', { href: `#/backends/${enc(b.backend)}`, class: 'mono', text: b.backend })),
        h('td', { class: 'mono', text: b.drone || '—' }),
        h('td', { text: b.pool || '—' }),
        h('td', {}, b.reasons.map((r) => badge('hot', r.replace(/_/g, ' ')))),
        h('td', { class: 'num', text: fmtNum(b.requests_per_second, 2) }),
        h('td', { class: 'num', text: fmtNum(b.pool_median_requests_per_second, 2) }),
        h('td', { class: 'num', text: `${fmtNum(b.cpu_cores, 2)} / ${fmtNum(b.cpu_cap_cores, 2)}` }),
        h('td', { title: fmtTime(b.hot_since), text: ago(b.hot_since) }),
        h('td', { data: { spark: b.backend } }, charts.has(b.backend) ? sparkline(charts.get(b.backend)) : null))))));
  }

  function renderHotDrones(l) {
    if (!l.drones.length) return h('p', { class: 'empty', text: 'No drone is hot.' });
    const pct = (f) => meter(Math.round(f * 100), 100, '%');
    return h('table', { class: 'table' },
      h('thead', {}, h('tr', {}, ['Drone', 'Why', 'CPU in use', 'CPU reserved', 'Memory reserved', 'Hot since'].map((t) => h('th', { text: t })))),
      h('tbody', {}, l.drones.map((d) => h('tr', { data: { drone: d.drone } },
        h('td', { class: 'mono', text: d.drone }),
        h('td', {}, d.reasons.map((r) => badge('hot', r.replace(/_/g, ' ')))),
        h('td', {}, meter(Math.round(d.cpu_cores * 100) / 100, Math.round(d.cpu_capacity_cores * 100) / 100, ' cores')),
        h('td', {}, pct(d.reserved_cpu_fraction)),
        h('td', {}, pct(d.reserved_memory_fraction)),
        h('td', { text: ago(d.hot_since) })))));
  }

  // ---------------------------------------------------------------------------------------
  // Pools and rollouts.

  function rolloutText(p) {
    const r = p.rollout;
    if (!r) return null;
    return `generation ${r.generation} to ${r.canary_percent}% · ${r.healthy} healthy, ${r.failed} failed · deadline in ${fmtAge(Math.max(0, r.deadline_at - Date.now()))}`;
  }

  function pools(view, ctx) {
    const box = section('Pools', 'pools');
    view.append(box);
    const load = async () => {
      try {
        const list = await ctx.fetch('/v1/pools');
        if (ctx.alive) fill(box, renderPools, list);
      } catch (err) {
        fail(box, err);
      }
    };
    const kick = ctx.refresher(load, 1000);
    kick();
    ctx.every(3000, kick);
    ctx.onCluster((ev) => {
      if (ev.kind === 'pool' || ev.kind === 'resync') kick();
    });
  }

  function renderPools(list) {
    if (!list.pools.length) return h('p', { class: 'empty' }, 'No pool. Create one with ', h('code', { text: 'hangar pool create default --warm 5' }), '.');
    return h('div', { class: 'table-wrap' }, h('table', { class: 'table', id: 'pool-table' },
      h('thead', {}, h('tr', {}, ['Pool', 'Warm ready / target', 'Starting', 'Claimed', 'Generation', 'Rollout', 'Failed starts', 'Drone pool'].map((t) => h('th', { text: t })))),
      h('tbody', {}, list.pools.map((p) => h('tr', { data: { pool: p.name } },
        h('td', {}, h('a', { href: `#/pools/${enc(p.name)}`, text: p.name })),
        h('td', {}, meter(p.status.warm_ready, p.warm, '', 'good')),
        h('td', { class: 'num', text: String(p.status.warm_starting) }),
        h('td', { class: 'num' }, h('a', { href: `#/backends?pool=${enc(p.name)}&status=live`, text: String(p.status.claimed) })),
        h('td', { class: 'num', text: String(p.generation) }),
        h('td', {}, p.rollout ? badge('starting', 'rolling out') : h('span', { class: 'muted', text: 'none' }),
          p.rollout ? h('div', { class: 'small muted', text: rolloutText(p) }) : null),
        h('td', { class: 'num', title: p.status.last_failure || null,
          text: p.status.consecutive_failures ? `${p.status.failed_starts} (${p.status.consecutive_failures} in a row)` : String(p.status.failed_starts) }),
        h('td', { text: p.drone_pool }))))));
  }

  function poolPage(view, ctx, name) {
    const box = section(`Pool ${name}`, 'pool');
    const gens = section('Generations', 'generations');
    view.append(h('p', {}, h('a', { href: '#/pools', text: '← Pools' })), box, gens);
    const load = async () => {
      let p;
      try {
        p = await ctx.fetch(`/v1/pools/${enc(name)}`);
      } catch (err) {
        fail(box, err);
        fail(gens, err);
        return;
      }
      if (!ctx.alive) return;
      fill(box, renderPool, p);
      fill(gens, renderGenerations, p);
    };
    const kick = ctx.refresher(load, 1000);
    kick();
    ctx.every(3000, kick);
    ctx.onCluster((ev) => {
      if ((ev.kind === 'pool' && ev.id === name) || ev.kind === 'resync') kick();
    });
  }

  function renderPool(p) {
    const st = p.status;
    const facts = [
      ['Warm target', String(p.warm)],
      ['Warm ready', String(st.warm_ready)],
      ['Warm starting', String(st.warm_starting)],
      ['Claimed', String(st.claimed)],
      ['Max live', p.max_live ? String(p.max_live) : 'no limit'],
      ['Generation', String(p.generation)],
      ['Rollout', rolloutText(p) || 'none'],
      ['Bounds', `+${p.bounds.max_add} / −${p.bounds.max_remove} per pass`],
      ['Promote after', `${p.promote_after} healthy starts`],
      ['Failed starts', `${st.failed_starts}${st.consecutive_failures ? ` (${st.consecutive_failures} in a row)` : ''}`],
      ['Slow start', st.slow_start ? `${st.slow_start} per pass` : 'off'],
      ['Last failure', st.last_failure ? `${st.last_failure} (${ago(st.last_failure_at)})` : '—'],
      ['Drone pool', p.drone_pool],
      ['Created', fmtTime(p.created_at)],
    ];
    return h('div', {},
      h('dl', { class: 'facts' }, facts.map(([k, v]) => h('div', {}, h('dt', { text: k }), h('dd', { text: v })))),
      h('p', {}, h('a', { href: `#/backends?pool=${enc(p.name)}`, text: 'Backends of this pool →' })));
  }

  function renderGenerations(p) {
    const what = (t) => t.image || (t.command ? t.command.join(' ') : 'the default');
    return h('table', { class: 'table' },
      h('thead', {}, h('tr', {}, ['#', 'Status', 'Runs', 'Created', 'Note'].map((t) => h('th', { text: t })))),
      h('tbody', {}, p.generations.slice().reverse().map((g) => h('tr', { data: { generation: String(g.number) } },
        h('td', { class: 'num', text: String(g.number) }),
        h('td', {}, badge(g.status === 'rolling' ? 'starting' : g.status === 'stable' || g.status === 'promoted' ? 'ready' : 'terminated', g.status)),
        h('td', { class: 'mono small', text: what(g.template) }),
        h('td', { text: fmtTime(g.created_at) }),
        h('td', { class: 'small', text: g.message || '' })))));
  }

  // ---------------------------------------------------------------------------------------
  // Routing (the part after #).

  let current = null;

  function route() {
    if (current) current.dispose();
    const ctx = context();
    current = ctx;
    const hash = location.hash.replace(/^#/, '') || '/';
    const [path, qs] = hash.split('?');
    const params = new URLSearchParams(qs || '');
    const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
    const view = $('#view');
    view.replaceChildren();
    let nav = 'overview';
    if (parts.length === 0) {
      overview(view, ctx);
    } else if (parts[0] === 'backends' && parts.length > 1) {
      nav = 'backends';
      backendPage(view, ctx, parts[1]);
    } else if (parts[0] === 'backends') {
      nav = 'backends';
      backendsList(view, ctx, params);
    } else if (parts[0] === 'hot') {
      nav = 'hot';
      hot(view, ctx);
    } else if (parts[0] === 'pools' && parts.length > 1) {
      nav = 'pools';
      poolPage(view, ctx, parts[1]);
    } else if (parts[0] === 'pools') {
      nav = 'pools';
      pools(view, ctx);
    } else {
      nav = '';
      view.append(h('section', { class: 'card' }, h('h2', { text: 'Not found' }), h('p', {}, 'No such page: ', h('a', { href: '#/', text: 'back to the overview' }))));
    }
    for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', a.dataset.nav === nav);
    document.title = `Hangar · ${nav ? nav[0].toUpperCase() + nav.slice(1) : 'Not found'}`;
  }

  // A new token: the stream and the view start over with it.
  function restart() {
    lastRevision = null;
    startStream();
    route();
  }

  function main() {
    setupToken();
    window.addEventListener('hashchange', route);
    startStream();
    route();
  }

  main();
})();
