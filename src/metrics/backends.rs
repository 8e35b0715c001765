//! Per-backend series: the `metrics` recorder behind every series labelled `backend`, and the
//! encoder that renders them straight into the Prometheus text format.
//!
//! With thousands of backends nearly all of a scrape is per-backend series, and a generic
//! recorder spends over a microsecond on each sample (a snapshot of every series, label sets
//! formatted per sample, histogram samples drained into buckets). Here each series is a few
//! plain atomics behind the handle its owner caches (the proxy's traffic, the scheduler's
//! usage and hotness), its label text is formatted once when it is registered, and a render
//! only reads the atomics and copies bytes: the backends are split over threads, each writing
//! its share of every family into a buffer of its own, and the buffers are joined family by
//! family so that every family stays one contiguous group with one `HELP` and `TYPE`.
//!
//! **Expiry.** Every update marks its series touched; a render notes when each series was last
//! touched and drops the series untouched for the grace period. That is how the series of
//! ended backends leave (their owners stop updating them) while live ones, refreshed by their
//! owners, stay; and how an idle backend's duration histogram leaves until its next request
//! registers it again from zero. A backend's entry goes once its last series has.
//!
//! **Top K** (`--metrics-top-k`): per-backend series are rendered only for the K backends with
//! the most traffic (requests, smoothed over renders) and every backend flagged hot; the rest
//! are summed per pool into series labelled `pool` (and the family's own labels, such as
//! `status_class` or `le`) instead of `backend`, `drone` and `pool`. Counters, histograms and
//! cumulative gauges are attributed by increments, so a pool's series only ever grow while
//! backends move in and out of the top K; other gauges are the sum over the pool's other
//! backends now. The choice itself is [`select`], a pure function.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use metrics::{Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName};

/// The label every series of this recorder has.
pub const BACKEND_LABEL: &str = "backend";
/// Labels that identify a backend, left out of the per-pool series.
const IDENTITY_LABELS: [&str; 3] = ["backend", "drone", "pool"];
/// The `pool` value of the per-pool series of backends without a pool.
const NO_POOL: &str = "none";

/// What the top-K mode ranks and keeps.
#[derive(Clone, Debug)]
pub struct TopK {
    /// Backends rendered one by one, besides the hot ones.
    pub k: usize,
    /// The counter whose increments rank backends (requests).
    pub traffic: &'static str,
    /// The gauge that is 1 for a hot backend: always rendered one by one.
    pub hot: &'static str,
    /// Gauges that only grow (CPU seconds): aggregated by increments like counters.
    pub cumulative_gauges: &'static [&'static str],
}

/// How the recorder is set up.
pub struct Config {
    /// Series untouched this long are dropped.
    pub grace: Duration,
    /// Histogram bucket bounds for a metric name.
    pub buckets: fn(&str) -> Vec<f64>,
    /// `None`: every backend's series are rendered.
    pub top_k: Option<TopK>,
}

/// The recorder side and the render side share one store.
#[derive(Clone)]
pub struct BackendRecorder {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    families: RwLock<Families>,
    /// `# HELP` text by metric name, escaped.
    helps: RwLock<HashMap<String, String>>,
    /// Entries by `backend` label value. Registration holds the read lock while it adds a
    /// series to an entry, so that a render removing an empty entry (write lock) never loses
    /// a series added to it.
    backends: RwLock<HashMap<Box<str>, Arc<Entry>>>,
    /// Renders one at a time: they update what each series was last seen at.
    render: Mutex<RenderState>,
    /// Series and entries a render dropped, freed by [`BackendRecorder::collect_garbage`]:
    /// when a cohort of ended backends expires, freeing its hundreds of thousands of
    /// allocations would otherwise double that scrape's time.
    graveyard: Mutex<Graveyard>,
}

#[derive(Default)]
struct Graveyard {
    series: Vec<Vec<Series>>,
    entries: Vec<Arc<Entry>>,
}

#[derive(Default)]
struct Families {
    by_name: HashMap<String, usize>,
    list: Vec<Arc<Family>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

struct Family {
    name: String,
    kind: Kind,
    /// Histograms: the bucket bounds and their `,le="…"` label texts, `+Inf` last.
    bounds: Arc<[f64]>,
    le: Vec<String>,
    /// Aggregated per pool by increments (counters, histograms, cumulative gauges).
    cumulative: bool,
}

struct Entry {
    name: Box<str>,
    state: Mutex<EntryState>,
}

#[derive(Default)]
struct EntryState {
    series: Vec<Series>,
    /// Top K: traffic smoothed over renders, and whether the last render showed the backend.
    score: f64,
    exposed: bool,
}

struct Series {
    key: Key,
    family: usize,
    /// `backend="…",drone="…",pool="…"` and the other labels, in the key's order.
    labels: Box<str>,
    /// Top K: the pool's series this one is summed into (`pool="…"` and the other labels),
    /// and its index once the render has looked it up.
    pool_labels: Box<str>,
    pool_slot: Option<usize>,
    cell: Cell,
    last_change: Instant,
    /// Top K: the values at the last render, for increments.
    seen: Seen,
}

#[derive(Clone)]
enum Cell {
    Counter(Arc<CounterCell>),
    Gauge(Arc<GaugeCell>),
    Histogram(Arc<HistogramCell>),
}

impl Cell {
    fn kind(&self) -> Kind {
        match self {
            Cell::Counter(_) => Kind::Counter,
            Cell::Gauge(_) => Kind::Gauge,
            Cell::Histogram(_) => Kind::Histogram,
        }
    }

    /// Whether it was updated since the last call (clears the mark).
    fn take_touched(&self) -> bool {
        let t = match self {
            Cell::Counter(c) => &c.touched,
            Cell::Gauge(g) => &g.touched,
            Cell::Histogram(h) => &h.touched,
        };
        t.load(Ordering::Relaxed) && t.swap(false, Ordering::Relaxed)
    }
}

#[derive(Default)]
struct CounterCell {
    value: AtomicU64,
    touched: AtomicBool,
}

impl CounterFn for CounterCell {
    fn increment(&self, value: u64) {
        self.value.fetch_add(value, Ordering::Relaxed);
        self.touched.store(true, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.value.fetch_max(value, Ordering::Relaxed);
        self.touched.store(true, Ordering::Relaxed);
    }
}

/// An `f64` as its bits.
#[derive(Default)]
struct GaugeCell {
    bits: AtomicU64,
    touched: AtomicBool,
}

impl GaugeCell {
    fn get(&self) -> f64 {
        f64::from_bits(self.bits.load(Ordering::Relaxed))
    }

    fn update(&self, f: impl Fn(f64) -> f64) {
        let _ = self
            .bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(f(f64::from_bits(b)).to_bits())
            });
        self.touched.store(true, Ordering::Relaxed);
    }
}

impl GaugeFn for GaugeCell {
    fn increment(&self, value: f64) {
        self.update(|v| v + value);
    }

    fn decrement(&self, value: f64) {
        self.update(|v| v - value);
    }

    fn set(&self, value: f64) {
        self.bits.store(value.to_bits(), Ordering::Relaxed);
        self.touched.store(true, Ordering::Relaxed);
    }
}

/// Bucket counts (not cumulative; the last is above every bound) and the sum of the samples.
struct HistogramCell {
    bounds: Arc<[f64]>,
    counts: Box<[AtomicU64]>,
    sum_bits: AtomicU64,
    touched: AtomicBool,
}

impl HistogramCell {
    fn new(bounds: Arc<[f64]>) -> Self {
        HistogramCell {
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            bounds,
            sum_bits: AtomicU64::new(0f64.to_bits()),
            touched: AtomicBool::new(false),
        }
    }

    fn add(&self, value: f64, n: u64) {
        // `le` buckets: the first bound the value does not exceed.
        let i = self.bounds.partition_point(|b| *b < value);
        self.counts[i].fetch_add(n, Ordering::Relaxed);
        let _ = self
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((f64::from_bits(b) + value * n as f64).to_bits())
            });
        self.touched.store(true, Ordering::Relaxed);
    }

    /// The bucket counts and the sum, read once.
    fn read(&self, counts: &mut Vec<u64>) -> f64 {
        counts.clear();
        counts.extend(self.counts.iter().map(|c| c.load(Ordering::Relaxed)));
        f64::from_bits(self.sum_bits.load(Ordering::Relaxed))
    }
}

impl HistogramFn for HistogramCell {
    fn record(&self, value: f64) {
        self.add(value, 1);
    }

    fn record_many(&self, value: f64, count: usize) {
        self.add(value, count as u64);
    }
}

/// Values at the last render, for the top K's increments.
#[derive(Clone, Debug, Default)]
enum Seen {
    #[default]
    Nothing,
    Count(u64),
    Float(f64),
    Buckets(Vec<u64>, f64),
}

/// Per-pool series of the top-K mode.
#[derive(Default)]
struct RenderState {
    pools: Vec<PoolSeries>,
    by_key: HashMap<(usize, Box<str>), usize>,
}

struct PoolSeries {
    family: usize,
    labels: Box<str>,
    value: PoolValue,
    /// When a backend last contributed: the series leaves a grace period after.
    last_member: Instant,
}

enum PoolValue {
    Count(u64),
    /// Cumulative gauges: increments; other gauges: the sum at this render.
    Float(f64),
    Buckets(Vec<u64>, f64),
}

impl BackendRecorder {
    pub fn new(config: Config) -> Self {
        BackendRecorder {
            inner: Arc::new(Inner {
                config,
                families: RwLock::default(),
                helps: RwLock::default(),
                backends: RwLock::default(),
                render: Mutex::default(),
                graveyard: Mutex::default(),
            }),
        }
    }

    /// Whether `key` belongs here: it names a backend.
    pub fn wants(key: &Key) -> bool {
        key.labels().any(|l| l.key() == BACKEND_LABEL)
    }

    /// Records the `# HELP` text of a metric.
    pub fn describe(&self, name: &KeyName, description: &str) {
        let mut help = String::with_capacity(description.len());
        for c in description.chars() {
            match c {
                '\\' => help.push_str("\\\\"),
                '\n' => help.push_str("\\n"),
                c => help.push(c),
            }
        }
        write(&self.inner.helps).insert(sanitize_name(name.as_str()), help);
    }

    pub fn counter(&self, key: &Key) -> Counter {
        match self.register(key, Kind::Counter) {
            Some(Cell::Counter(c)) => Counter::from_arc(c),
            _ => Counter::noop(),
        }
    }

    pub fn gauge(&self, key: &Key) -> Gauge {
        match self.register(key, Kind::Gauge) {
            Some(Cell::Gauge(g)) => Gauge::from_arc(g),
            _ => Gauge::noop(),
        }
    }

    pub fn histogram(&self, key: &Key) -> Histogram {
        match self.register(key, Kind::Histogram) {
            Some(Cell::Histogram(h)) => Histogram::from_arc(h),
            _ => Histogram::noop(),
        }
    }

    /// The series' cell, created if the key is new. `None` for a key without a backend, or
    /// a name already registered as another kind (which would make the exposition invalid).
    fn register(&self, key: &Key, kind: Kind) -> Option<Cell> {
        let backend = key.labels().find(|l| l.key() == BACKEND_LABEL)?.value();
        {
            let backends = read(&self.inner.backends);
            if let Some(e) = backends.get(backend) {
                let mut st = lock(&e.state);
                if let Some(s) = st.series.iter().find(|s| s.key == *key) {
                    return (s.cell.kind() == kind).then(|| s.cell.clone());
                }
                let s = self.new_series(key, kind)?;
                let cell = s.cell.clone();
                st.series.push(s);
                return Some(cell);
            }
        }
        let s = self.new_series(key, kind)?;
        let cell = s.cell.clone();
        let mut backends = write(&self.inner.backends);
        let e = backends.entry(backend.into()).or_insert_with(|| {
            Arc::new(Entry {
                name: backend.into(),
                state: Mutex::default(),
            })
        });
        let mut st = lock(&e.state);
        // Another thread may have registered the same key in between.
        if let Some(s) = st.series.iter().find(|s| s.key == *key) {
            return (s.cell.kind() == kind).then(|| s.cell.clone());
        }
        st.series.push(s);
        Some(cell)
    }

    fn new_series(&self, key: &Key, kind: Kind) -> Option<Series> {
        let family = self.family(key.name(), kind)?;
        let (mut labels, mut pool_labels) = (String::new(), String::new());
        let mut pool = NO_POOL;
        for l in key.labels() {
            push_label(&mut labels, l.key(), l.value());
            if l.key() == "pool" && !l.value().is_empty() {
                pool = l.value();
            }
        }
        push_label(&mut pool_labels, "pool", pool);
        for l in key.labels() {
            if !IDENTITY_LABELS.contains(&l.key()) {
                push_label(&mut pool_labels, l.key(), l.value());
            }
        }
        let cell = match kind {
            Kind::Counter => Cell::Counter(Arc::default()),
            Kind::Gauge => Cell::Gauge(Arc::default()),
            Kind::Histogram => {
                let bounds = read(&self.inner.families).list[family].bounds.clone();
                Cell::Histogram(Arc::new(HistogramCell::new(bounds)))
            }
        };
        Some(Series {
            key: key.clone(),
            family,
            labels: labels.into(),
            pool_labels: pool_labels.into(),
            pool_slot: None,
            cell,
            last_change: Instant::now(),
            seen: Seen::Nothing,
        })
    }

    /// The family of a name, added on its first series. `None` if the name has another kind.
    fn family(&self, name: &str, kind: Kind) -> Option<usize> {
        {
            let families = read(&self.inner.families);
            if let Some(&i) = families.by_name.get(name) {
                return (families.list[i].kind == kind).then_some(i);
            }
        }
        let mut families = write(&self.inner.families);
        if let Some(&i) = families.by_name.get(name) {
            return (families.list[i].kind == kind).then_some(i);
        }
        let bounds: Arc<[f64]> = if kind == Kind::Histogram {
            (self.inner.config.buckets)(name).into()
        } else {
            Arc::new([])
        };
        let mut le: Vec<String> = bounds.iter().map(|b| format!(",le=\"{b}\"")).collect();
        le.push(",le=\"+Inf\"".to_string());
        let cumulative = match kind {
            Kind::Counter | Kind::Histogram => true,
            Kind::Gauge => self
                .inner
                .config
                .top_k
                .as_ref()
                .is_some_and(|t| t.cumulative_gauges.contains(&name)),
        };
        let i = families.list.len();
        families.list.push(Arc::new(Family {
            name: sanitize_name(name),
            kind,
            bounds,
            le,
            cumulative,
        }));
        families.by_name.insert(name.to_string(), i);
        Some(i)
    }

    /// Appends the exposition of every per-backend series to `out`, dropping series
    /// untouched for the grace period.
    pub fn render(&self, out: &mut Vec<u8>) {
        let mut state = lock(&self.inner.render);
        let now = Instant::now();
        let families: Vec<Arc<Family>> = read(&self.inner.families).list.clone();
        let entries: Vec<Arc<Entry>> = read(&self.inner.backends).values().cloned().collect();
        let grace = self.inner.config.grace;
        let (sections, emptied, dead) = match &self.inner.config.top_k {
            None => render_all(&families, &entries, now, grace),
            Some(top) => render_top_k(top, &families, &entries, &mut state, now, grace),
        };
        let helps = read(&self.inner.helps);
        let mut order: Vec<usize> = (0..families.len()).collect();
        order.sort_by(|a, b| families[*a].name.cmp(&families[*b].name));
        let total: usize = sections.iter().flatten().map(Vec::len).sum();
        out.reserve(total + families.len() * 256);
        for f in order {
            let parts = sections.iter().map(|s| &s[f]);
            if parts.clone().all(Vec::is_empty) {
                continue;
            }
            let family = &families[f];
            if let Some(help) = helps.get(&family.name) {
                out.extend_from_slice(b"# HELP ");
                out.extend_from_slice(family.name.as_bytes());
                out.push(b' ');
                out.extend_from_slice(help.as_bytes());
                out.push(b'\n');
            }
            out.extend_from_slice(b"# TYPE ");
            out.extend_from_slice(family.name.as_bytes());
            out.extend_from_slice(match family.kind {
                Kind::Counter => b" counter\n",
                Kind::Gauge => b" gauge\n",
                Kind::Histogram => b" histogram\n",
            });
            for p in parts {
                out.extend_from_slice(p);
            }
        }
        drop(helps);
        drop(state);
        let mut removed = Vec::new();
        if !emptied.is_empty() {
            let mut backends = write(&self.inner.backends);
            for e in emptied {
                // Still empty: registration adds series under the map's read lock.
                if lock(&e.state).series.is_empty()
                    && backends.get(&e.name).is_some_and(|x| Arc::ptr_eq(x, &e))
                {
                    removed.extend(backends.remove(&e.name));
                }
            }
        }
        if !dead.is_empty() || !removed.is_empty() {
            let mut graveyard = lock(&self.inner.graveyard);
            graveyard
                .series
                .extend(dead.into_iter().filter(|d| !d.is_empty()));
            graveyard.entries.extend(removed);
        }
    }

    /// Frees what renders dropped (see `Inner::graveyard`). Call every few seconds, off
    /// the scrape.
    pub fn collect_garbage(&self) {
        drop(std::mem::take(&mut *lock(&self.inner.graveyard)));
    }

    /// How many backends have series.
    #[cfg(test)]
    pub fn backends(&self) -> usize {
        read(&self.inner.backends).len()
    }
}

/// Per-family output of one share of the backends, indexed by family.
type Sections = Vec<Vec<u8>>;

/// What a render made: per-family output of each share of the backends, the entries left
/// without series, and the series dropped.
type Rendered = (Vec<Sections>, Vec<Arc<Entry>>, Vec<Vec<Series>>);

/// Every backend's series, the backends split over threads.
fn render_all(
    families: &[Arc<Family>],
    entries: &[Arc<Entry>],
    now: Instant,
    grace: Duration,
) -> Rendered {
    // Below this many backends a thread costs more than it saves.
    const PER_THREAD: usize = 500;
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(entries.len().div_ceil(PER_THREAD))
        .max(1);
    let chunk = entries.len().div_ceil(threads).max(1);
    let work = |part: &[Arc<Entry>]| {
        let mut sections: Sections = vec![Vec::new(); families.len()];
        let mut emptied = Vec::new();
        let mut dead = Vec::new();
        let mut counts = Vec::new();
        for e in part {
            let mut st = lock(&e.state);
            expire(&mut st.series, now, grace, &mut dead);
            for s in &st.series {
                if let Some(section) = sections.get_mut(s.family) {
                    write_series(
                        section,
                        &families[s.family],
                        &s.labels,
                        &s.cell,
                        &mut counts,
                    );
                }
            }
            if st.series.is_empty() {
                emptied.push(e.clone());
            }
        }
        (sections, emptied, dead)
    };
    if threads == 1 {
        let (s, e, d) = work(entries);
        return (vec![s], e, vec![d]);
    }
    std::thread::scope(|scope| {
        let running: Vec<_> = entries
            .chunks(chunk)
            .map(|part| scope.spawn(move || work(part)))
            .collect();
        let mut sections = Vec::with_capacity(running.len());
        let (mut emptied, mut dead) = (Vec::new(), Vec::new());
        for r in running {
            // A panicking share loses its series from this one render only.
            if let Ok((s, e, d)) = r.join() {
                sections.push(s);
                emptied.extend(e);
                dead.push(d);
            }
        }
        (sections, emptied, dead)
    })
}

/// The top K and hot backends' series, the others summed per pool.
fn render_top_k(
    top: &TopK,
    families: &[Arc<Family>],
    entries: &[Arc<Entry>],
    state: &mut RenderState,
    now: Instant,
    grace: Duration,
) -> Rendered {
    let traffic = families.iter().position(|f| f.name == top.traffic);
    let hot = families.iter().position(|f| f.name == top.hot);
    // Rank: traffic since the last render plus half the previous score.
    // Each entry is locked once per pass, not across the render: registration (a request
    // after a long idle period re-registers its histogram) never waits for a whole render.
    let mut candidates = Vec::with_capacity(entries.len());
    let mut dead = Vec::new();
    for e in entries {
        let mut st = lock(&e.state);
        expire(&mut st.series, now, grace, &mut dead);
        let (mut increase, mut is_hot) = (0u64, false);
        for s in &st.series {
            match &s.cell {
                Cell::Counter(c) if Some(s.family) == traffic => {
                    let seen = match s.seen {
                        Seen::Count(n) => n,
                        _ => 0,
                    };
                    increase += c.value.load(Ordering::Relaxed).saturating_sub(seen);
                }
                Cell::Gauge(g) if Some(s.family) == hot => is_hot |= g.get() >= 0.5,
                _ => {}
            }
        }
        st.score = st.score / 2.0 + increase as f64;
        candidates.push(Candidate {
            score: st.score,
            hot: is_hot,
        });
    }
    let chosen = select(&candidates, top.k);

    for p in &mut state.pools {
        if let PoolValue::Float(v) = &mut p.value
            && !families[p.family].cumulative
        {
            *v = 0.0;
        }
    }
    let mut pool_present = vec![false; state.pools.len()];
    let mut sections: Sections = vec![Vec::new(); families.len()];
    let mut emptied = Vec::new();
    let mut counts = Vec::new();
    for (e, show) in entries.iter().zip(chosen) {
        let mut st = lock(&e.state);
        let was_shown = st.exposed;
        st.exposed = show;
        for s in &mut st.series {
            let Some(family) = families.get(s.family) else {
                continue;
            };
            if show {
                write_series(
                    &mut sections[s.family],
                    family,
                    &s.labels,
                    &s.cell,
                    &mut counts,
                );
            }
            // Increments go to the pool unless the backend's own series shows them: a series
            // shown at the last render and at this one carries its increments itself; one that
            // appears now hands the increments since the last render to the pool (`rate()`
            // ignores a new series' first value), unless it is new to the recorder too.
            let contributes = if show {
                !was_shown && family.cumulative && !matches!(s.seen, Seen::Nothing)
            } else {
                family.cumulative
            };
            let slot = match s.pool_slot {
                Some(i) => i,
                None => {
                    let i = state.slot(s.family, &s.pool_labels, family, now);
                    s.pool_slot = Some(i);
                    i
                }
            };
            if pool_present.len() <= slot {
                pool_present.resize(slot + 1, false);
            }
            let pool = &mut state.pools[slot];
            match (&s.cell, &mut pool.value) {
                (Cell::Counter(c), PoolValue::Count(total)) => {
                    let v = c.value.load(Ordering::Relaxed);
                    let seen = match s.seen {
                        Seen::Count(n) => n,
                        _ => 0,
                    };
                    if contributes {
                        *total += v.saturating_sub(seen);
                    }
                    s.seen = Seen::Count(v);
                }
                (Cell::Gauge(g), PoolValue::Float(total)) => {
                    let v = g.get();
                    if family.cumulative {
                        let seen = match s.seen {
                            Seen::Float(x) => x,
                            _ => 0.0,
                        };
                        if contributes && v > seen {
                            *total += v - seen;
                        }
                        s.seen = Seen::Float(v);
                    } else if !show {
                        *total += v;
                    }
                }
                (Cell::Histogram(h), PoolValue::Buckets(total, total_sum)) => {
                    let sum = h.read(&mut counts);
                    if !matches!(s.seen, Seen::Buckets(..)) {
                        s.seen = Seen::Buckets(vec![0; counts.len()], 0.0);
                    }
                    if let Seen::Buckets(seen, seen_sum) = &mut s.seen {
                        if contributes {
                            for ((t, c), before) in total.iter_mut().zip(&counts).zip(&*seen) {
                                *t += c.saturating_sub(*before);
                            }
                            *total_sum += sum - *seen_sum;
                        }
                        seen.clone_from(&counts);
                        *seen_sum = sum;
                    }
                }
                _ => {}
            }
            if contributes || !show {
                pool.last_member = now;
            }
            if !show {
                pool_present[slot] = true;
            }
        }
        if st.series.is_empty() {
            emptied.push(e.clone());
        }
    }

    for (i, p) in state.pools.iter().enumerate() {
        let family = &families[p.family];
        let present = pool_present.get(i).copied().unwrap_or(false);
        // Cumulative series stay a grace period after their last member; a sum of gauges
        // exists only while the pool has backends outside the top K.
        let keep = if family.cumulative {
            now.duration_since(p.last_member) < grace
        } else {
            present
        };
        if !keep {
            continue;
        }
        let section = &mut sections[p.family];
        match &p.value {
            PoolValue::Count(n) => write_line(section, &family.name, "", &p.labels, "", |b| {
                write_u64(b, *n)
            }),
            PoolValue::Float(v) => write_line(section, &family.name, "", &p.labels, "", |b| {
                write_f64(b, *v)
            }),
            PoolValue::Buckets(b, sum) => write_histogram(section, family, &p.labels, b, *sum),
        }
    }
    (vec![sections], emptied, vec![dead])
}

impl RenderState {
    /// The index of a pool's series, added on first use (they are few: families × pools ×
    /// label values, and kept for the process's life).
    fn slot(&mut self, family: usize, labels: &str, f: &Family, now: Instant) -> usize {
        if let Some(&i) = self.by_key.get(&(family, Box::from(labels))) {
            return i;
        }
        let value = match f.kind {
            Kind::Counter => PoolValue::Count(0),
            Kind::Gauge => PoolValue::Float(0.0),
            Kind::Histogram => PoolValue::Buckets(vec![0; f.bounds.len() + 1], 0.0),
        };
        let i = self.pools.len();
        self.pools.push(PoolSeries {
            family,
            labels: labels.into(),
            value,
            last_member: now,
        });
        self.by_key.insert((family, labels.into()), i);
        i
    }
}

/// A backend as the top K sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    /// Traffic: requests since the last render plus half the previous score.
    pub score: f64,
    /// Flagged hot: always shown.
    pub hot: bool,
}

/// Which backends get series of their own: the `k` with the highest scores (ties to the
/// earlier one), a score of zero never counting, and every hot one.
pub fn select(candidates: &[Candidate], k: usize) -> Vec<bool> {
    let mut chosen: Vec<bool> = candidates.iter().map(|c| c.hot).collect();
    let mut ranked: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].score > 0.0)
        .collect();
    let by_score = |a: &usize, b: &usize| {
        candidates[*b]
            .score
            .total_cmp(&candidates[*a].score)
            .then(a.cmp(b))
    };
    if ranked.len() > k {
        if k > 0 {
            ranked.select_nth_unstable_by(k - 1, by_score);
        }
        ranked.truncate(k);
    }
    for i in ranked {
        chosen[i] = true;
    }
    chosen
}

/// Moves the series untouched for `grace` to `dead`.
fn expire(series: &mut Vec<Series>, now: Instant, grace: Duration, dead: &mut Vec<Series>) {
    let mut i = 0;
    while i < series.len() {
        let s = &mut series[i];
        if s.cell.take_touched() {
            s.last_change = now;
        }
        if now.saturating_duration_since(s.last_change) >= grace {
            dead.push(series.swap_remove(i));
        } else {
            i += 1;
        }
    }
}

fn write_series(
    out: &mut Vec<u8>,
    family: &Family,
    labels: &str,
    cell: &Cell,
    counts: &mut Vec<u64>,
) {
    match cell {
        Cell::Counter(c) => {
            let v = c.value.load(Ordering::Relaxed);
            write_line(out, &family.name, "", labels, "", |b| write_u64(b, v));
        }
        Cell::Gauge(g) => {
            let v = g.get();
            write_line(out, &family.name, "", labels, "", |b| write_f64(b, v));
        }
        Cell::Histogram(h) => {
            let sum = h.read(counts);
            write_histogram(out, family, labels, counts, sum);
        }
    }
}

/// Buckets (made cumulative, `+Inf` equal to the count), `_sum` and `_count`.
fn write_histogram(out: &mut Vec<u8>, family: &Family, labels: &str, counts: &[u64], sum: f64) {
    let mut cumulative = 0u64;
    for (le, c) in family.le.iter().zip(counts) {
        cumulative += c;
        write_line(out, &family.name, "_bucket", labels, le, |b| {
            write_u64(b, cumulative)
        });
    }
    write_line(out, &family.name, "_sum", labels, "", |b| write_f64(b, sum));
    write_line(out, &family.name, "_count", labels, "", |b| {
        write_u64(b, cumulative)
    });
}

/// `name{labels} value\n`; `labels` is never empty (every series here has a `backend` or a
/// `pool` label), `extra` starts with a comma.
fn write_line(
    out: &mut Vec<u8>,
    name: &str,
    suffix: &str,
    labels: &str,
    extra: &str,
    value: impl FnOnce(&mut Vec<u8>),
) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(suffix.as_bytes());
    out.push(b'{');
    out.extend_from_slice(labels.as_bytes());
    out.extend_from_slice(extra.as_bytes());
    out.extend_from_slice(b"} ");
    value(out);
    out.push(b'\n');
}

fn write_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

fn write_f64(out: &mut Vec<u8>, v: f64) {
    if v.is_nan() {
        out.extend_from_slice(b"NaN");
    } else if v.is_infinite() {
        out.extend_from_slice(if v > 0.0 { b"+Inf" } else { b"-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        // Whole numbers (bytes, counts, flags) as integers, as the generic exporter does.
        out.extend_from_slice(itoa::Buffer::new().format(v as i64).as_bytes());
    } else {
        out.extend_from_slice(ryu::Buffer::new().format_finite(v).as_bytes());
    }
}

/// `key="value"`, comma-separated from what `out` holds, the value escaped.
fn push_label(out: &mut String, key: &str, value: &str) {
    if !out.is_empty() {
        out.push(',');
    }
    out.push_str(&sanitize_label_key(key));
    out.push_str("=\"");
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A metric name with every character outside `[a-zA-Z0-9_:]` (or a leading digit) as `_`.
fn sanitize_name(name: &str) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| {
            if c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A label name with every character outside `[a-zA-Z0-9_]` (or a leading digit) as `_`.
fn sanitize_label_key(key: &str) -> String {
    key.chars()
        .enumerate()
        .map(|(i, c)| {
            if c.is_ascii_alphabetic() || c == '_' || (i > 0 && c.is_ascii_digit()) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}
