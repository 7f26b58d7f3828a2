//! A history read twice instead of held: once for its products, its counts and the time order
//! of its lines, then again to hand out its interactions one by one, so that `events import`
//! sends a history of any length with memory for its products only (and, when the file is not
//! in time order, 16 bytes a line to sort it by).
//!
//! The interactions come out as [`super::steps`] makes them from [`super::read`]: in time
//! order (equal times in the file's order), with the same event ids. Times are compared to
//! the microsecond: two events of a platform file less than a microsecond apart keep the
//! file's order (the datasets' times are whole seconds).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use events::generate::Step;

use super::{Format, History, Interaction, Line, LineReader, Lines};

/// What the first reading found.
pub struct Scan {
    path: PathBuf,
    reader: LineReader,
    /// Every product the history names.
    pub products: BTreeMap<String, catalog::Product>,
    /// How many interactions the history holds.
    pub interactions: usize,
    /// Lines that could not be read (the first few named on stderr with their number).
    pub skipped: usize,
    /// When the file is not in time order: each readable line's time (µs) and byte offset,
    /// sorted by time (equal times in the file's order). `None`: read it straight.
    order: Option<Vec<Place>>,
    /// The file as it was scanned.
    stamp: Stamp,
}

/// A readable line: its time in microseconds and its byte offset.
type Place = (i64, u64);

/// A file's length and modification time: what tells a file read twice changed in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp(u64, Option<SystemTime>);

impl Stamp {
    pub fn of(path: &Path) -> anyhow::Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
        Ok(Self(meta.len(), meta.modified().ok()))
    }

    /// Fails if the file at `path` is not as it was when stamped.
    pub fn check(&self, path: &Path) -> anyhow::Result<()> {
        anyhow::ensure!(
            Self::of(path)? == *self,
            "{} changed while it was being read; run the command again",
            path.display()
        );
        Ok(())
    }
}

/// Reads a history file once: its products, counts and order.
pub fn scan(path: &Path, format: Format) -> anyhow::Result<Scan> {
    let stamp = Stamp::of(path)?;
    let mut history = History::default();
    let mut reader = LineReader::new(format);
    let mut lines = Lines::open(path)?;
    let (mut interactions, mut last) = (0, i64::MIN);
    let mut order: Option<Vec<Place>> = None;
    while let Some(line) = lines.next_line() {
        let line = line?;
        let (at, count) = match timed(&mut reader, &line, &mut history)? {
            Err(reason) => {
                history.skip(line.number, &reason);
                continue;
            }
            Ok(None) => continue,
            Ok(Some(timed)) => timed,
        };
        interactions += count;
        if order.is_none() && at < last {
            // Out of time order: the places of the lines before this one, read again.
            order = Some(places(path, format, line.offset)?);
        }
        last = last.max(at);
        if let Some(order) = &mut order {
            order.push((at, line.offset));
        }
    }
    history.skipped_more();
    if let Some(order) = &mut order {
        order.sort_by_key(|p| p.0);
    }
    Ok(Scan {
        path: path.to_owned(),
        reader,
        products: history.products,
        interactions,
        skipped: history.skipped,
        order,
        stamp,
    })
}

/// Reads one line into `history` (its products kept, its interactions not): its time in
/// microseconds and how many interactions it holds, `None` when it holds none. The inner error
/// says why the line is skipped.
fn timed(
    reader: &mut LineReader,
    line: &Line,
    history: &mut History,
) -> anyhow::Result<Result<Option<(i64, usize)>, String>> {
    let read = reader.read(line.number, &line.text, history)?;
    let timed = history.interactions.first().map(|x| (x.at.timestamp_micros(), history.interactions.len()));
    history.interactions.clear();
    history.ids.clear(); // kept by nothing: the interactions are not
    Ok(read.map(|()| timed))
}

/// The places of the readable lines that start before byte `end`.
fn places(path: &Path, format: Format, end: u64) -> anyhow::Result<Vec<Place>> {
    let mut places = Vec::new();
    let mut scratch = History::default();
    let mut reader = LineReader::new(format);
    let mut lines = Lines::open(path)?;
    while let Some(line) = lines.next_line() {
        let line = line?;
        if line.offset >= end {
            break;
        }
        if let Ok(Some((at, _))) = timed(&mut reader, &line, &mut scratch)? {
            places.push((at, line.offset));
        }
    }
    Ok(places)
}

impl Scan {
    /// The history's interactions as the ingestion APIs take them, read from the file again.
    /// Fails if the file changed since it was scanned.
    pub fn steps(&self) -> anyhow::Result<Steps<'_>> {
        self.stamp.check(&self.path)?;
        Ok(Steps {
            scan: self,
            lines: Lines::open(&self.path)?,
            reader: self.reader.again(),
            scratch: History::default(),
            pending: VecDeque::new(),
            next_place: 0,
            index: 0,
        })
    }
}

/// The interactions of a [`Scan`], in time order, as [`Step`]s.
pub struct Steps<'a> {
    scan: &'a Scan,
    lines: Lines,
    reader: LineReader,
    scratch: History,
    pending: VecDeque<Interaction>,
    next_place: usize,
    index: usize,
}

impl Steps<'_> {
    /// Reads the next line with interactions into `pending`; `false` at the end.
    fn refill(&mut self) -> anyhow::Result<bool> {
        loop {
            let place = match &self.scan.order {
                None => None,
                Some(order) => match order.get(self.next_place) {
                    None => return Ok(false),
                    Some(place) => Some(*place),
                },
            };
            if let Some((_, offset)) = place {
                self.next_place += 1;
                self.lines.seek(offset)?;
            }
            let Some(line) = self.lines.next_line().transpose()? else {
                anyhow::ensure!(place.is_none(), "{} is shorter than when it was scanned", self.scan.path.display());
                return Ok(false);
            };
            self.scratch.products.clear();
            let read = self.reader.read(line.number, &line.text, &mut self.scratch)?;
            if read.is_ok() && !self.scratch.interactions.is_empty() {
                self.pending.extend(self.scratch.interactions.drain(..));
                return Ok(true);
            }
            // A line skipped when scanned is skipped again; one read then must read now.
            anyhow::ensure!(
                place.is_none(),
                "{}: the line at byte {} changed since it was scanned",
                self.scan.path.display(),
                line.offset
            );
        }
    }
}

impl Iterator for Steps<'_> {
    type Item = anyhow::Result<Step>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pending.is_empty() {
            match self.refill() {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
        let x = self.pending.pop_front()?;
        let step = super::step(self.index, &x, &self.scan.products);
        self.index += 1;
        Some(Ok(step))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{read, steps};
    use super::*;

    fn written(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("history-scan-{name}-{}", std::process::id()));
        std::fs::write(&path, text).expect("write");
        path
    }

    /// Scans `text` and checks that the scan hands out exactly what reading it whole gives.
    fn same_as_read(name: &str, format: Format, text: &str, sorted: bool) {
        let path = written(name, text);
        let whole = read(&path, format).expect("read");
        let scan = scan(&path, format).expect("scan");
        assert_eq!(scan.order.is_none(), sorted, "{name}: read straight only when in time order");
        let streamed: Vec<Step> = scan.steps().expect("steps").collect::<anyhow::Result<_>>().expect("step");
        std::fs::remove_file(&path).ok();
        assert!(!whole.interactions.is_empty(), "{name}");
        assert_eq!(streamed, steps(&whole.interactions, &whole.products), "{name}");
        assert_eq!(scan.interactions, whole.interactions.len(), "{name}");
        assert_eq!(scan.products, whole.products, "{name}");
        assert_eq!(scan.skipped, whole.skipped, "{name}");
    }

    #[test]
    fn a_scan_hands_out_what_reading_the_whole_file_gives() {
        let rees46 = [
            "\u{feff}user_id,event_type,event_time,product_id,price,brand,category_code,category_id,user_session",
            "7,view,2019-10-01 02:05:00 UTC,P1,10.5,\"Smith, Jones & Co\",,55,s1",
            "7,cart,2019-10-01 02:01:00 UTC,P1,11,,,55,s1",
            "not,a,line",
            "",
            "8,purchase,2019-10-01T02:01:00Z,P2,3,,kitchen.knife,56,",
            "9,view,2019-10-01 02:00:00 UTC,P 3,10.5,,,55,s9",
            "9,remove_from_cart,2019-10-01 01:59:00 UTC,P1,10.5,,,55,s9",
            "7,purchase,2019-10-01 02:05:00 UTC,P1,12,,,55,s1",
        ];
        same_as_read("rees46-out-of-order.csv", Format::Rees46, &rees46.join("\r\n"), false);
        // The same lines in time order (equal times kept in the file's order) are read straight.
        let sorted = [rees46[0], rees46[7], rees46[2], rees46[3], rees46[5], rees46[1], rees46[6], rees46[8]];
        same_as_read("rees46-sorted.csv", Format::Rees46, &sorted.join("\n"), true);
        // Without a header, in the dataset's column order.
        same_as_read(
            "rees46-no-header.csv",
            Format::Rees46,
            "2019-10-01 02:00:00 UTC,view,P1,1,,,1,a,s\n2019-10-01 01:00:00 UTC,purchase,P1,1,,,1,b,s2\n",
            false,
        );
        // Taobao's file is in user order, not time order.
        same_as_read(
            "taobao.csv",
            Format::Taobao,
            "1,2,3,pv,1511544070\n1,2,3,buy,1511544071\n2,4,3,fav,1511544000\n2,2,3,cart,1511544071\n2,2,3,dance,1\n",
            false,
        );
        // A platform order names two products: both interactions come from its one line.
        let platform = [
            r#"{"productId":"SKU-1","name":"Shoe","category":"shoes","price":5}"#,
            r#"{"userId":"u","items":[{"productId":"SKU-1","quantity":1,"unitPrice":5},{"productId":"SKU-2","quantity":2,"unitPrice":1}],"amount":7,"timestamp":"2024-01-02T00:00:00Z"}"#,
            r#"{"userId":"u","eventType":"product_view","productId":"SKU-1","timestamp":"2024-01-01T00:00:00Z"}"#,
            r#"{"userId":"u","eventType":"page_view","timestamp":"2024-01-01T00:40:00Z"}"#,
            r#"{"userId":"v","eventType":"add_to_cart","productId":"SKU-2","timestamp":"2024-01-03T00:00:00Z"}"#,
        ];
        same_as_read("platform.jsonl", Format::Platform, &platform.join("\n"), false);
    }

    #[test]
    fn a_file_that_changes_between_the_readings_is_refused() {
        let path = written("changed.csv", "1,2,3,pv,1511544070\n1,2,3,pv,1511544000\n");
        let scan = scan(&path, Format::Taobao).expect("scan");
        std::fs::write(&path, "1,2,3,pv,1511544070\n1,2,3,pv,1511544000\n1,2,3,pv,1511544001\n").expect("append");
        let e = scan.steps().err().expect("refused");
        std::fs::remove_file(&path).ok();
        assert!(e.to_string().contains("changed while it was being read"), "{e}");
    }
}
