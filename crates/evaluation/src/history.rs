//! `retargetiq evaluate --events FILE --format F`: recommendation quality on a real shopping
//! history.
//!
//! The history is split at `--holdout-hours` before its last event. Everything before is
//! replayed through the services' own code ([`crate::replay`]), with a catalog built from the
//! history's products; then each *returning* user (active before and during the held-out
//! period) gets the recommendation API's list, scored against what they viewed, carted,
//! favoured or bought in the held-out period: hit rate@k (at least one of them in the list),
//! MRR@k (one over the rank of the first) and NDCG@k (binary relevance). Baselines are computed
//! in the same run, on the same users, from the same training events: most popular, most
//! popular in the user's categories, recently viewed (the user's own last items), item
//! co-visitation (item-kNN over sessions) and session-kNN.
//!
//! Formats: `rees46` (the REES46 eCommerce CSV: `event_time,event_type,product_id,category_id,
//! category_code,brand,price,user_id,user_session`), `taobao` (Taobao UserBehavior CSV without
//! header: `user_id,item_id,category_id,behavior,timestamp`) and `platform` (JSON lines in the
//! ingestion APIs' shapes: activity events and orders with their `timestamp`s, and catalog
//! products, which make the catalog).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone as _, Utc};
use events::generate::Step;
use events::{ActivityEvent, EventType, OrderEvent, OrderItem};
use serde::Serialize;

use crate::progress::Progress;
use crate::replay::{Attribution, Platform};

mod scan;
pub use scan::{Scan, Stamp, Steps, scan};

/// How a history file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// JSON lines in the ingestion APIs' shapes (activity, orders) and catalog products.
    Platform,
    /// The REES46 eCommerce behaviour CSV (with its header).
    Rees46,
    /// Taobao's UserBehavior CSV (no header).
    Taobao,
}

/// What a user did with a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    View,
    Favourite,
    Cart,
    /// Taken out of the cart: replayed (the cart is part of a user's features) but not an
    /// engagement: neither a relevant item in the held-out period nor a baseline's signal.
    RemoveFromCart,
    Purchase,
}

impl Kind {
    /// Whether the interaction shows interest in the product (all but a removal from the cart).
    pub fn engages(self) -> bool {
        self != Kind::RemoveFromCart
    }
}

/// One interaction of a history. Its ids are shared with every other interaction that names
/// the same one (read once into an [`Arc`]): a history holds millions of rows and far fewer
/// users, sessions and products.
#[derive(Debug, Clone, PartialEq)]
pub struct Interaction {
    pub user: Arc<str>,
    pub session: Option<Arc<str>>,
    pub kind: Kind,
    pub product: Arc<str>,
    pub at: DateTime<Utc>,
    /// The recommendation response the interaction came from (`recommendationId`), if any.
    pub recommendation: Option<Arc<str>>,
}

/// A history: interactions in time order, and the products they name.
#[derive(Debug, Default)]
pub struct History {
    pub interactions: Vec<Interaction>,
    pub products: BTreeMap<String, catalog::Product>,
    /// Lines that could not be read (malformed, unknown kinds, ids the APIs would refuse).
    pub skipped: usize,
    /// The first of them (up to ten): line number (from 1) and why.
    pub first_skipped: Vec<(u64, String)>,
    /// The ids read so far, each held once (emptied when the reading ends).
    ids: HashSet<Arc<str>>,
}

/// How many skipped lines are named one by one (on stderr); the rest are counted.
const SKIPS_NAMED: usize = 10;

impl History {
    /// `id` as the interactions hold it: one allocation per distinct id, not one per row.
    fn id(&mut self, id: &str) -> Arc<str> {
        if let Some(held) = self.ids.get(id) {
            return Arc::clone(held);
        }
        let held: Arc<str> = Arc::from(id);
        self.ids.insert(Arc::clone(&held));
        held
    }

    fn skip(&mut self, line: u64, reason: &str) {
        self.skipped += 1;
        if self.skipped <= SKIPS_NAMED {
            tracing::warn!(line, reason, "history line skipped");
            self.first_skipped.push((line, reason.to_owned()));
        }
    }

    /// Says how many skipped lines were not named.
    fn skipped_more(&self) {
        if self.skipped > SKIPS_NAMED {
            tracing::warn!(more = self.skipped - SKIPS_NAMED, "more history lines skipped");
        }
    }
}

/// The lines of a text file with their numbers (from 1), trimmed, blank ones left out, and a
/// byte-order mark (spreadsheets and some editors write one) taken off the first: how every
/// line-oriented file of ours is read (histories, `catalog import`, `events import`).
pub fn numbered_lines(path: &Path) -> anyhow::Result<impl Iterator<Item = anyhow::Result<(u64, String)>>> {
    let mut lines = Lines::open(path)?;
    Ok(std::iter::from_fn(move || lines.next_line()).map(|line| line.map(|l| (l.number, l.text))))
}

/// One line of a [`Lines`] reader.
#[derive(Debug)]
pub struct Line {
    /// From 1 (0 after [`Lines::seek`]: not known).
    pub number: u64,
    /// Where the line starts in the file, in bytes.
    pub offset: u64,
    /// Trimmed, without the line end (and, on the first line, without a byte-order mark).
    pub text: String,
}

/// A text file read line by line, with each line's number and place in the file, so that a
/// line can be read again later ([`Lines::seek`]) without keeping it.
pub struct Lines {
    reader: std::io::BufReader<std::fs::File>,
    path: PathBuf,
    /// The number and offset of the next line.
    number: u64,
    offset: u64,
    buf: Vec<u8>,
}

impl Lines {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
        Ok(Self { reader: std::io::BufReader::new(file), path: path.to_owned(), number: 1, offset: 0, buf: Vec::new() })
    }

    /// Goes to the line that starts at byte `offset`; the lines read after it are numbered 0
    /// (not known).
    pub fn seek(&mut self, offset: u64) -> anyhow::Result<()> {
        if offset != self.offset {
            use std::io::Seek as _;
            self.reader
                .seek(std::io::SeekFrom::Start(offset))
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", self.path.display()))?;
            self.offset = offset;
        }
        self.number = 0;
        Ok(())
    }

    /// The next line that is not blank, or `None` at the end of the file.
    pub fn next_line(&mut self) -> Option<anyhow::Result<Line>> {
        loop {
            self.buf.clear();
            let (number, offset) = (self.number, self.offset);
            let read = match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(n) => n,
                Err(e) => return Some(Err(anyhow::anyhow!("reading {}: {e}", self.path.display()))),
            };
            if number > 0 {
                self.number += 1;
            }
            self.offset += read as u64;
            let line = match std::str::from_utf8(&self.buf) {
                Ok(line) => line,
                Err(e) => {
                    return Some(Err(anyhow::anyhow!(
                        "reading {}: line {number} is not UTF-8: {e}",
                        self.path.display()
                    )));
                }
            };
            let text = if offset == 0 { line.trim_start_matches('\u{feff}') } else { line }.trim();
            if !text.is_empty() {
                return Some(Ok(Line { number, offset, text: text.to_owned() }));
            }
        }
    }
}

/// How the lines of one history file are read: its format and, for REES46, the columns its
/// header names.
struct LineReader {
    format: Format,
    columns: Rees46Columns,
    /// One CSV record per line (neither dataset breaks a line inside a field), so a skipped
    /// line is named by its own number whatever the line ends: the csv crate's record
    /// positions are off after CRLF and blank lines (rust-csv #395, #208). One parser, given
    /// each line in turn: building one per line cost 19 µs, most of a line's reading.
    csv: csv::Reader<std::io::Cursor<Vec<u8>>>,
    record: csv::StringRecord,
}

impl LineReader {
    fn new(format: Format) -> Self {
        let csv = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .trim(csv::Trim::All)
            .from_reader(std::io::Cursor::new(Vec::new()));
        // The dataset's own order until a header says otherwise.
        Self { format, columns: Rees46Columns::DATASET, csv, record: csv::StringRecord::new() }
    }

    /// A reader of the same format that takes the columns this one found.
    fn again(&self) -> Self {
        Self { columns: self.columns, ..Self::new(self.format) }
    }

    /// Parses `line` into `self.record`; `false` when it holds no record.
    fn record(&mut self, line: &str) -> csv::Result<bool> {
        let input = self.csv.get_mut().get_mut();
        input.clear();
        input.extend_from_slice(line.as_bytes());
        // Back to the start of the new input, the parser's state (and its end of input) reset.
        self.csv.seek_raw(std::io::SeekFrom::Start(0), csv::Position::new())?;
        self.csv.read_record(&mut self.record)
    }

    /// Reads one line into `history`: its interactions pushed (an order's items share its
    /// time), its products added. The inner error says why the line is skipped; the outer
    /// one stops the whole read (a header without a needed column).
    fn read(&mut self, number: u64, line: &str, history: &mut History) -> anyhow::Result<Result<(), String>> {
        if self.format == Format::Platform {
            return Ok(platform(line, history));
        }
        Ok(match self.record(line) {
            Ok(false) => Ok(()),
            Err(e) => Err(format!("not CSV: {e}")),
            Ok(true) if self.format == Format::Taobao => taobao(&self.record, history),
            Ok(true) => {
                if number == 1
                    && let Some(named) = Rees46Columns::from_header(&self.record)?
                {
                    self.columns = named;
                    return Ok(Ok(()));
                }
                rees46(&self.record, self.columns, history)
            }
        })
    }
}

/// Reads a history file. Lines that cannot be read are skipped and counted ([`History::skipped`],
/// the first few named with their line number on stderr).
pub fn read(path: &Path, format: Format) -> anyhow::Result<History> {
    let mut history = History::default();
    let mut reader = LineReader::new(format);
    let mut lines = Lines::open(path)?;
    let megabytes = |bytes: u64| usize::try_from(bytes / 1_000_000).unwrap_or(usize::MAX);
    let mut progress =
        Progress::new("MB of the history read", megabytes(std::fs::metadata(path).map_or(0, |m| m.len())));
    while let Some(line) = lines.next_line() {
        let line = line?;
        progress.at(megabytes(line.offset));
        if let Err(reason) = reader.read(line.number, &line.text, &mut history)? {
            history.skip(line.number, &reason);
        }
    }
    history.skipped_more();
    history.ids = HashSet::new();
    history.interactions.sort_by_key(|x| x.at);
    Ok(history)
}

/// The columns of a REES46 file, found by name in its header (any order; the dataset's own
/// order when the file has no header).
#[derive(Debug, Clone, Copy)]
struct Rees46Columns {
    time: usize,
    kind: usize,
    product: usize,
    category_id: Option<usize>,
    category_code: Option<usize>,
    brand: Option<usize>,
    price: Option<usize>,
    user: usize,
    session: Option<usize>,
}

impl Rees46Columns {
    const DATASET: Self = Self {
        time: 0,
        kind: 1,
        product: 2,
        category_id: Some(3),
        category_code: Some(4),
        brand: Some(5),
        price: Some(6),
        user: 7,
        session: Some(8),
    };

    /// The columns named by `header`, or `None` when it is not a header (no `event_time`).
    fn from_header(header: &csv::StringRecord) -> anyhow::Result<Option<Self>> {
        let names: Vec<&str> = header.iter().collect();
        if !names.contains(&"event_time") {
            return Ok(None);
        }
        let find = |name: &str| names.iter().position(|n| *n == name);
        let need = |name: &str| find(name).ok_or_else(|| anyhow::anyhow!("the header has no `{name}` column"));
        Ok(Some(Self {
            time: need("event_time")?,
            kind: need("event_type")?,
            product: need("product_id")?,
            category_id: find("category_id"),
            category_code: find("category_code"),
            brand: find("brand"),
            price: find("price"),
            user: need("user_id")?,
            session: find("user_session"),
        }))
    }
}

fn product(history: &mut History, id: &str, category: &str, price: Option<f64>, brand: Option<&str>) {
    let entry = history.products.entry(id.to_owned()).or_insert_with(|| catalog::Product {
        id: id.to_owned(),
        name: format!("{category} {id}"),
        category: category.to_owned(),
        price: 0.0,
        brand: None,
        available: true,
        popularity: 0.0,
    });
    if let Some(p) = price.filter(|p| p.is_finite() && *p >= 0.0) {
        entry.price = p;
    }
    if let Some(b) = brand.filter(|b| !b.is_empty()) {
        entry.brand = Some(b.to_owned());
    }
}

/// The user and product of a history line, held to the ingestion APIs' rules (so `events
/// import` sends nothing they refuse).
fn ids<'a>(user: &'a str, product: &'a str) -> Result<(&'a str, &'a str), String> {
    let user = events::validate::user_id(user).map_err(|e| e.to_string())?;
    let product = events::validate::product_id(product).map_err(|e| e.to_string())?;
    Ok((user, product))
}

fn rees46(record: &csv::StringRecord, columns: Rees46Columns, history: &mut History) -> Result<(), String> {
    let field = |i: Option<usize>| i.and_then(|i| record.get(i)).unwrap_or("");
    let needed = [columns.time, columns.kind, columns.product, columns.user];
    if needed.iter().any(|i| record.get(*i).is_none()) {
        return Err(format!("{} fields where the header has more", record.len()));
    }
    let time = field(Some(columns.time));
    let at = chrono::NaiveDateTime::parse_from_str(time.trim_end_matches(" UTC"), "%Y-%m-%d %H:%M:%S")
        .map(|t| Utc.from_utc_datetime(&t))
        .or_else(|_| DateTime::parse_from_rfc3339(time).map(|t| t.with_timezone(&Utc)))
        .map_err(|_| format!("event_time {time:?} is neither `YYYY-MM-DD hh:mm:ss UTC` nor RFC 3339"))?;
    let kind = match field(Some(columns.kind)) {
        "view" => Kind::View,
        "cart" => Kind::Cart,
        "remove_from_cart" => Kind::RemoveFromCart,
        "purchase" => Kind::Purchase,
        other => {
            return Err(format!("unknown event_type {other:?}; expected view, cart, remove_from_cart or purchase"));
        }
    };
    let (user, product_id) = ids(field(Some(columns.user)), field(Some(columns.product)))?;
    let (code, id) = (field(columns.category_code), field(columns.category_id));
    let category = if code.is_empty() { id } else { code };
    product(history, product_id, category, field(columns.price).parse().ok(), Some(field(columns.brand)));
    let session = field(columns.session);
    let interaction = Interaction {
        user: history.id(user),
        session: (!session.is_empty()).then(|| history.id(session)),
        kind,
        product: history.id(product_id),
        at,
        recommendation: None,
    };
    history.interactions.push(interaction);
    Ok(())
}

fn taobao(record: &csv::StringRecord, history: &mut History) -> Result<(), String> {
    let f: Vec<&str> = record.iter().collect();
    let [user, item, category, behaviour, timestamp] = f.as_slice() else {
        return Err(format!("{} fields; expected user_id,item_id,category_id,behavior,timestamp", f.len()));
    };
    let kind = match *behaviour {
        "pv" => Kind::View,
        "fav" => Kind::Favourite,
        "cart" => Kind::Cart,
        "buy" => Kind::Purchase,
        other => return Err(format!("unknown behavior {other:?}; expected pv, fav, cart or buy")),
    };
    let at = timestamp
        .parse()
        .ok()
        .and_then(|t| Utc.timestamp_opt(t, 0).single())
        .ok_or_else(|| format!("timestamp {timestamp:?} is not Unix seconds"))?;
    let (user, item) = ids(user, item)?;
    product(history, item, category, None, None);
    let interaction = Interaction {
        user: history.id(user),
        session: None,
        kind,
        product: history.id(item),
        at,
        recommendation: None,
    };
    history.interactions.push(interaction);
    Ok(())
}

fn platform(line: &str, history: &mut History) -> Result<(), String> {
    // Read as the APIs read a body: an object that gives a key twice is refused.
    let v = kit::json::value_from_bytes(line.as_bytes()).map_err(|e| format!("not JSON: {e}"))?;
    let far_future = Utc::now() + Duration::days(36_500);
    if v.get("userId").is_none() {
        let p = events::validate::catalog_product(&v, Utc::now()).map_err(|e| format!("not a product: {e}"))?;
        history.products.insert(p.product_id.clone(), p.to_product());
        return Ok(());
    }
    if v.get("items").is_some() {
        let o = events::validate::order(&v, far_future, events::validate::Strictness::Api)
            .map_err(|e| format!("not an order: {e}"))?;
        for item in &o.items {
            let interaction = Interaction {
                user: history.id(&o.user_id),
                session: o.session_id.as_deref().map(|s| history.id(s)),
                kind: Kind::Purchase,
                product: history.id(&item.product_id),
                at: o.timestamp,
                recommendation: None,
            };
            history.interactions.push(interaction);
        }
        return Ok(());
    }
    let a = events::validate::activity(&v, far_future, events::validate::Strictness::Api)
        .map_err(|e| format!("not an activity event: {e}"))?;
    let kind = match a.event_type {
        EventType::ProductView | EventType::Click => Kind::View,
        EventType::AddToCart => Kind::Cart,
        EventType::RemoveFromCart => Kind::RemoveFromCart,
        // Page views and searches name no product: valid, not an interaction with one.
        _ => return Ok(()),
    };
    let Some(product) = a.product_id else { return Err("no productId".into()) };
    let interaction = Interaction {
        user: history.id(&a.user_id),
        session: a.session_id.as_deref().map(|s| history.id(s)),
        kind,
        product: history.id(&product),
        at: a.timestamp,
        recommendation: a.recommendation_id.as_deref().map(|r| history.id(r)),
    };
    history.interactions.push(interaction);
    Ok(())
}

/// The interactions as the ingestion APIs would have received them.
pub fn steps(interactions: &[Interaction], products: &BTreeMap<String, catalog::Product>) -> Vec<Step> {
    interactions.iter().enumerate().map(|(i, x)| step(i, x, products)).collect()
}

/// The `i`th interaction of a history (in time order) as the ingestion APIs would have
/// received it: its event id is `h<i>` (an order's `o<i>`), so sending a history twice stores
/// each event once.
pub fn step(i: usize, x: &Interaction, products: &BTreeMap<String, catalog::Product>) -> Step {
    let event_id = format!("h{i}");
    match x.kind {
        Kind::Purchase => {
            let price = products.get(&*x.product).map_or(0.0, |p| p.price);
            Step::Order(OrderEvent {
                schema_version: events::SCHEMA_VERSION,
                order_id: format!("o{i}"),
                user_id: x.user.to_string(),
                session_id: x.session.as_deref().map(str::to_owned),
                items: vec![OrderItem { product_id: x.product.to_string(), quantity: 1, unit_price: price }],
                amount: price,
                currency: "EUR".into(),
                campaign_id: None,
                offer_decision_id: None,
                timestamp: x.at,
                event_id,
            })
        }
        kind => Step::Activity(ActivityEvent {
            schema_version: events::SCHEMA_VERSION,
            event_id,
            user_id: x.user.to_string(),
            session_id: x.session.as_deref().map(str::to_owned),
            event_type: match kind {
                Kind::Cart => EventType::AddToCart,
                Kind::RemoveFromCart => EventType::RemoveFromCart,
                Kind::Favourite => EventType::Click,
                _ => EventType::ProductView,
            },
            product_id: Some(x.product.to_string()),
            campaign_id: None,
            query: None,
            recommendation_id: x.recommendation.as_deref().map(str::to_owned),
            timestamp: x.at,
        }),
    }
}

/// Options of `retargetiq evaluate --events`.
#[derive(Debug, Clone)]
pub struct Options {
    pub events: PathBuf,
    pub format: Format,
    pub holdout_hours: f64,
    pub k: usize,
    /// Tune on this: leave the held-out period out entirely and hold out the period of the
    /// same length before it instead, so the figures reported on the real split stay unseen.
    pub validation: bool,
}

/// Hit rate, MRR and NDCG at k of one method.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Metrics {
    pub hit_rate: f64,
    pub mrr: f64,
    pub ndcg: f64,
}

/// The result: one row per method, the platform first.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// (method, metrics), in display order.
    #[serde(skip)]
    pub rows: Vec<(&'static str, Metrics)>,
    pub methods: BTreeMap<&'static str, Metrics>,
    pub users: usize,
    #[serde(rename = "trainingEvents")]
    pub training_events: usize,
    #[serde(rename = "heldOutEvents")]
    pub held_out_events: usize,
    /// Training events attributed to a shown list (`recommendationId`): what ranking learns from.
    #[serde(rename = "attributedEvents")]
    pub attributed_events: usize,
    pub products: usize,
    /// Lines of the history file that could not be read (named on stderr).
    #[serde(rename = "skippedLines")]
    pub skipped_lines: usize,
    pub k: usize,
}

pub const PLATFORM: &str = "platform";
pub const PLATFORM_INITIAL: &str = "platform, initial ranking weights (no online learning)";
pub const MOST_POPULAR: &str = "most popular";
pub const POPULAR_IN_CATEGORIES: &str = "most popular in the user's categories";
pub const RECENTLY_VIEWED: &str = "recently viewed";
pub const ITEM_KNN: &str = "item co-visitation (item-kNN)";
pub const SESSION_KNN: &str = "session-kNN";

impl Report {
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn markdown(&self) -> String {
        let k = self.k;
        let mut out = format!(
            "{} returning users scored; {} training events, {} held-out events, {} products\n\n\
             | method | hit rate@{k} | MRR@{k} | NDCG@{k} |\n|---|---:|---:|---:|\n",
            self.users, self.training_events, self.held_out_events, self.products
        );
        if self.skipped_lines > 0 {
            let lines = if self.skipped_lines == 1 { "line" } else { "lines" };
            out = out.replacen(
                "\n\n",
                &format!("; {} {lines} of the file skipped (named on stderr)\n\n", self.skipped_lines),
                1,
            );
        }
        if self.attributed_events == 0 {
            out = out.replacen(
                "\n\n",
                "; no training event came from a shown list (`recommendationId`), so ranking kept its initial weights\n\n",
                1,
            );
        }
        for (name, m) in &self.rows {
            out += &format!("| {name} | {:.3} | {:.3} | {:.3} |\n", m.hit_rate, m.mrr, m.ndcg);
        }
        out
    }
}

/// Gap of inactivity that ends a session when the history has none (the processor's default).
const SESSION_GAP_MINUTES: i64 = 30;

/// Reads the history file of `options`, cut short for a validation split.
pub fn load(options: &Options) -> anyhow::Result<History> {
    let mut history = read(&options.events, options.format)?;
    if options.validation {
        let cutoff = cutoff(&history, options.holdout_hours)?;
        history.interactions.truncate(history.interactions.partition_point(|x| x.at < cutoff));
    }
    Ok(history)
}

/// Runs the evaluation of a history file.
pub fn run(options: &Options) -> anyhow::Result<Report> {
    evaluate(&load(options)?, options.holdout_hours, options.k)
}

/// The start of the held-out period: `holdout_hours` before the history's last interaction.
fn cutoff(history: &History, holdout_hours: f64) -> anyhow::Result<DateTime<Utc>> {
    anyhow::ensure!(holdout_hours.is_finite() && holdout_hours > 0.0, "the held-out period must be positive");
    let last = history.interactions.last().ok_or_else(|| anyhow::anyhow!("the history holds no interaction"))?.at;
    Ok(last - Duration::milliseconds((holdout_hours * 3_600_000.0) as i64))
}

/// Named recommendation lists: (method, one list per user of [`Split::users`]).
pub type Lists = Vec<(&'static str, Vec<Vec<String>>)>;

/// A history split at its held-out period.
pub struct Split<'h> {
    pub history: &'h History,
    /// Interactions before the held-out period (what the platform learns from).
    pub train: &'h [Interaction],
    pub test: &'h [Interaction],
    /// Each returning user (active in both) -> the products they engaged with while held out.
    pub truth: BTreeMap<&'h str, HashSet<&'h str>>,
    pub k: usize,
}

impl<'h> Split<'h> {
    pub fn new(history: &'h History, holdout_hours: f64, k: usize) -> anyhow::Result<Self> {
        anyhow::ensure!((1..=ranking::MAX_RANKED).contains(&k), "k must be from 1 to {}", ranking::MAX_RANKED);
        let cutoff = cutoff(history, holdout_hours)?;
        let split = history.interactions.partition_point(|x| x.at < cutoff);
        let (train, test) = history.interactions.split_at(split);
        anyhow::ensure!(!train.is_empty(), "nothing before the held-out period: shorten --holdout-hours");
        let trained: HashSet<&str> = train.iter().map(|x| &*x.user).collect();
        let mut truth: BTreeMap<&str, HashSet<&str>> = BTreeMap::new();
        for x in test.iter().filter(|x| x.kind.engages() && trained.contains(&*x.user)) {
            truth.entry(&x.user).or_default().insert(&x.product);
        }
        anyhow::ensure!(!truth.is_empty(), "no user is active both before and during the held-out period");
        Ok(Self { history, train, test, truth, k })
    }

    /// The returning users, in a fixed order.
    pub fn users(&self) -> Vec<&'h str> {
        self.truth.keys().copied().collect()
    }

    /// Training interactions attributed to a shown list.
    pub fn attributed(&self) -> usize {
        self.train.iter().filter(|x| x.recommendation.is_some()).count()
    }

    /// The platform's lists from the in-memory replay of the training part: (method, one list
    /// per user of [`Split::users`]); a second row with the initial ranking weights when some
    /// training event was attributed to a shown list (otherwise ranking learns nothing).
    pub fn replayed(&self) -> anyhow::Result<Lists> {
        let catalog = kit::state::Shared::new(catalog::Catalog::from_products(self.history.products.values().cloned()));
        let products = &self.history.products;
        let users = self.users();
        let lists = |config: ranking::Config, what: &'static str| -> anyhow::Result<Vec<Vec<String>>> {
            // One step at a time from the interactions: the events are not held.
            let mut progress = Progress::new(what, self.train.len());
            let training = self.train.iter().enumerate().map(|(i, x)| {
                progress.at(i);
                step(i, x, products)
            });
            let catalog = kit::state::Shared::clone(&catalog);
            let platform = Platform::replay(training, catalog, config, Attribution::AsRecorded, |_| {})?;
            users.iter().map(|u| platform.recommend(u, self.k)).collect()
        };
        let mut rows = vec![(PLATFORM, lists(ranking::Config::default(), "training events replayed")?)];
        if self.attributed() > 0 {
            let initial = ranking::Config { learning_rate: 0.0, ..Default::default() };
            rows.push((PLATFORM_INITIAL, lists(initial, "training events replayed with the initial ranking weights")?));
        }
        Ok(rows)
    }

    /// The report: the given platform rows, then the baselines computed on the same users.
    pub fn report(&self, platform: Lists) -> Report {
        let k = self.k;
        let baselines = Baselines::new(self.train, &self.history.products);
        let users = self.users();
        let lists = |f: &dyn Fn(&str) -> Vec<String>| users.iter().map(|u| f(u)).collect::<Vec<_>>();
        let mut methods = platform;
        methods.extend([
            (MOST_POPULAR, lists(&|_| baselines.popular(k))),
            (POPULAR_IN_CATEGORIES, lists(&|u| baselines.popular_in_categories(u, k))),
            (RECENTLY_VIEWED, lists(&|u| baselines.recently_viewed(u, k))),
            (ITEM_KNN, lists(&|u| baselines.item_knn(u, k))),
            (SESSION_KNN, lists(&|u| baselines.session_knn(u, k))),
        ]);
        let rows: Vec<(&'static str, Metrics)> = methods
            .into_iter()
            .map(|(name, lists)| {
                (name, metrics(users.iter().zip(&lists).map(|(u, l)| (l.as_slice(), &self.truth[u])), k))
            })
            .collect();
        Report {
            methods: rows.iter().copied().collect(),
            rows,
            users: users.len(),
            training_events: self.train.len(),
            held_out_events: self.test.len(),
            attributed_events: self.attributed(),
            products: self.history.products.len(),
            skipped_lines: self.history.skipped,
            k,
        }
    }
}

/// Evaluates a history already read.
pub fn evaluate(history: &History, holdout_hours: f64, k: usize) -> anyhow::Result<Report> {
    let split = Split::new(history, holdout_hours, k)?;
    Ok(split.report(split.replayed()?))
}

/// Hit rate, MRR and NDCG at `k` over (list, relevant items).
pub fn metrics<'a>(cases: impl Iterator<Item = (&'a [String], &'a HashSet<&'a str>)>, k: usize) -> Metrics {
    let (mut hits, mut rr, mut ndcg, mut n) = (0.0, 0.0, 0.0, 0usize);
    for (list, relevant) in cases {
        n += 1;
        let top = &list[..list.len().min(k)];
        if let Some(first) = top.iter().position(|p| relevant.contains(p.as_str())) {
            hits += 1.0;
            rr += 1.0 / (first as f64 + 1.0);
        }
        let dcg: f64 = top
            .iter()
            .enumerate()
            .filter(|(_, p)| relevant.contains(p.as_str()))
            .map(|(i, _)| 1.0 / (i as f64 + 2.0).log2())
            .sum();
        let ideal: f64 = (0..relevant.len().min(k)).map(|i| 1.0 / (i as f64 + 2.0).log2()).sum();
        if ideal > 0.0 {
            ndcg += dcg / ideal;
        }
    }
    if n == 0 {
        return Metrics::default();
    }
    let n = n as f64;
    Metrics { hit_rate: hits / n, mrr: rr / n, ndcg: ndcg / n }
}

/// The baselines' models, learned from the training interactions. Products and users are the
/// history's own ids (shared, not copied).
struct Baselines {
    /// Products by interaction count, most first (ties by id).
    popular: Vec<Arc<str>>,
    /// Per category, its products by interaction count.
    popular_by_category: HashMap<String, Vec<Arc<str>>>,
    category_of: HashMap<Arc<str>, String>,
    /// Per user, the products of their interactions in time order.
    by_user: HashMap<Arc<str>, Vec<Arc<str>>>,
    /// Sessions: products in order of first interaction.
    sessions: Vec<Vec<Arc<str>>>,
    /// Per product, the sessions it is in.
    sessions_of: HashMap<Arc<str>, Vec<usize>>,
    /// Per user, their last session.
    last_session: HashMap<Arc<str>, usize>,
    /// Per product, co-visitation counts with other products (same session).
    covis: HashMap<Arc<str>, HashMap<Arc<str>, f64>>,
}

/// A user's session: the history's own, or one derived from gaps of inactivity (numbered).
#[derive(PartialEq, Eq, Hash)]
enum SessionKey<'h> {
    Named(&'h str),
    Derived(usize),
}

/// Most neighbours session-kNN sums over.
const SESSION_NEIGHBOURS: usize = 100;
/// Most sessions of one product session-kNN looks at (the most recent).
const SESSIONS_PER_PRODUCT: usize = 500;
/// Most distinct products of a session that co-visitation pairs up.
const COVIS_SESSION_LEN: usize = 50;

impl Baselines {
    fn new(train: &[Interaction], products: &BTreeMap<String, catalog::Product>) -> Self {
        let mut counts: HashMap<&Arc<str>, usize> = HashMap::new();
        let mut by_user: HashMap<Arc<str>, Vec<Arc<str>>> = HashMap::new();
        let mut session_ids: HashMap<(&str, SessionKey<'_>), usize> = HashMap::new();
        let mut sessions: Vec<Vec<Arc<str>>> = Vec::new();
        let mut last_session: HashMap<Arc<str>, usize> = HashMap::new();
        // Per user: when they were last seen, and how many sessions were derived for them.
        let mut derived: HashMap<&str, (DateTime<Utc>, usize)> = HashMap::new();
        for x in train.iter().filter(|x| x.kind.engages()) {
            *counts.entry(&x.product).or_default() += 1;
            by_user.entry(Arc::clone(&x.user)).or_default().push(Arc::clone(&x.product));
            let key = match &x.session {
                Some(s) => SessionKey::Named(s),
                None => {
                    let (last, n) = derived.entry(&x.user).or_insert((x.at, 0));
                    if x.at - *last > Duration::minutes(SESSION_GAP_MINUTES) {
                        *n += 1;
                    }
                    *last = x.at;
                    SessionKey::Derived(*n)
                }
            };
            let id = *session_ids.entry((&x.user, key)).or_insert_with(|| {
                sessions.push(Vec::new());
                sessions.len() - 1
            });
            if !sessions[id].contains(&x.product) {
                sessions[id].push(Arc::clone(&x.product));
            }
            last_session.insert(Arc::clone(&x.user), id);
        }
        drop(session_ids);
        drop(derived);
        let order = |v: &mut Vec<Arc<str>>| {
            v.sort_by(|a, b| counts[b].cmp(&counts[a]).then_with(|| a.cmp(b)));
        };
        let mut popular: Vec<Arc<str>> = counts.keys().map(|p| Arc::clone(p)).collect();
        order(&mut popular);
        let category_of: HashMap<Arc<str>, String> =
            counts.keys().filter_map(|p| Some((Arc::clone(p), products.get(&***p)?.category.clone()))).collect();
        let mut popular_by_category: HashMap<String, Vec<Arc<str>>> = HashMap::new();
        for p in &popular {
            if let Some(c) = category_of.get(p) {
                popular_by_category.entry(c.clone()).or_default().push(Arc::clone(p));
            }
        }
        let mut sessions_of: HashMap<Arc<str>, Vec<usize>> = HashMap::new();
        let mut covis: HashMap<Arc<str>, HashMap<Arc<str>, f64>> = HashMap::new();
        for (id, s) in sessions.iter().enumerate() {
            for p in s {
                sessions_of.entry(Arc::clone(p)).or_default().push(id);
            }
            let s = &s[..s.len().min(COVIS_SESSION_LEN)];
            for a in s {
                let row = covis.entry(Arc::clone(a)).or_default();
                for b in s.iter().filter(|b| *b != a) {
                    *row.entry(Arc::clone(b)).or_default() += 1.0;
                }
            }
        }
        Self { popular, popular_by_category, category_of, by_user, sessions, sessions_of, last_session, covis }
    }

    fn popular(&self, k: usize) -> Vec<String> {
        self.popular.iter().take(k).map(|p| p.to_string()).collect()
    }

    /// Fills `list` up to `k` with the most popular products it does not hold yet.
    fn fill(&self, list: &[&str], k: usize) -> Vec<String> {
        let have: HashSet<&str> = list.iter().copied().collect();
        let more = self.popular.iter().map(|p| &**p).filter(|p| !have.contains(p));
        let more = more.take(k.saturating_sub(list.len()));
        list.iter().copied().chain(more).take(k).map(str::to_owned).collect()
    }

    fn popular_in_categories(&self, user: &str, k: usize) -> Vec<String> {
        let mut categories: HashMap<&str, usize> = HashMap::new();
        for p in self.by_user.get(user).into_iter().flatten() {
            if let Some(c) = self.category_of.get(p) {
                *categories.entry(c).or_default() += 1;
            }
        }
        let mut categories: Vec<(&str, usize)> = categories.into_iter().collect();
        categories.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let mut list: Vec<&str> = Vec::new();
        for (c, _) in categories {
            for p in self.popular_by_category.get(c).into_iter().flatten() {
                if list.len() < k && !list.contains(&&**p) {
                    list.push(p);
                }
            }
        }
        self.fill(&list, k)
    }

    /// The user's own distinct products, most recent first.
    fn recent(&self, user: &str) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for p in self.by_user.get(user).into_iter().flatten().rev() {
            if !out.contains(&&**p) {
                out.push(p);
            }
        }
        out
    }

    fn recently_viewed(&self, user: &str, k: usize) -> Vec<String> {
        self.fill(&self.recent(user), k)
    }

    /// Products co-visited with the user's five most recent ones, nearer ones weighing more.
    fn item_knn(&self, user: &str, k: usize) -> Vec<String> {
        let mut scores: HashMap<&str, f64> = HashMap::new();
        for (i, seed) in self.recent(user).iter().take(5).enumerate() {
            for (q, c) in self.covis.get(*seed).into_iter().flatten() {
                *scores.entry(q).or_default() += c / (1.0 + i as f64);
            }
        }
        self.fill(&ranked(scores, k), k)
    }

    /// Products of the past sessions most similar (cosine) to the user's last session.
    fn session_knn(&self, user: &str, k: usize) -> Vec<String> {
        let Some(&current) = self.last_session.get(user) else { return self.popular(k) };
        let query: HashSet<&str> = self.sessions[current].iter().map(|p| &**p).collect();
        let mut overlap: HashMap<usize, f64> = HashMap::new();
        for p in &query {
            for &s in self.sessions_of.get(*p).into_iter().flatten().rev().take(SESSIONS_PER_PRODUCT) {
                if s != current {
                    *overlap.entry(s).or_default() += 1.0;
                }
            }
        }
        let mut neighbours: Vec<(usize, f64)> = overlap
            .into_iter()
            .map(|(s, common)| (s, common / ((self.sessions[s].len() * query.len()) as f64).sqrt()))
            .collect();
        neighbours.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut scores: HashMap<&str, f64> = HashMap::new();
        for (s, similarity) in neighbours.into_iter().take(SESSION_NEIGHBOURS) {
            for p in &self.sessions[s] {
                *scores.entry(p).or_default() += similarity;
            }
        }
        self.fill(&ranked(scores, k), k)
    }
}

/// The `k` best-scored products, ties by id.
fn ranked(scores: HashMap<&str, f64>, k: usize) -> Vec<&str> {
    let mut scored: Vec<(&str, f64)> = scores.into_iter().collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    scored.into_iter().take(k).map(|(p, _)| p).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[test]
    fn metrics_are_computed_as_defined() {
        let list: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let relevant: HashSet<&str> = ["b", "z"].into();
        let m = metrics([(list.as_slice(), &relevant)].into_iter(), 3);
        assert_eq!((m.hit_rate, m.mrr), (1.0, 0.5));
        let expected = (1.0 / 3f64.log2()) / (1.0 + 1.0 / 3f64.log2());
        assert!((m.ndcg - expected).abs() < 1e-12, "{}", m.ndcg);
        let none: HashSet<&str> = ["z"].into();
        assert_eq!(metrics([(list.as_slice(), &none)].into_iter(), 3), Metrics::default());
    }

    /// A small REES46-style history: shoppers who view a few phones in one session come back
    /// to one of them later; one buys. Every method is scored on the same returning users.
    fn small_history(dir: &Path) -> PathBuf {
        let mut lines = vec![
            "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session".to_owned(),
        ];
        for u in 0..40 {
            let (user, session) = (1000 + u, format!("s-{u}"));
            for (m, p) in [(0, 10 + u % 7), (1, 20 + u % 5), (2, 30 + u % 3)] {
                lines.push(format!(
                    "2019-10-01 02:{m:02}:00 UTC,view,{p},1,electronics.smartphone,acme,{}.5,{user},{session}",
                    100 + p
                ));
            }
            if u % 4 == 0 {
                lines.push(format!(
                    "2019-10-01 02:05:00 UTC,purchase,{},1,electronics.smartphone,acme,130.5,{user},{session}",
                    30 + u % 3
                ));
            }
            lines.push(format!(
                "2019-10-01 02:50:00 UTC,view,{},1,electronics.smartphone,acme,110.5,{user},{session}",
                10 + u % 7
            ));
        }
        lines.push("not,a,valid,line".to_owned());
        let path = dir.join("history.csv");
        std::fs::write(&path, lines.join("\n")).expect("write");
        path
    }

    #[test]
    fn a_small_history_is_read_replayed_and_scored() {
        let dir = std::env::temp_dir().join(format!("history-eval-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let history = read(&small_history(&dir), Format::Rees46).expect("read");
        assert_eq!(history.skipped, 1);
        assert_eq!(history.products.len(), 15);
        assert!(history.interactions.windows(2).all(|w| w[0].at <= w[1].at));
        let report = evaluate(&history, 0.5, 10).expect("evaluates");
        assert_eq!(report.users, 40);
        // Nothing in the history came from a shown list, so there is no separate row for the
        // initial ranking weights: ranking kept them.
        assert_eq!((report.methods.len(), report.attributed_events), (6, 0));
        // Everyone came back to the first phone they viewed: recently viewed finds it.
        assert_eq!(report.methods[RECENTLY_VIEWED].hit_rate, 1.0, "{}", report.markdown());
        assert!(report.methods[PLATFORM].hit_rate >= 0.9, "{}", report.markdown());
        let json: Value = serde_json::from_str(&report.json()).expect("JSON");
        assert_eq!(json["users"], 40);
        assert!(
            json["methods"]["platform"]["hitRate"].is_number() && json["methods"]["session-kNN"]["ndcg"].is_number()
        );
        assert!(evaluate(&history, 10.0, 10).is_err(), "nothing before the held-out period");

        // The validation split leaves the held-out period (here the last 3 minutes: the views
        // at 02:50) out and holds out the 3 minutes before the kept part's end (02:02–02:05).
        let options = |validation| Options {
            events: dir.join("history.csv"),
            format: Format::Rees46,
            holdout_hours: 0.05,
            k: 10,
            validation,
        };
        let test = run(&options(false)).expect("evaluates");
        let validation = run(&options(true)).expect("evaluates");
        assert_eq!((test.training_events, test.held_out_events), (130, 40), "{}", test.markdown());
        assert_eq!((validation.training_events, validation.held_out_events), (80, 50), "{}", validation.markdown());
        std::fs::remove_dir_all(&dir).ok();
    }

    fn written(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("history-{name}-{}", std::process::id()));
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn each_id_is_held_once_however_many_rows_name_it() {
        let rees46 = written(
            "shared-ids.csv",
            &[
                "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session",
                "2019-10-01 02:00:00 UTC,view,p1,c,,,1.0,u1,s1",
                "2019-10-01 02:01:00 UTC,view,p2,c,,,1.0,u2,s2",
                "2019-10-01 02:02:00 UTC,cart,p1,c,,,1.0,u1,s1",
                "2019-10-01 02:03:00 UTC,view,p1,c,,,1.0,u2,s2",
            ]
            .join("\n"),
        );
        let h = read(&rees46, Format::Rees46).expect("read");
        let [a, b, c, d] = h.interactions.as_slice() else { panic!("4 interactions: {:?}", h.interactions) };
        assert!(Arc::ptr_eq(&a.user, &c.user) && Arc::ptr_eq(&b.user, &d.user), "a user's rows share its id");
        assert!(Arc::ptr_eq(&a.product, &c.product) && Arc::ptr_eq(&a.product, &d.product), "so do a product's");
        let session = |x: &Interaction| x.session.clone().expect("a session");
        assert!(Arc::ptr_eq(&session(a), &session(c)), "and a session's");
        assert!(!Arc::ptr_eq(&a.user, &b.user) && &*b.user == "u2");
        // u1 is held by its two rows and p2 by its one: the reader keeps no share once done.
        assert_eq!((Arc::strong_count(&a.user), Arc::strong_count(&b.product)), (2, 1));
    }

    #[test]
    fn taobao_and_platform_lines_are_read() {
        let taobao =
            written("taobao.csv", "1,2,3,pv,1511544070\n1,2,3,buy,1511544071\n1,2,3,teleport,1511544071\n1,2,3,pv\n");
        let h = read(&taobao, Format::Taobao).expect("read");
        assert_eq!(h.interactions.iter().map(|x| x.kind).collect::<Vec<_>>(), [Kind::View, Kind::Purchase]);
        assert_eq!(h.skipped, 2, "an unknown behaviour and a short line");
        let platform = written(
            "platform.jsonl",
            &[
                r#"{"productId":"SKU-1","name":"Shoe","category":"shoes","price":5}"#,
                r#"{"userId":"u","eventType":"product_view","productId":"SKU-1","timestamp":"2024-01-01T00:00:00Z"}"#,
                r#"{"userId":"u","eventType":"remove_from_cart","productId":"SKU-1","timestamp":"2024-01-01T00:30:00Z"}"#,
                r#"{"userId":"u","eventType":"page_view","timestamp":"2024-01-01T00:40:00Z"}"#,
                r#"{"userId":"u","items":[{"productId":"SKU-1","quantity":1,"unitPrice":5}],"amount":5,"timestamp":"2024-01-02T00:00:00Z"}"#,
                r#"{"userId":"u","userId":"v","eventType":"product_view","productId":"SKU-1","timestamp":"2024-01-01T00:00:00Z"}"#,
            ]
            .join("\n"),
        );
        let p = read(&platform, Format::Platform).expect("read");
        assert_eq!(p.products["SKU-1"].category, "shoes");
        assert_eq!(
            p.interactions.iter().map(|x| x.kind).collect::<Vec<_>>(),
            [Kind::View, Kind::RemoveFromCart, Kind::Purchase],
            "a page view is valid and no interaction with a product"
        );
        assert_eq!(p.skipped, 1, "the line with two userIds");
        std::fs::remove_file(taobao).ok();
        std::fs::remove_file(platform).ok();
    }

    /// REES46 files as other exports write them: a byte-order mark, CRLF, columns in another
    /// order, quoted fields with commas, the cosmetics shop's `remove_from_cart`, and lines no
    /// API would take (an empty user, a product id with a space).
    #[test]
    fn rees46_files_are_read_as_csv_by_their_header() {
        let path = written(
            "rees46.csv",
            &[
                "\u{feff}user_id,event_type,event_time,product_id,price,brand,category_code,category_id,user_session",
                "7,view,2019-10-01 02:00:00 UTC,P1,10.5,\"Smith, Jones & Co\",,55,s1",
                "7,cart,2019-10-01 02:01:00 UTC,P1,10.5,\"Smith, Jones & Co\",,55,s1",
                "7,remove_from_cart,2019-10-01 02:02:00 UTC,P1,10.5,,,55,s1",
                "8,purchase,2019-10-01T02:03:00Z,P2,3,,kitchen.knife,56,",
                ",view,2019-10-01 02:04:00 UTC,P1,10.5,,,55,s9",
                "9,view,2019-10-01 02:04:00 UTC,P 3,10.5,,,55,s9",
                "9,wish,2019-10-01 02:04:00 UTC,P3,10.5,,,55,s9",
                "9,view,yesterday,P3,10.5,,,55,s9",
                "",
            ]
            .join("\r\n"),
        );
        let h = read(&path, Format::Rees46).expect("read");
        let kinds: Vec<_> = h.interactions.iter().map(|x| (&*x.user, x.kind)).collect();
        assert_eq!(kinds, [("7", Kind::View), ("7", Kind::Cart), ("7", Kind::RemoveFromCart), ("8", Kind::Purchase)]);
        assert_eq!(h.skipped, 4, "empty user, product id with a space, unknown event type, bad time");
        let lines: Vec<u64> = h.first_skipped.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, [6, 7, 8, 9], "CRLF line ends counted once: {:?}", h.first_skipped);
        assert!(h.first_skipped[2].1.contains(r#"unknown event_type "wish""#), "{:?}", h.first_skipped);
        assert_eq!(h.products["P1"].brand.as_deref(), Some("Smith, Jones & Co"));
        assert_eq!((h.products["P1"].category.as_str(), h.products["P2"].category.as_str()), ("55", "kitchen.knife"));
        assert_eq!(h.products["P2"].price, 3.0);
        assert_eq!(h.interactions[3].session, None);
        assert!(h.interactions[0].session.as_deref() == Some("s1"));
        let removal = steps(&h.interactions, &h.products);
        assert!(
            matches!(&removal[2], Step::Activity(a) if a.event_type == EventType::RemoveFromCart),
            "a removal is replayed as one"
        );
        let no_user = written("rees46-bad-header.csv", "event_time,event_type,product_id\n");
        let e = read(&no_user, Format::Rees46).expect_err("no user_id column");
        assert!(e.to_string().contains("user_id"), "{e}");
        std::fs::remove_file(path).ok();
        std::fs::remove_file(no_user).ok();
    }

    /// Each line is parsed on its own, by one parser given line after line: a quote left open
    /// on one line neither takes in the next nor stops the parser.
    #[test]
    fn a_quote_left_open_does_not_reach_the_next_line() {
        let path = written(
            "rees46-open-quote.csv",
            &[
                "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session",
                "2019-10-01 01:00:00 UTC,view,P1,1,\"open,,1,a,s",
                "2019-10-01 01:01:00 UTC,view,P2,1,,\"Smith, Jones\",1,b,s2",
                "2019-10-01 01:02:00 UTC,cart,P3,1,,,1,c,s3",
            ]
            .join("\n"),
        );
        let h = read(&path, Format::Rees46).expect("read");
        std::fs::remove_file(path).ok();
        let read: Vec<(&str, &str)> = h.interactions.iter().map(|x| (&*x.user, &*x.product)).collect();
        assert_eq!(read, [("b", "P2"), ("c", "P3")]);
        assert_eq!(h.first_skipped.iter().map(|(line, _)| *line).collect::<Vec<_>>(), [2]);
        assert_eq!(h.products["P2"].brand.as_deref(), Some("Smith, Jones"));
    }

    /// Taking a product out of the cart in the held-out period is not an engagement with it.
    #[test]
    fn removals_are_not_relevant_items() {
        let path = written(
            "rees46-removals.csv",
            &[
                "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session",
                "2019-10-01 01:00:00 UTC,view,P1,1,,,1,a,s",
                "2019-10-01 01:00:00 UTC,view,P1,1,,,1,b,s2",
                "2019-10-01 03:00:00 UTC,remove_from_cart,P1,1,,,1,a,s",
                "2019-10-01 03:00:00 UTC,view,P1,1,,,1,b,s2",
                "not,a,line",
            ]
            .join("\n"),
        );
        let h = read(&path, Format::Rees46).expect("read");
        let report = evaluate(&h, 1.0, 10).expect("evaluates");
        assert_eq!(report.users, 1, "only b engaged while held out: {}", report.markdown());
        assert_eq!((report.held_out_events, report.skipped_lines), (2, 1));
        assert!(report.markdown().contains("1 line of the file skipped"), "{}", report.markdown());
        assert_eq!(serde_json::from_str::<Value>(&report.json()).expect("JSON")["skippedLines"], 1);
        std::fs::remove_file(path).ok();
    }
}
