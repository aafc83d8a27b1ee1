//! Online quantiles over a sliding window, for policies that learn what is
//! normal from the traffic they see ("slower than this route's p95", "costlier
//! than this agent's p90").
//!
//! [`OnlineQuantile`] keeps the last `window` values twice: in arrival order
//! (a ring buffer, to know which value to evict) and sorted (to answer a
//! quantile by indexing). A quantile is therefore exact over the window and
//! O(1); an observation is a binary search plus one `memmove` between the
//! evicted value's slot and the new value's slot, O(window) in the worst case
//! and short when the distribution is stable. Memory is 16 bytes per value.
//!
//! [`KeyedQuantiles`] keeps one estimator per key (a root span name, say),
//! bounded to `max_keys`; later keys share one overflow estimator, so a key
//! explosion costs accuracy, never memory.
//!
//! State lives in the policy instance. The host runs one instance per worker
//! thread, so each worker learns from the traces it sees (the same
//! distribution, when traces are spread evenly).

use std::collections::BTreeMap;

/// Default window: values kept per estimator (16 KiB each).
pub const DEFAULT_WINDOW: usize = 1024;
/// Default cap on distinct keys, beyond which keys share [`OVERFLOW_KEY`].
pub const DEFAULT_MAX_KEYS: usize = 256;
/// Default number of values a key must have seen before it is judged.
pub const DEFAULT_WARMUP: u64 = 100;
/// The key under which keys beyond `max_keys` are estimated together.
pub const OVERFLOW_KEY: &str = "__overflow__";
/// Largest window: bounds the per-observation `memmove` (512 KiB).
pub const MAX_WINDOW: usize = 65_536;
/// Largest `window * (max_keys + 1)`: 8 MiB of estimators, half the host's
/// default per-instance `memory_limit` (16 MiB, host/src/config.rs), so a
/// policy that reaches its key cap still has room to work.
pub const MAX_VALUES: usize = 1 << 19;

/// Quantiles are taken to 6 decimal places (parts per million), so that a
/// rank like 0.95 * 100 is computed in integers and is exactly 95.
const PPM: u64 = 1_000_000;

fn to_ppm(q: f64) -> u64 {
    (q.clamp(0.0, 1.0) * PPM as f64).round() as u64
}

/// Exact quantiles over the last `window` finite values.
///
/// The q-quantile is the nearest-rank one: the smallest value `v` in the
/// window such that at least `q * len` of the window's values are `<= v`
/// (the minimum for `q = 0`, the maximum for `q = 1`). It is always a value
/// that was observed.
#[derive(Clone, Debug)]
pub struct OnlineQuantile {
    window: usize,
    /// Values in arrival order; once full, `next` is the oldest.
    ring: Vec<f64>,
    next: usize,
    /// The same values, ascending by `f64::total_cmp`.
    sorted: Vec<f64>,
    /// Values observed since creation (not capped by the window).
    seen: u64,
}

impl OnlineQuantile {
    /// An empty estimator over the last `window` values (0 counts as 1).
    /// Allocates both buffers up front, so memory use does not change later.
    pub fn new(window: usize) -> Self {
        let window = window.max(1);
        OnlineQuantile {
            window,
            ring: Vec::with_capacity(window),
            next: 0,
            sorted: Vec::with_capacity(window),
            seen: 0,
        }
    }

    /// Add `x` to the window, evicting the oldest value when it is full.
    /// NaN and infinities are ignored; returns whether `x` was added.
    pub fn observe(&mut self, x: f64) -> bool {
        if !x.is_finite() {
            return false;
        }
        self.seen += 1;
        // Upper bound: equal values keep arrival order among themselves,
        // which does not matter but keeps the insert point well defined.
        let ins = self.sorted.partition_point(|v| v.total_cmp(&x).is_le());
        if self.ring.len() < self.window {
            self.ring.push(x);
            self.sorted.insert(ins, x);
            return true;
        }
        let old = std::mem::replace(&mut self.ring[self.next], x);
        self.next = (self.next + 1) % self.window;
        // Every value in `ring` is in `sorted` with the same bits, so the
        // lower bound of `old` is a slot holding `old`.
        let rem = self.sorted.partition_point(|v| v.total_cmp(&old).is_lt());
        // Remove and insert as one shift of the values between the two slots.
        if ins > rem {
            self.sorted.copy_within(rem + 1..ins, rem);
            self.sorted[ins - 1] = x;
        } else {
            self.sorted.copy_within(ins..rem, ins + 1);
            self.sorted[ins] = x;
        }
        true
    }

    /// The nearest-rank `q`-quantile of the window (`q` clamped to [0, 1],
    /// to 6 decimal places); `None` while the window is empty or `q` is NaN.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if q.is_nan() {
            return None;
        }
        self.quantile_ppm(to_ppm(q))
    }

    fn quantile_ppm(&self, q_ppm: u64) -> Option<f64> {
        let n = self.sorted.len() as u64;
        if n == 0 {
            return None;
        }
        // rank = ceil(q * n), at least 1; n <= MAX_WINDOW keeps this in u64.
        let rank = (q_ppm * n).div_ceil(PPM).max(1);
        Some(self.sorted[(rank - 1) as usize])
    }

    /// Values currently in the window.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// The window size this estimator was created with.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Values observed since creation, including those evicted since.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// The window's values, ascending.
    pub fn sorted(&self) -> &[f64] {
        &self.sorted
    }
}

/// Settings of a [`KeyedQuantiles`]. The field names are the config keys the
/// bundled policies use, and [`QuantileSettings::validate`] names them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantileSettings {
    /// The quantile a value is judged against, in (0, 1].
    pub percentile: f64,
    /// Values kept per key, 1..=[`MAX_WINDOW`].
    pub window: usize,
    /// Values a key must have seen before its values are judged.
    pub warmup: u64,
    /// Distinct keys with their own estimator; 0 judges everything against
    /// one shared estimator.
    pub max_keys: usize,
}

impl QuantileSettings {
    /// `percentile` with the crate defaults for everything else.
    pub fn new(percentile: f64) -> Self {
        QuantileSettings {
            percentile,
            window: DEFAULT_WINDOW,
            warmup: DEFAULT_WARMUP,
            max_keys: DEFAULT_MAX_KEYS,
        }
    }

    /// Check the settings; the error names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.percentile > 0.0 && self.percentile <= 1.0) {
            return Err(format!(
                "percentile must be in (0, 1], got {}",
                self.percentile
            ));
        }
        if self.window == 0 || self.window > MAX_WINDOW {
            return Err(format!(
                "window must be between 1 and {MAX_WINDOW}, got {}",
                self.window
            ));
        }
        let values = (self.max_keys as u128 + 1) * self.window as u128;
        if values > MAX_VALUES as u128 {
            return Err(format!(
                "window * (max_keys + 1) must be at most {MAX_VALUES} (16 bytes each, \
                 within the policy's memory), got window = {} and max_keys = {}",
                self.window, self.max_keys
            ));
        }
        Ok(())
    }
}

/// The outcome of [`KeyedQuantiles::check_and_observe`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Judgement {
    /// The value was NaN or infinite: neither judged nor observed.
    Ignored,
    /// The key has seen fewer than `warmup` values (or none at all): there is
    /// no trustworthy threshold yet.
    WarmingUp,
    /// `threshold` is the key's quantile before the value was added; `above`
    /// is `value > threshold`.
    Judged { threshold: f64, above: bool },
}

impl Judgement {
    /// True only for a judged value above its threshold.
    pub fn is_above(&self) -> bool {
        matches!(self, Judgement::Judged { above: true, .. })
    }
}

/// One [`OnlineQuantile`] per key, at most `max_keys` of them; keys first
/// seen after the cap is reached share the estimator of [`OVERFLOW_KEY`].
/// Keys are never forgotten while the instance lives.
#[derive(Clone, Debug)]
pub struct KeyedQuantiles {
    settings: QuantileSettings,
    q_ppm: u64,
    keys: BTreeMap<String, OnlineQuantile>,
    overflow: Option<OnlineQuantile>,
}

impl KeyedQuantiles {
    /// Validate `settings` (see [`QuantileSettings::validate`]) and start
    /// with no keys.
    pub fn new(settings: QuantileSettings) -> Result<Self, String> {
        settings.validate()?;
        Ok(KeyedQuantiles {
            settings,
            q_ppm: to_ppm(settings.percentile),
            keys: BTreeMap::new(),
            overflow: None,
        })
    }

    pub fn settings(&self) -> &QuantileSettings {
        &self.settings
    }

    /// Judge `x` against `key`'s window as it was, then add `x` to it. The
    /// first value of a new key allocates its estimator (and the key).
    pub fn check_and_observe(&mut self, key: &str, x: f64) -> Judgement {
        if !x.is_finite() {
            return Judgement::Ignored;
        }
        let (q_ppm, warmup) = (self.q_ppm, self.settings.warmup);
        let est = self.estimator_mut(key);
        let judgement = match est.quantile_ppm(q_ppm) {
            Some(threshold) if est.seen() >= warmup => Judgement::Judged {
                threshold,
                above: x > threshold,
            },
            _ => Judgement::WarmingUp,
        };
        est.observe(x);
        judgement
    }

    fn estimator_mut(&mut self, key: &str) -> &mut OnlineQuantile {
        let window = self.settings.window;
        // Two lookups for a known key, none allocating: cheaper on the hot
        // path than `entry`, which needs an owned key every time.
        if key != OVERFLOW_KEY
            && self.keys.len() < self.settings.max_keys
            && !self.keys.contains_key(key)
        {
            self.keys
                .insert(key.to_owned(), OnlineQuantile::new(window));
        }
        match self.keys.get_mut(key) {
            Some(est) => est,
            None => self
                .overflow
                .get_or_insert_with(|| OnlineQuantile::new(window)),
        }
    }

    /// The estimator `key` is judged by: its own, or the overflow one for a
    /// key that arrived after the cap (`None` if `key` was never observed and
    /// nothing has overflowed). [`OVERFLOW_KEY`] names the overflow one.
    pub fn get(&self, key: &str) -> Option<&OnlineQuantile> {
        self.keys.get(key).or(self.overflow.as_ref())
    }

    /// Keys with their own estimator (at most `max_keys`).
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Whether some key has been folded into the overflow estimator.
    pub fn has_overflowed(&self) -> bool {
        self.overflow.is_some()
    }
}

/// A percentile as a short label: 0.95 -> `"p95"`, 0.999 -> `"p99.9"`,
/// 1.0 -> `"p100"` (up to 4 decimal places of the percent). Policies build
/// their low-cardinality reasons from it.
pub fn percentile_label(q: f64) -> String {
    let pct = format!("{:.4}", q * 100.0);
    let pct = pct.trim_end_matches('0').trim_end_matches('.');
    format!("p{pct}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nearest-rank quantile by sorting, as the reference.
    fn reference(values: &[f64], q: f64) -> f64 {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let rank = ((q * v.len() as f64) - 1e-9).ceil().max(1.0) as usize;
        v[rank - 1]
    }

    /// A fixed pseudo-random sequence (this test cannot flake).
    fn lcg(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s >> 33
        }
    }

    #[test]
    fn quantiles_are_exact_nearest_rank_over_known_data() {
        let mut e = OnlineQuantile::new(1000);
        assert_eq!(e.quantile(0.5), None);
        // 1..=100 in a scrambled order.
        for i in 0..100u64 {
            e.observe(((i * 37) % 100 + 1) as f64);
        }
        assert_eq!(e.len(), 100);
        assert_eq!(e.quantile(0.0), Some(1.0));
        assert_eq!(e.quantile(0.01), Some(1.0));
        assert_eq!(e.quantile(0.5), Some(50.0));
        assert_eq!(e.quantile(0.9), Some(90.0));
        assert_eq!(e.quantile(0.95), Some(95.0));
        assert_eq!(e.quantile(0.951), Some(96.0));
        assert_eq!(e.quantile(0.99), Some(99.0));
        assert_eq!(e.quantile(1.0), Some(100.0));
        assert_eq!(e.quantile(f64::NAN), None);
        assert_eq!(e.sorted(), (1..=100).map(f64::from).collect::<Vec<_>>());
    }

    #[test]
    fn matches_a_sorted_reference_through_many_evictions() {
        let mut next = lcg(7);
        let window = 64;
        let mut e = OnlineQuantile::new(window);
        let mut all = Vec::new();
        for _ in 0..5_000 {
            // Few distinct values, so ties and duplicate evictions are common.
            let x = (next() % 50) as f64 - 10.0;
            e.observe(x);
            all.push(x);
            let recent = &all[all.len().saturating_sub(window)..];
            assert!(e.sorted().windows(2).all(|w| w[0] <= w[1]));
            for q in [0.0, 0.1, 0.5, 0.9, 0.95, 0.99, 1.0] {
                assert_eq!(e.quantile(q), Some(reference(recent, q)), "q={q}");
            }
        }
        assert_eq!(e.seen(), 5_000);
        assert_eq!(e.len(), window);
    }

    #[test]
    fn non_finite_values_are_ignored() {
        let mut e = OnlineQuantile::new(4);
        assert!(!e.observe(f64::NAN));
        assert!(!e.observe(f64::INFINITY));
        assert!(!e.observe(f64::NEG_INFINITY));
        assert!(e.observe(-0.0));
        assert!(e.observe(0.0));
        assert_eq!((e.len(), e.seen()), (2, 2));
        assert_eq!(e.quantile(1.0), Some(0.0));
    }

    #[test]
    fn the_window_forgets_old_values_and_adapts_to_a_shift() {
        let mut e = OnlineQuantile::new(100);
        for i in 0..100 {
            e.observe(f64::from(i % 10)); // 0..10
        }
        assert_eq!(e.quantile(0.9), Some(8.0));
        for i in 0..99 {
            e.observe(1000.0 + f64::from(i % 10)); // 1000..1010
        }
        // One old value left: the minimum, nothing else.
        assert_eq!(e.quantile(0.0), Some(9.0));
        assert_eq!(e.quantile(0.02), Some(1000.0));
        e.observe(1005.0);
        assert_eq!(e.quantile(0.0), Some(1000.0));
        assert_eq!(e.quantile(0.9), Some(1008.0));
        assert_eq!(e.window(), 100);
    }

    fn settings(percentile: f64, window: usize, warmup: u64, max_keys: usize) -> QuantileSettings {
        QuantileSettings {
            percentile,
            window,
            warmup,
            max_keys,
        }
    }

    #[test]
    fn warm_up_then_judges_against_the_window_before_the_value() {
        let mut k = KeyedQuantiles::new(settings(0.9, 100, 10, 8)).unwrap();
        for i in 1..=10 {
            assert_eq!(
                k.check_and_observe("GET /", f64::from(i)),
                Judgement::WarmingUp
            );
        }
        // Window 1..=10: p90 = 9.
        assert_eq!(
            k.check_and_observe("GET /", 9.0),
            Judgement::Judged {
                threshold: 9.0,
                above: false
            }
        );
        // Window 1..=10 + 9: p90 of 11 values is rank 10 -> 9 again.
        let j = k.check_and_observe("GET /", 9.5);
        assert_eq!(
            j,
            Judgement::Judged {
                threshold: 9.0,
                above: true
            }
        );
        assert!(j.is_above());
        // Another key warms up on its own.
        assert_eq!(k.check_and_observe("POST /", 1e9), Judgement::WarmingUp);
        assert_eq!(k.key_count(), 2);
        assert_eq!(k.get("GET /").unwrap().seen(), 12);
    }

    #[test]
    fn zero_warmup_judges_from_the_second_value() {
        let mut k = KeyedQuantiles::new(settings(0.5, 10, 0, 8)).unwrap();
        assert_eq!(k.check_and_observe("a", 1.0), Judgement::WarmingUp);
        assert!(k.check_and_observe("a", 2.0).is_above());
    }

    #[test]
    fn non_finite_values_are_never_above_nor_observed() {
        let mut k = KeyedQuantiles::new(settings(0.5, 10, 0, 8)).unwrap();
        k.check_and_observe("a", 1.0);
        assert_eq!(k.check_and_observe("a", f64::NAN), Judgement::Ignored);
        assert_eq!(k.check_and_observe("a", f64::INFINITY), Judgement::Ignored);
        assert!(!Judgement::Ignored.is_above());
        assert_eq!(k.get("a").unwrap().seen(), 1);
        assert_eq!(k.check_and_observe("new", f64::NAN), Judgement::Ignored);
        assert!(k.get("new").is_none(), "a NaN must not allocate a key");
    }

    #[test]
    fn keys_beyond_the_cap_share_the_overflow_estimator() {
        let mut k = KeyedQuantiles::new(settings(0.5, 100, 3, 2)).unwrap();
        k.check_and_observe("a", 1.0);
        k.check_and_observe("b", 1.0);
        assert!(!k.has_overflowed());
        // "c" and "d" pool their values: 3 between them end the warm-up.
        assert_eq!(k.check_and_observe("c", 10.0), Judgement::WarmingUp);
        assert_eq!(k.check_and_observe("d", 10.0), Judgement::WarmingUp);
        assert_eq!(k.check_and_observe("c", 10.0), Judgement::WarmingUp);
        assert_eq!(
            k.check_and_observe("d", 11.0),
            Judgement::Judged {
                threshold: 10.0,
                above: true
            }
        );
        assert_eq!(k.key_count(), 2);
        assert!(k.has_overflowed());
        assert_eq!(k.get(OVERFLOW_KEY).unwrap().seen(), 4);
        assert_eq!(k.get("c").unwrap().seen(), 4);
        // Known keys keep their own estimator.
        assert_eq!(k.get("a").unwrap().seen(), 1);
        // A key literally named like the overflow one is the overflow one.
        k.check_and_observe(OVERFLOW_KEY, 10.0);
        assert_eq!(k.get("d").unwrap().seen(), 5);
    }

    #[test]
    fn max_keys_zero_is_one_shared_estimator() {
        let mut k = KeyedQuantiles::new(settings(0.5, 100, 0, 0)).unwrap();
        k.check_and_observe("a", 1.0);
        k.check_and_observe("b", 2.0);
        assert_eq!(k.key_count(), 0);
        assert_eq!(k.get("anything").unwrap().len(), 2);
    }

    #[test]
    fn a_shifted_distribution_stops_being_above_once_the_window_turns_over() {
        let mut k = KeyedQuantiles::new(settings(0.95, 200, 100, 4)).unwrap();
        let mut next = lcg(42);
        for _ in 0..300 {
            k.check_and_observe("r", (next() % 100) as f64); // 0..100
        }
        let before = k.get("r").unwrap().quantile(0.95).unwrap();
        assert!((90.0..100.0).contains(&before), "{before}");
        // A sudden regression to 500..600 is above p95 at first…
        assert!(k.check_and_observe("r", 550.0).is_above());
        for _ in 0..200 {
            k.check_and_observe("r", 500.0 + (next() % 100) as f64);
        }
        // …then the window holds only the new regime: its p95 is the bar,
        // and about 5% of it is above.
        let after = k.get("r").unwrap().quantile(0.95).unwrap();
        assert!((590.0..600.0).contains(&after), "{after}");
        assert!(!k.check_and_observe("r", 560.0).is_above());
        let mut late = 0;
        for _ in 0..2_000 {
            late += k
                .check_and_observe("r", 500.0 + (next() % 100) as f64)
                .is_above() as u32;
        }
        assert!((40..=160).contains(&late), "{late} of 2000 above p95");
    }

    #[test]
    fn settings_are_validated_naming_the_key() {
        let ok = QuantileSettings::new(0.95);
        assert_eq!(
            (ok.window, ok.warmup, ok.max_keys),
            (DEFAULT_WINDOW, DEFAULT_WARMUP, DEFAULT_MAX_KEYS)
        );
        assert!(ok.validate().is_ok());
        for (bad, key) in [
            (settings(0.0, 10, 0, 1), "percentile"),
            (settings(1.5, 10, 0, 1), "percentile"),
            (settings(f64::NAN, 10, 0, 1), "percentile"),
            (settings(0.5, 0, 0, 1), "window"),
            (settings(0.5, MAX_WINDOW + 1, 0, 1), "window"),
            (settings(0.5, 4096, 0, 256), "max_keys"),
            (settings(0.5, 1, 0, usize::MAX), "max_keys"),
        ] {
            let err = KeyedQuantiles::new(bad).err().unwrap();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn percentile_labels() {
        assert_eq!(percentile_label(0.95), "p95");
        assert_eq!(percentile_label(0.9), "p90");
        assert_eq!(percentile_label(0.99), "p99");
        assert_eq!(percentile_label(0.999), "p99.9");
        assert_eq!(percentile_label(0.5), "p50");
        assert_eq!(percentile_label(1.0), "p100");
        assert_eq!(percentile_label(0.9995), "p99.95");
    }
}
