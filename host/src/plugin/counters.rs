//! Counters that policies add to through `counter-add`, exposed on `/metrics` as
//! `tailgate_policy_<name>_total{policy="…", …}`.
//!
//! Guests choose names and label values, so everything is checked and bounded: names and
//! label keys must look like Prometheus identifiers, and each label key of a counter takes at
//! most `max_values_per_label` distinct values; later values are folded into `__overflow__`,
//! so a policy labelling by user id cannot blow up the host's memory or a scrape.

use std::collections::{HashMap, HashSet};

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
    series: HashMap<Labels, f64, RandomState>,
    seen: HashMap<String, HashSet<String, RandomState>, RandomState>,
}

/// Counters by policy, then by name: looked up with borrowed strings, so a call allocates
/// nothing for a series that exists.
type ByPolicy = HashMap<String, HashMap<String, Counter, RandomState>, RandomState>;

pub(crate) struct PolicyCounters {
    max_values_per_label: usize,
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
    pub(crate) fn new(max_values_per_label: usize) -> Self {
        Self {
            max_values_per_label,
            counters: Mutex::new(ByPolicy::default()),
            rejected: Mutex::new(0),
        }
    }

    /// Adds `value` to a policy's counter. Invalid calls are counted and dropped, never trap.
    pub(crate) fn add(&self, policy: &str, name: &str, labels: Labels, value: f64) {
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
                    counter.seen.insert(k.clone(), HashSet::default());
                }
                let seen = counter.seen.get_mut(&k).expect("inserted above");
                if !seen.contains(&v) {
                    if seen.len() >= self.max_values_per_label {
                        return (k, OVERFLOW.to_owned());
                    }
                    seen.insert(v.clone());
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
        if counter.series.len() >= max_series && !counter.series.contains_key(&labels) {
            for (_, v) in &mut labels {
                OVERFLOW.clone_into(v);
            }
        }
        match counter.series.get_mut(&labels) {
            Some(total) => *total += value,
            None => {
                counter.series.insert(labels, value);
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
            let mut series: Vec<(&Labels, &f64)> = counter.series.iter().collect();
            series.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (labels, value) in series {
                let mut all = Vec::with_capacity(labels.len() + 1);
                all.push(("policy".to_owned(), policy.to_owned()));
                all.extend(labels.iter().cloned());
                out.push((name.to_owned(), all, *value));
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
        let c = PolicyCounters::new(2);
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
        let c = PolicyCounters::new(3);
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
}
