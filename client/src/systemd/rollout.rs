//! Rolling operations, planned without I/O: which machine goes next, how many are in flight,
//! and when the failure threshold stops new ones. The CLI's `restart --batch` drives it; the
//! gateway's bulk actions can drive the same planner.
//!
//! Batches are a running counter, not waves: at most `batch` machines are in flight, and as
//! soon as one ends the next starts (so a slow machine never holds a whole wave back, and
//! waves never overlap into more than `batch` at once). Once more machines have failed or been
//! unreachable than `max_fail` allows, no machine is started any more; those in flight finish.

use std::fmt;

/// A count of machines or a percentage of the rollout's machines (`3`, `25%`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    Count(usize),
    /// 0..=100.
    Percent(u8),
}

/// Why an amount or an order is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{0:?} is not a count or a percentage (3, 25%)")]
    Amount(String),
    #[error("a percentage is at most 100%, got {0:?}")]
    Percent(String),
    #[error("a batch needs at least one machine, got {0:?}")]
    EmptyBatch(String),
    #[error("order is `host` or `label:KEY`, got {0:?}")]
    Order(String),
}

impl Amount {
    pub fn parse(s: &str) -> Result<Amount, PlanError> {
        let bad = || PlanError::Amount(s.to_owned());
        match s.strip_suffix('%') {
            Some(p) => {
                let p: u16 = p.parse().map_err(|_| bad())?;
                u8::try_from(p)
                    .ok()
                    .filter(|p| *p <= 100)
                    .map(Amount::Percent)
                    .ok_or_else(|| PlanError::Percent(s.to_owned()))
            }
            None => s.parse().map(Amount::Count).map_err(|_| bad()),
        }
    }

    /// A batch size (at least one machine) parsed from `s`.
    pub fn parse_batch(s: &str) -> Result<Amount, PlanError> {
        match Amount::parse(s)? {
            Amount::Count(0) | Amount::Percent(0) => Err(PlanError::EmptyBatch(s.to_owned())),
            a => Ok(a),
        }
    }

    /// As a batch of `total` machines: a percentage rounds up, and a batch is never empty.
    pub fn batch_of(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => n.max(1),
            Amount::Percent(p) => (total * usize::from(p)).div_ceil(100).max(1),
        }
    }

    /// Whether `bad` machines out of `total` exceed this threshold (`0`: any failure does;
    /// `10%` of 20: the third).
    pub fn exceeded_by(self, bad: usize, total: usize) -> bool {
        match self {
            Amount::Count(n) => bad > n,
            Amount::Percent(p) => bad * 100 > usize::from(p) * total,
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// The order machines are taken in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Order {
    /// By hostname.
    #[default]
    Host,
    /// By the value of a label, then hostname; machines without it last.
    Label(String),
}

impl Order {
    pub fn parse(s: &str) -> Result<Order, PlanError> {
        match s.split_once(':') {
            None if s == "host" => Ok(Order::Host),
            Some(("label", key)) if !key.is_empty() => Ok(Order::Label(key.to_owned())),
            _ => Err(PlanError::Order(s.to_owned())),
        }
    }

    /// The sort key of a machine with this hostname and label lookup.
    pub fn key<'a>(
        &self,
        hostname: &'a str,
        label: impl Fn(&str) -> Option<&'a str>,
    ) -> (bool, &'a str, &'a str) {
        match self {
            Order::Host => (false, "", hostname),
            Order::Label(k) => match label(k) {
                Some(v) => (false, v, hostname),
                None => (true, "", hostname),
            },
        }
    }
}

impl fmt::Display for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Order::Host => f.write_str("host"),
            Order::Label(k) => write!(f, "label:{k}"),
        }
    }
}

/// Where one machine of a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    NotStarted,
    Running,
    Done,
    Failed,
    Unreachable,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::NotStarted => "not-started",
            Step::Running => "running",
            Step::Done => "done",
            Step::Failed => "failed",
            Step::Unreachable => "unreachable",
        }
    }

    pub fn parse(s: &str) -> Option<Step> {
        [
            Step::NotStarted,
            Step::Running,
            Step::Done,
            Step::Failed,
            Step::Unreachable,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    /// Counts against `--max-fail`.
    pub fn is_bad(self) -> bool {
        matches!(self, Step::Failed | Step::Unreachable)
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The plan of one rollout over machines `0..total`, in the order they are to be taken.
#[derive(Debug, Clone)]
pub struct Rollout {
    steps: Vec<Step>,
    batch: usize,
    max_fail: Amount,
    next: usize,
}

impl Rollout {
    pub fn new(total: usize, batch: Amount, max_fail: Amount) -> Rollout {
        Rollout {
            steps: vec![Step::NotStarted; total],
            batch: batch.batch_of(total),
            max_fail,
            next: 0,
        }
    }

    /// Machines in flight at most.
    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn in_flight(&self) -> usize {
        self.count(Step::Running)
    }

    pub fn count(&self, step: Step) -> usize {
        self.steps.iter().filter(|s| **s == step).count()
    }

    /// Failed and unreachable machines so far.
    pub fn bad(&self) -> usize {
        self.steps.iter().filter(|s| s.is_bad()).count()
    }

    /// Whether the threshold stopped new starts.
    pub fn halted(&self) -> bool {
        self.max_fail.exceeded_by(self.bad(), self.steps.len())
    }

    /// The next machine to start, marked running, if one may start now.
    pub fn start_next(&mut self) -> Option<usize> {
        if self.halted() || self.in_flight() >= self.batch || self.next >= self.steps.len() {
            return None;
        }
        let i = self.next;
        self.next += 1;
        self.steps[i] = Step::Running;
        Some(i)
    }

    /// Machine `i` ended with `step` (done, failed or unreachable).
    pub fn finish(&mut self, i: usize, step: Step) {
        if let Some(s) = self.steps.get_mut(i).filter(|s| **s == Step::Running) {
            *s = step;
        }
    }

    /// Whether nothing is running and nothing more will start.
    pub fn is_over(&self) -> bool {
        self.in_flight() == 0 && (self.halted() || self.next >= self.steps.len())
    }

    pub fn step(&self, i: usize) -> Step {
        self.steps.get(i).copied().unwrap_or(Step::NotStarted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts() {
        assert_eq!(Amount::parse("3"), Ok(Amount::Count(3)));
        assert_eq!(Amount::parse("25%"), Ok(Amount::Percent(25)));
        assert!(Amount::parse("101%").is_err());
        assert!(Amount::parse("-1").is_err());
        assert!(Amount::parse("x%").is_err());
        assert!(Amount::parse("").is_err());
        assert!(Amount::parse_batch("0").is_err());
        assert!(Amount::parse_batch("0%").is_err());
        assert_eq!(Amount::Percent(25).batch_of(10), 3);
        assert_eq!(Amount::Percent(1).batch_of(10), 1);
        assert_eq!(Amount::Percent(100).batch_of(7), 7);
        assert_eq!(Amount::Count(5).batch_of(2), 5);
        assert!(!Amount::Count(0).exceeded_by(0, 5));
        assert!(Amount::Count(0).exceeded_by(1, 5));
        assert!(!Amount::Percent(10).exceeded_by(2, 20));
        assert!(Amount::Percent(10).exceeded_by(3, 20));
        assert!(!Amount::Percent(100).exceeded_by(20, 20));
        assert_eq!(Amount::Percent(10).to_string(), "10%");
    }

    #[test]
    fn orders() {
        assert_eq!(Order::parse("host"), Ok(Order::Host));
        assert_eq!(Order::parse("label:zone"), Ok(Order::Label("zone".into())));
        assert!(Order::parse("label:").is_err());
        assert!(Order::parse("random").is_err());
        let o = Order::Label("zone".into());
        let with = |v: &'static str| move |_: &str| Some(v);
        assert!(o.key("b", with("a")) < o.key("a", with("b")));
        assert!(o.key("z", with("b")) < o.key("a", |_| None));
        assert_eq!(o.to_string(), "label:zone");
    }

    #[test]
    fn never_more_than_a_batch_in_flight() {
        let mut r = Rollout::new(5, Amount::Count(2), Amount::Count(5));
        assert_eq!(r.start_next(), Some(0));
        assert_eq!(r.start_next(), Some(1));
        assert_eq!(r.start_next(), None);
        // One ends: exactly one more starts, without waiting for the other.
        r.finish(1, Step::Done);
        assert_eq!(r.start_next(), Some(2));
        assert_eq!(r.start_next(), None);
        assert_eq!(r.in_flight(), 2);
        r.finish(0, Step::Done);
        r.finish(2, Step::Done);
        assert_eq!(r.start_next(), Some(3));
        assert_eq!(r.start_next(), Some(4));
        assert!(!r.is_over());
        r.finish(3, Step::Done);
        r.finish(4, Step::Done);
        assert!(r.is_over());
        assert_eq!(r.count(Step::Done), 5);
        // Finishing twice or out of range changes nothing.
        r.finish(4, Step::Failed);
        r.finish(9, Step::Failed);
        assert_eq!(r.count(Step::Done), 5);
    }

    #[test]
    fn the_threshold_stops_new_starts_and_lets_running_ones_finish() {
        let mut r = Rollout::new(6, Amount::Count(2), Amount::Count(1));
        assert_eq!(r.start_next(), Some(0));
        assert_eq!(r.start_next(), Some(1));
        r.finish(0, Step::Failed);
        // One failure is allowed.
        assert_eq!(r.start_next(), Some(2));
        r.finish(2, Step::Unreachable);
        // Two are more than one: nothing new, and machine 1 still runs.
        assert!(r.halted());
        assert_eq!(r.start_next(), None);
        assert!(!r.is_over());
        r.finish(1, Step::Done);
        assert!(r.is_over());
        assert_eq!(r.count(Step::NotStarted), 3);
        assert_eq!(r.step(5), Step::NotStarted);
        assert_eq!(r.bad(), 2);
        // The default threshold 0: the first failure halts.
        let mut r = Rollout::new(3, Amount::Count(1), Amount::Count(0));
        assert_eq!(r.start_next(), Some(0));
        r.finish(0, Step::Failed);
        assert_eq!(r.start_next(), None);
        assert!(r.is_over());
        // A percentage batch of an empty rollout is over at once.
        assert!(Rollout::new(0, Amount::Percent(50), Amount::Count(0)).is_over());
    }

    #[test]
    fn steps_read_back() {
        for s in ["not-started", "running", "done", "failed", "unreachable"] {
            assert_eq!(Step::parse(s).unwrap().as_str(), s);
        }
        assert_eq!(Step::parse("ok"), None);
        assert!(Step::Unreachable.is_bad() && !Step::NotStarted.is_bad());
    }
}
