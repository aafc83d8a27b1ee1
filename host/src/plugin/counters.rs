//! Counters that policies add to through `counter-add`, exposed on `/metrics` as
//! `tailgate_policy_<name>_total{policy="…", …}`.
//!
//! Guests choose names and label values, so everything is checked and bounded: names and
//! label keys must look like Prometheus identifiers, and each label key of a counter takes at
//! most `max_values_per_label` distinct values; later values are folded into `__overflow__`,
//! so a policy labelling by user id cannot blow up the host's memory or a scrape.
//!
//! Label values come from traces, which anyone who can reach the receivers can send. So a
//! place in a full label is not held for good: a value unused for `ttl` gives it up to the
//! next new value (looked for at most once a second a label), and a series unused for `ttl`
//! leaves the scrape when a counter is full. A flood of junk tenants then folds into
//! `__overflow__` while it lasts, and a real tenant that comes after it is counted under its
//! own name once the junk has been quiet for `ttl`. Ageing out was chosen over an allow-list
//! because it needs no config and keeps working as tenants come and go.

use std::collections::HashMap;

use foldhash::fast::RandomState;

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

pub(crate) const OVERFLOW: &str = "__overflow__";

/// Longest label value kept; longer ones are cut.
const MAX_LABEL_VALUE: usize = 128;
/// Most labels one series may carry.
const MAX_LABELS: usize = 8;
/// Series one counter may hold, in multiples of `max_values_per_label`. Capping each label is
/// not enough: 1,000 users × 20 tenants × 6 features × 4 models is 480,000 label sets, about
/// 100 MiB. Past the cap a new label set is counted under a series whose every value is
/// `__overflow__`, so totals stay exact while memory stays bounded.
const SERIES_PER_LABEL_VALUE: usize = 10;

type Labels = Vec<(String, String)>;

/// One series as a scrape renders it: counter name, labels (`policy` first), value.
type Series = (String, Labels, f64);

/// Hash maps, not ordered ones: a policy labelling by user and tenant makes many series, and
/// this is on every decision's path (ordered maps spent most of it comparing label strings).
/// `/metrics` sorts when it renders.
#[derive(Default)]
struct Counter {
    series: HashMap<Labels, Total, RandomState>,
    seen: HashMap<String, Values, RandomState>,
    /// The second the series were last looked over for ones to age out.
    series_swept: u64,
}

struct Total {
    value: f64,
    /// Seconds since the counters were made, when it was last added to.
    used: u64,
}

/// One label's values, with when each was last used.
#[derive(Default)]
struct Values {
    used: HashMap<String, u64, RandomState>,
    swept: u64,
}

impl Values {
    /// Whether `value` has a place (taking a free one, or one a value unused for `ttl` gives
    /// up, looked for at most once a second).
    fn admit(&mut self, value: &str, now: u64, max: usize, ttl: u64) -> bool {
        if let Some(used) = self.used.get_mut(value) {
            *used = (*used).max(now);
            return true;
        }
        if self.used.len() >= max && self.swept != now {
            self.swept = now;
            self.used.retain(|_, used| now.saturating_sub(*used) < ttl);
        }
        if self.used.len() >= max {
            return false;
        }
        self.used.insert(value.to_owned(), now);
        true
    }
}

/// Counters by policy, then by name: looked up with borrowed strings, so a call allocates
/// nothing for a series that exists.
type ByPolicy = HashMap<String, HashMap<String, Counter, RandomState>, RandomState>;

pub(crate) struct PolicyCounters {
    max_values_per_label: usize,
    /// Seconds a label value or series keeps its place unused while others want it.
    ttl: u64,
    started: std::time::Instant,
    counters: Mutex<ByPolicy>,
    rejected: Mutex<u64>,
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 64
}

impl PolicyCounters {
    pub(crate) fn new(max_values_per_label: usize, ttl: std::time::Duration) -> Self {
        Self {
            max_values_per_label,
            ttl: ttl.as_secs().max(1),
            started: std::time::Instant::now(),
            counters: Mutex::new(ByPolicy::default()),
            rejected: Mutex::new(0),
        }
    }

    /// Adds `value` to a policy's counter. Invalid calls are counted and dropped, never trap.
    pub(crate) fn add(&self, policy: &str, name: &str, labels: Labels, value: f64) {
        self.add_at(
            self.started.elapsed().as_secs(),
            policy,
            name,
            labels,
            value,
        );
    }

    /// [`Self::add`] at `now`, seconds since the counters were made.
    fn add_at(&self, now: u64, policy: &str, name: &str, labels: Labels, value: f64) {
        let valid = is_identifier(name)
            && value.is_finite()
            && value >= 0.0
            && labels.len() <= MAX_LABELS
            && labels
                .iter()
                .all(|(k, _)| is_identifier(k) && k != "policy");
        if !valid {
            *self.rejected.lock() += 1;
            return;
        }
        let mut counters = self.counters.lock();
        if !counters.contains_key(policy) {
            counters.insert(policy.to_owned(), HashMap::default());
        }
        let by_name = counters.get_mut(policy).expect("inserted above");
        if !by_name.contains_key(name) {
            by_name.insert(name.to_owned(), Counter::default());
        }
        let counter = by_name.get_mut(name).expect("inserted above");
        let mut labels: Labels = labels
            .into_iter()
            .map(|(k, mut v)| {
                super::boundary::truncate(&mut v, MAX_LABEL_VALUE);
                if !counter.seen.contains_key(&k) {
                    counter.seen.insert(k.clone(), Values::default());
                }
                let values = counter.seen.get_mut(&k).expect("inserted above");
                if !values.admit(&v, now, self.max_values_per_label, self.ttl) {
                    return (k, OVERFLOW.to_owned());
                }
                (k, v)
            })
            .collect();
        labels.sort();
        labels.dedup_by(|a, b| a.0 == b.0);
        let max_series = self
            .max_values_per_label
            .saturating_mul(SERIES_PER_LABEL_VALUE)
            .max(1);
        if counter.series.len() >= max_series
            && !counter.series.contains_key(&labels)
            && counter.series_swept != now
        {
            counter.series_swept = now;
            let ttl = self.ttl;
            counter.series.retain(|labels, total| {
                now.saturating_sub(total.used) < ttl || labels.iter().all(|(_, v)| v == OVERFLOW)
            });
        }
        if counter.series.len() >= max_series && !counter.series.contains_key(&labels) {
            for (_, v) in &mut labels {
                OVERFLOW.clone_into(v);
            }
        }
        match counter.series.get_mut(&labels) {
            Some(total) => {
                total.value += value;
                total.used = total.used.max(now);
            }
            None => {
                counter.series.insert(labels, Total { value, used: now });
            }
        }
    }

    /// Every series, sorted by counter name, policy and labels, for a scrape; and the count of
    /// refused calls.
    fn sorted(&self) -> (Vec<Series>, u64) {
        let counters = self.counters.lock();
        let mut out: Vec<Series> = Vec::new();
        let mut names: Vec<(&str, &str, &Counter)> = counters
            .iter()
            .flat_map(|(policy, by_name)| {
                by_name
                    .iter()
                    .map(move |(name, c)| (name.as_str(), policy.as_str(), c))
            })
            .collect();
        names.sort_unstable_by_key(|&(name, policy, _)| (name, policy));
        for (name, policy, counter) in names {
            let mut series: Vec<(&Labels, &Total)> = counter.series.iter().collect();
            series.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (labels, total) in series {
                let mut all = Vec::with_capacity(labels.len() + 1);
                all.push(("policy".to_owned(), policy.to_owned()));
                all.extend(labels.iter().cloned());
                out.push((name.to_owned(), all, total.value));
            }
        }
        (out, *self.rejected.lock())
    }
}

impl std::fmt::Debug for PolicyCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyCounters").finish_non_exhaustive()
    }
}

/// Policies' counters are rendered with the host's on each scrape, as
/// `tailgate_policy_<name>_total{policy="…", …}`.
impl Collector for PolicyCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (series, rejected) = self.sorted();
        let mut i = 0;
        while i < series.len() {
            let name = &series[i].0;
            let metric = format!("policy_{name}");
            let mut family = encoder.encode_descriptor(
                &metric,
                "A counter a policy adds to (counter-add)",
                None,
                MetricType::Counter,
            )?;
            while i < series.len() && series[i].0 == *name {
                let (_, labels, value) = &series[i];
                ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
                i += 1;
            }
        }
        let counter = ConstCounter::new(rejected);
        counter.encode(encoder.encode_descriptor(
            "policy_counter_rejected",
            "counter-add calls refused (bad name, label or value)",
            None,
            counter.metric_type(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(counters: PolicyCounters) -> String {
        let registry = crate::telemetry::Registry::new();
        registry.register_collector(Box::new(counters));
        registry.render()
    }

    #[test]
    fn sums_by_label_set_and_folds_overflow() {
        let c = PolicyCounters::new(2, std::time::Duration::from_secs(600));
        for (tenant, v) in [("a", 1.0), ("b", 2.0), ("a", 0.5), ("c", 4.0), ("d", 8.0)] {
            c.add(
                "llm-cost",
                "cost_usd",
                vec![("tenant".into(), tenant.into())],
                v,
            );
        }
        c.add("llm-cost", "bad name", vec![], 1.0);
        c.add("llm-cost", "cost_usd", vec![], f64::NAN);
        let out = render(c);
        assert!(
            out.contains("tailgate_policy_cost_usd_total{policy=\"llm-cost\",tenant=\"a\"} 1.5"),
            "{out}"
        );
        assert!(out.contains("tenant=\"b\"} 2"), "{out}");
        assert!(out.contains("tenant=\"__overflow__\"} 12"), "{out}");
        assert!(
            out.contains("tailgate_policy_counter_rejected_total 2"),
            "{out}"
        );
    }

    #[test]
    fn label_sets_beyond_the_series_cap_fold_into_one_overflow_series_and_keep_totals() {
        // 3 values a label keeps every label under its own cap, but 4 such labels make 81
        // label sets, beyond the counter's cap of 3 × 10 = 30 series.
        let c = PolicyCounters::new(3, std::time::Duration::from_secs(600));
        let mut sent = 0.0;
        for i in 0..81u32 {
            let labels = ["user", "tenant", "feature", "model"]
                .iter()
                .enumerate()
                .map(|(k, key)| {
                    (
                        (*key).to_owned(),
                        format!("v{}", i / 3u32.pow(k as u32) % 3),
                    )
                })
                .collect();
            c.add("llm-cost", "tokens", labels, f64::from(i));
            sent += f64::from(i);
        }
        let out = render(c);
        let series: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("tailgate_policy_tokens_total"))
            .collect();
        assert_eq!(
            series.len(),
            31,
            "30 label sets and the overflow series: {out}"
        );
        let total: f64 = series
            .iter()
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum();
        assert_eq!(total, sent, "every add is counted somewhere: {out}");
        assert!(
            out.contains(
                "feature=\"__overflow__\",model=\"__overflow__\",tenant=\"__overflow__\",user=\"__overflow__\"}"
            ),
            "{out}"
        );
    }

    #[test]
    fn a_flood_of_junk_values_gives_way_to_real_ones_once_it_has_been_quiet_for_the_ttl() {
        let c = PolicyCounters::new(100, std::time::Duration::from_secs(60));
        let add = |now: u64, tenant: &str| {
            c.add_at(
                now,
                "llm-cost",
                "cost_usd",
                vec![("tenant".into(), tenant.into())],
                1.0,
            )
        };
        add(0, "real-early");
        for i in 0..10_000 {
            add(i / 1000, &format!("junk-{i}"));
        }
        // During the flood and until it has been quiet for the ttl, a new tenant folds.
        add(30, "real-late");
        add(40, "real-early");
        // A minute after the flood: the junk gives way, and the active tenant kept its place.
        add(71, "real-late");
        add(71, "real-early");
        let out = render(c);
        let value = |tenant: &str| {
            out.lines()
                .find(|l| l.contains(&format!("tenant=\"{tenant}\"")))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
        };
        assert_eq!(value("real-late"), Some(1.0), "{out}");
        assert_eq!(value("real-early"), Some(3.0), "{out}");
        assert!(value("junk-9999").is_none(), "{out}");
        let overflow = value("__overflow__").unwrap();
        assert!(overflow >= 9_900.0, "{overflow}");
    }
}
