// spendflow live report: renders the overview (/) or a user's page (/users/ID) from the
// engine's JSON API, and keeps it current from its server-sent events (/api/events).
// No libraries, nothing loaded from elsewhere. Amounts arrive as integer minor units and are
// only formatted here, for display.
'use strict';

(() => {
  // ---------------------------------------------------------------------------------------
  // Helpers
  // ---------------------------------------------------------------------------------------

  /** Creates an element: el('td', {class: 'num', text: '3'}, child, ...). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === 'text') node.textContent = String(value);
      else if (key === 'class') node.className = value;
      else node.setAttribute(key, value === true ? '' : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const SVG = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    for (const child of children) node.append(child);
    return node;
  }

  // Digits after the decimal point, per ISO 4217 (2 unless listed).
  const EXPONENT = { JPY: 0, KRW: 0, ISK: 0, CLP: 0, VND: 0, UGX: 0, XAF: 0, XOF: 0, BHD: 3, KWD: 3, OMR: 3, JOD: 3, TND: 3, IQD: 3, LYD: 3 };
  const formatters = new Map();
  const integer = new Intl.NumberFormat('en-GB', { maximumFractionDigits: 0 });

  /** "€1,234.56" from 123456 minor units of EUR; without a currency "1,234.56". */
  function money(minor, currency) {
    const code = /^[A-Z]{3}$/.test(currency || '') ? currency : null;
    const exp = code && code in EXPONENT ? EXPONENT[code] : 2;
    const key = (code || '-') + exp;
    let format = formatters.get(key);
    if (!format) {
      const options = { minimumFractionDigits: exp, maximumFractionDigits: exp };
      if (code) Object.assign(options, { style: 'currency', currency: code });
      try {
        format = new Intl.NumberFormat('en-GB', options);
      } catch (_) {
        format = new Intl.NumberFormat('en-GB', { minimumFractionDigits: exp, maximumFractionDigits: exp });
      }
      formatters.set(key, format);
    }
    return format.format(minor / 10 ** exp);
  }

  function signedMoney(minor, currency) {
    return (minor > 0 ? '+' : minor < 0 ? '−' : '±') + money(Math.abs(minor), currency);
  }

  function clock(date) {
    return date.toLocaleTimeString('en-GB', { hour12: false });
  }

  function eventTime(ms) {
    if (ms === null || ms === undefined) return '–';
    return new Date(ms).toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');
  }

  function userLabel(id, name) {
    return name ? `${name} (#${id})` : `user #${id}`;
  }

  async function getJson(url) {
    const response = await fetch(url, { headers: { Accept: 'application/json' }, cache: 'no-store' });
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (response.status === 401) {
      // Not signed in, or the token expired: the sign-in page takes a new one.
      window.location.assign('/signin');
    }
    if (!response.ok) {
      const error = new Error((body && body.error) || `${response.status} ${response.statusText}`);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  /** Runs fn at most once per `ms`, and once more after the last call. */
  function throttle(fn, ms) {
    let last = 0;
    let timer = null;
    return () => {
      if (timer) return;
      const wait = Math.max(0, last + ms - Date.now());
      timer = setTimeout(() => {
        timer = null;
        last = Date.now();
        fn();
      }, wait);
    };
  }

  function flash(node, cls) {
    node.classList.remove(cls);
    void node.offsetWidth; // restart the animation
    node.classList.add(cls);
  }

  const main = document.getElementById('main');
  const names = new Map(); // user id -> {name, currency}, learnt from answers

  function remember(id, name, currency) {
    if (name) names.set(id, { name, currency });
  }

  function showError(message) {
    main.replaceChildren(
      el('p', { class: 'error', role: 'alert', 'data-testid': 'error', text: message }),
      el('p', {}, el('a', { href: '/', text: 'Back to the overview' })),
    );
  }

  // ---------------------------------------------------------------------------------------
  // Live connection (server-sent events)
  // ---------------------------------------------------------------------------------------

  const live = document.getElementById('live');
  const liveText = document.getElementById('live-text');
  const liveEpoch = document.getElementById('live-epoch');

  function setLive(state, text) {
    live.dataset.state = state;
    liveText.textContent = text;
  }

  function showEpoch(epoch) {
    liveEpoch.textContent = integer.format(epoch);
    liveEpoch.dataset.epoch = String(epoch);
    flash(live, 'tick');
  }

  /** Opens the event stream; handlers get the parsed `changes` payload, and `resync` is
   * called whenever the page must reload its state (a reconnect, or a skipped epoch). */
  function connect(query, onChanges, resync) {
    const source = new EventSource('/api/events' + query);
    let opened = false;
    source.addEventListener('hello', (event) => {
      const data = JSON.parse(event.data);
      setLive('live', 'live');
      showEpoch(data.epoch);
      if (opened) resync(); // a reconnect: changes may have been missed
      opened = true;
    });
    source.addEventListener('changes', (event) => {
      const data = JSON.parse(event.data);
      showEpoch(data.epoch);
      onChanges(data);
    });
    source.addEventListener('reset', (event) => {
      showEpoch(JSON.parse(event.data).epoch);
      resync();
    });
    source.addEventListener('error', () => {
      setLive('reconnecting', source.readyState === EventSource.CLOSED ? 'disconnected' : 'reconnecting');
    });
    window.addEventListener('pagehide', () => source.close());
  }

  // ---------------------------------------------------------------------------------------
  // Overview
  // ---------------------------------------------------------------------------------------

  function overview() {
    document.getElementById('nav-overview').setAttribute('aria-current', 'page');
    document.title = 'Overview · spendflow';
    const badge = el('a', { class: 'badge', href: '#over-h', 'data-testid': 'over-budget-badge', hidden: true });
    const categorySumHead = el('th', { class: 'num', scope: 'col', text: 'Sum of minor units' });
    const topTotalHead = el('th', { class: 'num', scope: 'col', text: 'Total' });
    const heading = el('h1', {}, 'Live expenses ', badge);
    const stats = el('p', { class: 'stats', 'data-testid': 'overview-stats' });
    const notice = el('div');
    const topBody = el('tbody');
    const topTable = el('table', { 'data-testid': 'top-spenders' },
      el('thead', {}, el('tr', {},
        el('th', { class: 'num', scope: 'col', text: '#' }),
        el('th', { scope: 'col', text: 'User' }),
        el('th', { scope: 'col', text: 'Name' }),
        topTotalHead,
        el('th', { class: 'num', scope: 'col', text: 'Expenses' }))),
      topBody);
    const categoryBody = el('tbody');
    const categoryTable = el('table', { 'data-testid': 'categories' },
      el('thead', {}, el('tr', {},
        el('th', { scope: 'col', text: 'Category' }),
        categorySumHead,
        el('th', { class: 'barcell', scope: 'col', text: 'Share' }),
        el('th', { class: 'num', scope: 'col', text: 'Expenses' }),
        el('th', { class: 'num', scope: 'col', text: 'Users' }))),
      categoryBody);
    const categoriesNote = el('p', { class: 'muted small', 'data-testid': 'categories-note' });
    const overBody = el('tbody');
    const overTable = el('table', { 'data-testid': 'over-budget' },
      el('thead', {}, el('tr', {},
        el('th', { scope: 'col', text: 'User' }),
        el('th', { scope: 'col', text: 'Month' }),
        el('th', { class: 'num', scope: 'col', text: 'Spent' }),
        el('th', { class: 'num', scope: 'col', text: 'Budget' }),
        el('th', { class: 'num', scope: 'col', text: 'Share' }))),
      overBody);
    const overNote = el('p', { class: 'muted small', 'data-testid': 'over-budget-note' });
    const feed = el('ol', { class: 'feed', 'data-testid': 'feed', 'aria-live': 'polite', 'aria-relevant': 'additions' });
    const feedEmpty = el('li', { class: 'empty', text: 'Waiting for new expenses…' });
    feed.append(feedEmpty);
    const asOf = el('span', { 'data-testid': 'as-of-epoch' });

    main.replaceChildren(
      heading,
      stats,
      notice,
      el('div', { class: 'grid overview' },
        el('div', { class: 'column' },
          el('section', { class: 'panel', 'aria-labelledby': 'over-h', 'data-testid': 'over-budget-panel' },
            el('div', { class: 'panel-head' },
              el('h2', { id: 'over-h', text: 'Over budget now' }),
              el('span', { class: 'muted small', text: 'fired 100 % alerts' })),
            overTable,
            overNote),
          el('section', { class: 'panel', 'aria-labelledby': 'top-h' },
            el('div', { class: 'panel-head' },
              el('h2', { id: 'top-h', text: 'Top spenders' }),
              el('span', { class: 'muted small' }, 'as of epoch ', asOf)),
            topTable),
          el('section', { class: 'panel', 'aria-labelledby': 'cat-h' },
            el('div', { class: 'panel-head' },
              el('h2', { id: 'cat-h', text: 'Totals by category, all users' })),
            categoryTable,
            categoriesNote)),
        el('section', { class: 'panel feed-panel', 'aria-labelledby': 'feed-h' },
          el('div', { class: 'panel-head' },
            el('h2', { id: 'feed-h', text: 'Live feed' }),
            el('span', { class: 'muted small', text: 'new totals as epochs close' })),
          feed)));

    const shown = new Map(); // user id -> total shown in the table, to mark changes

    function render(data) {
      asOf.textContent = integer.format(data.as_of.epoch);
      asOf.dataset.epoch = String(data.as_of.epoch);
      stats.replaceChildren(
        el('span', {}, el('strong', { text: integer.format(data.users) }), ' users'),
        el('span', {}, el('strong', { text: integer.format(data.live_expenses) }), ' live expenses'),
        el('span', {}, el('strong', { text: integer.format(data.records_read) }), ' records read'),
        el('span', {}, el('strong', { text: integer.format(data.records_rejected) }), ' rejected'),
        el('span', { text: data.caught_up ? 'caught up' : 'catching up…' }));
      notice.replaceChildren(data.details === 'ok' ? '' : el('p', { class: 'notice small',
        text: 'User details are not configured on this engine: pages show user ids and aggregates only.' }));

      showAlerts(data.alerts);
      const converted = data.ranking === 'converted';
      topTotalHead.textContent = converted ? `Total (${data.reporting_currency})` : 'Total';
      const rows = data.top_spenders.map((s) => {
        remember(s.user_id, s.name, s.currency);
        const href = `/users/${s.user_id}`;
        const totalCell = converted && s.converted_minor !== undefined
          ? el('td', { class: 'num', title: `${s.converted_minor} minor units of ${data.reporting_currency}; ${s.total_minor} minor units of ${s.currency || 'the user\'s currency'}`, 'data-converted-minor': s.converted_minor },
            money(s.converted_minor, data.reporting_currency),
            el('div', { class: 'muted small', 'data-testid': 'own-currency', text: money(s.total_minor, s.currency) }))
          : el('td', { class: 'num', text: money(s.total_minor, s.currency), title: `${s.total_minor} minor units` });
        if (shown.has(s.user_id) && shown.get(s.user_id) !== s.total_minor) totalCell.classList.add('flash');
        return el('tr', { 'data-user-id': s.user_id, 'data-total-minor': s.total_minor, 'data-rank': s.rank },
          el('td', { class: 'num', text: s.rank }),
          el('td', { class: 'id' }, el('a', { href, text: `#${s.user_id}`, 'aria-label': `User ${s.user_id}` })),
          el('td', {}, s.name ? el('a', { href, text: s.name, 'data-testid': 'spender-name' }) : el('span', { class: 'muted', text: '–' })),
          totalCell,
          el('td', { class: 'num', text: integer.format(s.expense_count) }));
      });
      shown.clear();
      for (const s of data.top_spenders) shown.set(s.user_id, s.total_minor);
      topBody.replaceChildren(...(rows.length ? rows : [el('tr', {}, el('td', { colspan: 5, class: 'empty', text: 'No live expenses yet.' }))]));

      const max = Math.max(1, ...data.categories.map((c) => Math.abs(c.total_minor)));
      categoryBody.replaceChildren(...data.categories.map((c) => {
        const fill = el('span');
        fill.style.width = `${(100 * Math.abs(c.total_minor)) / max}%`;
        return el('tr', { 'data-category': c.key, 'data-total-minor': c.total_minor },
          el('td', { text: c.key }),
          el('td', { class: 'num', text: data.categories_currency ? money(c.total_minor, data.categories_currency) : integer.format(c.total_minor) }),
          el('td', { class: 'barcell' }, el('div', { class: 'hbar', role: 'img', 'aria-label': `${c.key}: ${Math.round((100 * Math.abs(c.total_minor)) / max)}% of the largest` }, fill)),
          el('td', { class: 'num', text: integer.format(c.expense_count) }),
          el('td', { class: 'num', text: integer.format(c.users) }));
      }));
      categorySumHead.textContent = data.categories_currency ? `Total (${data.categories_currency})` : 'Sum of minor units';
      categoriesNote.textContent = `as of epoch ${integer.format(data.categories_as_of.epoch)}; ${data.categories_note}`;
      categoriesNote.classList.toggle('warn', !data.categories_currency);
    }

    function showBadge(count) {
      badge.hidden = !count;
      badge.textContent = `${integer.format(count)} over budget`;
      badge.dataset.count = String(count);
      badge.setAttribute('aria-label', `${count} users over budget now`);
    }

    function showAlerts(alerts) {
      if (!alerts || !alerts.available) {
        showBadge(0);
        overBody.replaceChildren(el('tr', {}, el('td', { colspan: 5, class: 'empty', text: 'Budget alerts are not available from this store.' })));
        overNote.textContent = '';
        return;
      }
      showBadge(alerts.over_budget_users);
      overBody.replaceChildren(...(alerts.over_budget.length ? alerts.over_budget.map((a) => {
        remember(a.user_id, a.name, a.currency);
        const href = `/users/${a.user_id}`;
        const share = a.budget_minor > 0 ? Math.floor((100 * a.spent_minor) / a.budget_minor) : 0;
        return el('tr', { 'data-user-id': a.user_id, 'data-month': a.month, 'data-spent-minor': a.spent_minor, 'data-budget-minor': a.budget_minor },
          el('td', {}, el('a', { href, text: userLabel(a.user_id, a.name) })),
          el('td', { text: a.month }),
          el('td', { class: 'num', text: money(a.spent_minor, a.currency) }),
          el('td', { class: 'num', text: money(a.budget_minor, a.currency) }),
          el('td', { class: 'num over', text: `${share} %` }));
      }) : [el('tr', {}, el('td', { colspan: 5, class: 'empty', text: 'Nobody is over budget.' }))]));
      const more = alerts.over_budget_users - new Set(alerts.over_budget.map((a) => a.user_id)).size;
      overNote.textContent = `${integer.format(alerts.over_budget_users)} users over budget, ${integer.format(alerts.alerted_users)} with an alert (80 % or 100 %)${more > 0 ? `; ${integer.format(more)} more not listed` : ''}; as of epoch ${integer.format(alerts.as_of.epoch)}`;
    }

    const refresh = throttle(async () => {
      try {
        render(await getJson('/api/overview'));
      } catch (error) {
        showError(`Could not load the overview: ${error.message}`);
      }
    }, 1000);

    const previous = new Map(); // user id -> last total seen in the feed
    function onChanges(data) {
      const items = data.changes.slice().reverse(); // oldest first, each prepended
      for (const c of items) {
        remember(c.user_id, c.name, c.currency);
        const known = names.get(c.user_id) || {};
        const currency = c.currency || known.currency;
        const before = previous.has(c.user_id) ? previous.get(c.user_id) : (shown.has(c.user_id) ? shown.get(c.user_id) : null);
        previous.set(c.user_id, c.total_minor);
        if (previous.size > 5000) previous.clear();
        const delta = before === null ? null : c.total_minor - before;
        const item = el('li', { class: 'new', 'data-user-id': c.user_id, 'data-total-minor': c.total_minor, 'data-epoch': c.epoch },
          el('span', { class: 'when', text: clock(new Date()) }),
          el('span', { class: 'who' }, el('a', { href: `/users/${c.user_id}`, text: userLabel(c.user_id, c.name || known.name) })),
          el('span', { class: 'amount' },
            money(c.total_minor, currency),
            delta !== null && delta !== 0 ? el('span', { class: `delta ${delta > 0 ? 'up' : 'down'}`, text: ` ${signedMoney(delta, currency)}` }) : ''));
        feedEmpty.remove();
        feed.prepend(item);
      }
      while (feed.children.length > 40) feed.lastElementChild.remove();
      if (typeof data.over_budget_users === 'number') showBadge(data.over_budget_users);
      refresh();
    }

    refresh();
    connect('', onChanges, refresh);
  }

  // ---------------------------------------------------------------------------------------
  // A user's page
  // ---------------------------------------------------------------------------------------

  function monthChart(months, currency) {
    const width = 560;
    const height = 190;
    const left = 8;
    const bottom = 22;
    const top = 16;
    if (!months.length) return el('p', { class: 'empty', text: 'No months yet.' });
    const max = Math.max(1, ...months.map((m) => Math.abs(m.total_minor)));
    const slot = (width - left * 2) / months.length;
    const barWidth = Math.max(4, Math.min(44, slot * 0.7));
    const chart = svg('svg', { class: 'chart', viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-labelledby': 'chart-title', 'data-testid': 'month-chart' });
    chart.append(svg('title', { id: 'chart-title' }, `Spending per month: ${months.map((m) => `${m.key} ${money(m.total_minor, currency)}`).join(', ')}`));
    chart.append(svg('line', { class: 'axis', x1: left, x2: width - left, y1: height - bottom, y2: height - bottom }));
    const every = Math.ceil(months.length / 12);
    months.forEach((m, i) => {
      const h = Math.max(1, ((height - bottom - top) * Math.abs(m.total_minor)) / max);
      const x = left + i * slot + (slot - barWidth) / 2;
      const y = height - bottom - h;
      const cls = `b${i === months.length - 1 ? ' last' : ''}${m.total_minor < 0 ? ' neg' : ''}`;
      const bar = svg('rect', { class: cls, x: x.toFixed(1), y: y.toFixed(1), width: barWidth.toFixed(1), height: h.toFixed(1), rx: 2, 'data-month': m.key, 'data-total-minor': m.total_minor });
      bar.append(svg('title', {}, `${m.key}: ${money(m.total_minor, currency)} (${m.expense_count} expenses)`));
      chart.append(bar);
      if (i % every === 0 || i === months.length - 1) {
        chart.append(svg('text', { x: (x + barWidth / 2).toFixed(1), y: height - 6, 'text-anchor': 'middle' }, m.key));
      }
      if (i === months.length - 1 || months.length <= 6) {
        chart.append(svg('text', { x: (x + barWidth / 2).toFixed(1), y: (y - 4).toFixed(1), 'text-anchor': 'middle' }, money(m.total_minor, currency)));
      }
    });
    return chart;
  }

  function totalsTable(testid, label, rows, currency, total) {
    const max = Math.max(1, ...rows.map((r) => Math.abs(r.total_minor)));
    const body = rows.map((r) => {
      const fill = el('span');
      fill.style.width = `${(100 * Math.abs(r.total_minor)) / max}%`;
      const share = total ? Math.round((100 * r.total_minor) / total) : 0;
      return el('tr', { 'data-key': r.key, 'data-total-minor': r.total_minor, 'data-count': r.expense_count },
        el('td', { text: r.key }),
        el('td', { class: 'num', text: money(r.total_minor, currency) }),
        el('td', { class: 'barcell' }, el('div', { class: 'hbar', role: 'img', 'aria-label': `${share}% of the total` }, fill)),
        el('td', { class: 'num', text: integer.format(r.expense_count) }));
    });
    return el('table', { 'data-testid': testid },
      el('thead', {}, el('tr', {},
        el('th', { scope: 'col', text: label }),
        el('th', { class: 'num', scope: 'col', text: 'Total' }),
        el('th', { class: 'barcell', scope: 'col', text: 'Share' }),
        el('th', { class: 'num', scope: 'col', text: 'Expenses' }))),
      el('tbody', {}, ...(body.length ? body : [el('tr', {}, el('td', { colspan: 4, class: 'empty', text: 'None.' }))])));
  }

  /** What a user's alerts and budget are, as one comparable string. */
  function alertKey(alerts, budgetMinor) {
    return JSON.stringify([(alerts || []).map((a) => [a.month, a.threshold_pct, a.since_epoch]), budgetMinor === undefined ? null : budgetMinor]);
  }

  /** 100 or 80: the highest fired threshold in the meter's month; null without one. */
  function alertLevel(alerts, budget) {
    const month = budget ? budget.month : null;
    let level = null;
    for (const a of alerts || []) {
      if (month && a.month !== month) continue;
      if (level === null || a.threshold_pct > level) level = a.threshold_pct;
    }
    return level;
  }

  /** The budget meter: month-to-date spend against the monthly budget, marks at 80 % and 100 %. */
  function budgetMeter(b, alerts) {
    const scale = Math.max(125, Math.min(200, Number(b.percent) + 10)); // percent at the right end
    const fill = el('span');
    fill.style.width = `${Math.min(100, Math.max(0, (100 * Number(b.percent)) / scale))}%`;
    const marks = b.thresholds_pct.map((t) => {
      const mark = el('i', { class: 'mark', title: `${t} %`, 'data-threshold': t });
      mark.style.left = `${(100 * t) / scale}%`;
      return mark;
    });
    const level = alertLevel(alerts, b);
    const state = Number(b.percent) >= 100 ? ' over' : (Number(b.percent) >= 80 ? ' near' : '');
    return el('div', { class: 'small muted budget', 'data-testid': 'budget-meter', 'data-percent': b.percent, 'data-month-to-date-minor': b.month_to_date_minor, 'data-budget-minor': b.monthly_budget_minor, 'data-alert': level === null ? '' : level },
      `${b.month || 'this month'}: ${money(b.month_to_date_minor, b.currency)} of ${money(b.monthly_budget_minor, b.currency)} budget (${b.percent} %)`,
      el('div', { class: `meter${state}`, role: 'img', 'aria-label': `${b.percent}% of the monthly budget; alerts at 80% and 100%` }, fill, ...marks));
  }

  /** The user's fired alerts. */
  function alertsTable(alerts) {
    const rows = alerts.map((a) => el('tr', { 'data-month': a.month, 'data-threshold': a.threshold_pct },
      el('td', { text: a.month }),
      el('td', {}, el('span', { class: `badge ${a.threshold_pct >= 100 ? '' : 'near'}`, text: `${a.threshold_pct} %` })),
      el('td', { class: 'num', text: money(a.spent_minor, a.currency) }),
      el('td', { class: 'num', text: money(a.budget_minor, a.currency) }),
      el('td', { class: 'num', text: `since epoch ${integer.format(a.since_epoch)}` })));
    return el('table', { 'data-testid': 'user-alerts' },
      el('thead', {}, el('tr', {},
        el('th', { scope: 'col', text: 'Month' }),
        el('th', { scope: 'col', text: 'Alert' }),
        el('th', { class: 'num', scope: 'col', text: 'Spent' }),
        el('th', { class: 'num', scope: 'col', text: 'Budget' }),
        el('th', { class: 'num', scope: 'col', text: 'Fired' }))),
      el('tbody', {}, ...(rows.length ? rows : [el('tr', {}, el('td', { colspan: 5, class: 'empty', text: 'No alert: under 80 % of the budget.' }))])));
  }

  function userPage(id) {
    document.title = `User ${id} · spendflow`;
    const changes = el('ol', { class: 'changes', 'data-testid': 'user-changes', 'aria-live': 'polite' });
    const changesEmpty = el('li', { class: 'empty', text: 'Changes to this user appear here as they happen.' });
    changes.append(changesEmpty);
    const body = el('div');
    // Kept across renders: it holds what the event stream delivered.
    const changesPanel = el('section', { class: 'panel', 'aria-labelledby': 'changes-h' },
      el('div', { class: 'panel-head' },
        el('h2', { id: 'changes-h', text: 'Recent changes' }),
        el('span', { class: 'muted small', text: 'live, newest first' })),
      changes);
    const crumbs = el('nav', { class: 'crumbs', 'aria-label': 'Breadcrumb' }, el('a', { href: '/', text: 'Overview' }), ` › user #${id}`);
    main.replaceChildren(crumbs, body);

    let currency = null;
    let lastTotal = null;
    let firstRender = true;
    let shownAlerts = null; // the alerts and budget drawn, to redraw when the events say otherwise

    function render(data) {
      if (!body.isConnected) main.replaceChildren(crumbs, body); // after an error message
      const d = data.details;
      const a = data.aggregates;
      currency = d ? d.currency : null;
      const name = d ? d.name : null;
      remember(id, name, currency);
      document.title = `${userLabel(id, name)} · spendflow`;

      const photo = d && d.image_url
        ? el('img', { class: 'photo', src: d.image_url, alt: `Photo of ${d.name}`, width: 112, height: 112, 'data-testid': 'user-photo' })
        : el('div', { class: 'photo none', 'data-testid': 'user-photo-missing', text: data.details_state === 'not_configured' ? 'no details configured' : 'no photo' });
      let who;
      if (d) {
        who = el('div', {},
          el('h1', { 'data-testid': 'user-name', text: d.name }),
          el('div', { class: 'facts' },
            el('span', { 'data-testid': 'user-id', text: `user #${id}` }),
            el('span', { text: d.email }),
            el('span', { text: `${d.country} · ${d.currency}` }),
            // The budget alerts use (the reference data), else the one in the user's details.
            el('span', { 'data-testid': 'user-budget', text: data.budget
              ? `budget ${money(data.budget.monthly_budget_minor, data.budget.currency)} a month`
              : `budget ${money(d.monthly_budget_minor, d.currency)} a month` })),
          el('div', { class: 'cards', 'aria-label': 'Cards' }, ...d.cards.map((c) => el('span', { class: 'card', title: c.card_id, text: c.masked_number }))));
      } else {
        const why = {
          not_configured: 'User details are not configured on this engine.',
          not_found: 'This user is not in the personnel records.',
          unavailable: 'User details could not be read just now.',
        }[data.details_state] || '';
        who = el('div', {},
          el('h1', { 'data-testid': 'user-name', text: `User #${id}` }),
          el('p', { class: 'muted small', text: why }));
      }

      const total = el('div', { class: 'total', 'data-testid': 'user-total', 'data-total-minor': a ? a.total_minor : 0, 'data-epoch': data.as_of.epoch },
        a ? money(a.total_minor, currency) : money(0, currency));
      if (!firstRender && a && lastTotal !== a.total_minor) total.classList.add('flash');
      lastTotal = a ? a.total_minor : 0;
      const lastMonth = a && a.months.length ? a.months[a.months.length - 1] : null;
      let budget = null;
      shownAlerts = alertKey(data.alerts, data.budget ? data.budget.monthly_budget_minor : null);
      if (data.budget) {
        budget = budgetMeter(data.budget, data.alerts);
      } else if (!data.alerts_available && d && lastMonth && d.monthly_budget_minor > 0) {
        const ratio = lastMonth.total_minor / d.monthly_budget_minor;
        const fill = el('span');
        fill.style.width = `${Math.min(100, Math.max(0, ratio * 100))}%`;
        budget = el('div', { class: 'small muted' },
          `${lastMonth.key}: ${money(lastMonth.total_minor, currency)} of ${money(d.monthly_budget_minor, currency)} budget`,
          el('div', { class: `meter${ratio > 1 ? ' over' : ''}`, role: 'img', 'aria-label': `${Math.round(ratio * 100)}% of the monthly budget` }, fill));
      }
      const big = el('div', { class: 'big' },
        el('div', { class: 'muted small', text: 'Total of live expenses' }),
        total,
        el('div', { class: 'muted small' },
          a ? `${integer.format(a.expense_count)} expenses · last ${eventTime(a.last_event_ms)}` : 'no live expenses',
          el('br'),
          el('span', { 'data-testid': 'as-of-epoch', 'data-epoch': data.as_of.epoch, text: `as of epoch ${integer.format(data.as_of.epoch)}` })),
        budget);

      if (data.converted_minor !== null && data.converted_minor !== undefined && data.reporting_currency && data.reporting_currency !== currency) {
        big.insertBefore(el('div', { class: 'muted small', 'data-testid': 'user-converted', 'data-converted-minor': data.converted_minor,
          text: `≈ ${money(data.converted_minor, data.reporting_currency)} at the current rate` }), big.children[2]);
      }
      const level = alertLevel(data.alerts, data.budget);
      if (level) who.querySelector('h1').append(' ', el('span', { class: `badge ${level === 100 ? '' : 'near'}`, 'data-testid': 'user-alert-badge', 'data-threshold': level, text: level === 100 ? 'over budget' : 'near budget' }));

      const sections = [
        el('section', { class: 'panel span2' }, el('div', { class: 'profile' }, photo, who, big)),
      ];
      if (data.alerts_available) {
        sections.push(el('section', { class: 'panel span2', 'aria-labelledby': 'alerts-h' },
          el('div', { class: 'panel-head' },
            el('h2', { id: 'alerts-h', text: 'Budget alerts' }),
            el('span', { class: 'muted small', text: 'fired now, by month' })),
          alertsTable(data.alerts)));
      }
      if (a) {
        sections.push(
          el('section', { class: 'panel', 'aria-labelledby': 'cats-h' },
            el('h2', { id: 'cats-h', text: 'By category' }),
            totalsTable('user-categories', 'Category', a.categories, currency, a.total_minor)),
          el('div', { class: 'column' },
            el('section', { class: 'panel', 'aria-labelledby': 'months-h' },
              el('h2', { id: 'months-h', text: 'By month (UTC)' }),
              monthChart(a.months, currency)),
            changesPanel),
          el('section', { class: 'panel span2', 'aria-labelledby': 'merchants-h' },
            el('div', { class: 'panel-head' },
              el('h2', { id: 'merchants-h', text: 'Top merchants' }),
              el('span', { class: 'muted small', text: `${a.merchants.length} of ${a.merchant_count}` })),
            totalsTable('user-merchants', 'Merchant', a.merchants, currency, a.total_minor)));
      } else {
        sections.push(el('div', { class: 'span2' }, changesPanel));
      }
      const focused = document.activeElement && body.contains(document.activeElement) ? document.activeElement.id : null;
      body.replaceChildren(el('div', { class: 'grid user' }, ...sections));
      if (focused) {
        const again = document.getElementById(focused);
        if (again) again.focus();
      }
      firstRender = false;
    }

    const refresh = throttle(async () => {
      try {
        render(await getJson(`/api/users/${encodeURIComponent(id)}`));
      } catch (error) {
        showError(error.status === 404 || error.status === 400 || error.status === 403
          ? error.message
          : `Could not load user ${id}: ${error.message}`);
      }
    }, 400);

    let seenTotal = null;
    function onChanges(data) {
      // A budget or an alert changed without any expense of the user changing: redraw.
      if (data.user_alerts && alertKey(data.user_alerts, data.user_budget_minor === undefined ? null : data.user_budget_minor) !== shownAlerts) refresh();
      const u = data.user;
      if (!u) return;
      const parts = [];
      if (u.total_minor !== null && u.total_minor !== undefined) {
        const delta = seenTotal === null ? (lastTotal === null ? null : u.total_minor - lastTotal) : u.total_minor - seenTotal;
        seenTotal = u.total_minor;
        parts.push(el('strong', { text: `total ${money(u.total_minor, currency)}` }));
        if (delta) parts.push(el('span', { class: `delta ${delta > 0 ? 'up' : 'down'}`, text: ` ${signedMoney(delta, currency)}` }));
        parts.push(` · ${integer.format(u.expense_count)} expenses`);
      }
      const cells = u.categories.concat(u.months);
      for (const c of cells.slice(0, 4)) parts.push(` · ${c.key} ${c.removed ? 'gone' : money(c.total_minor, currency)}`);
      if (cells.length > 4) parts.push(` · ${cells.length - 4} more`);
      changesEmpty.remove();
      changes.prepend(el('li', { class: 'new', 'data-epoch': data.epoch, 'data-total-minor': u.total_minor },
        el('span', { class: 'when', text: `${clock(new Date())} · epoch ${integer.format(data.epoch)}` }), ...parts));
      while (changes.children.length > 30) changes.lastElementChild.remove();
      refresh();
    }

    refresh();
    if (/^[1-9][0-9]{0,18}$/.test(id)) connect(`?user=${encodeURIComponent(id)}`, onChanges, refresh);
    else setLive('connecting', 'not live');
  }

  // ---------------------------------------------------------------------------------------
  // Start
  // ---------------------------------------------------------------------------------------

  document.getElementById('goto').addEventListener('submit', (event) => {
    event.preventDefault();
    const input = document.getElementById('goto-id');
    const id = input.value.trim();
    if (!/^[0-9]+$/.test(id) || id === '0' || /^0+$/.test(id)) {
      input.setCustomValidity('A user id is a positive whole number.');
      input.reportValidity();
      return;
    }
    window.location.assign(`/users/${id.replace(/^0+/, '')}`);
  });
  document.getElementById('goto-id').addEventListener('input', (event) => event.target.setCustomValidity(''));

  const path = window.location.pathname;
  const match = /^\/users\/([^/]+)\/?$/.exec(path);
  if (match) userPage(decodeURIComponent(match[1]));
  else overview();
})();
