//! Summary-only policies: what they are given, and that the SDK holds them to it natively as
//! the host does in Wasm.

use tailgate_plugin_sdk::testing::{self, TraceBuilder};
use tailgate_plugin_sdk::{
    FACT_WORDS, NoConfig, Policy, Summary, Trace, TraceStream, Verdict, facts_from_words,
    facts_to_words,
};

#[test]
fn facts_cross_as_words_and_back_unchanged() {
    let cases = [
        (
            Summary {
                span_count: 30,
                error_count: 2,
                duration_ns: 1_234_567_890_123,
                root: Some(0),
                service_count: 3,
                orphan_count: 1,
            },
            [0xab; 16],
            0x00ff_ffff_ffff_ffff,
        ),
        (
            Summary {
                span_count: u32::MAX - 1,
                error_count: u32::MAX,
                duration_ns: u64::MAX,
                root: None,
                service_count: 0,
                orphan_count: u32::MAX,
            },
            *b"0123456789abcdef",
            0,
        ),
    ];
    let mut words = Vec::new();
    for (s, id, r) in &cases {
        facts_to_words(s, id, *r, &mut words);
    }
    assert_eq!(words.len(), 2 * FACT_WORDS);
    for ((s, id, r), f) in cases.iter().zip(words.chunks_exact(FACT_WORDS)) {
        assert_eq!(facts_from_words(f), (*s, *id, *r));
    }
}

#[test]
fn randomness_is_the_roots_explicit_rv_else_the_trace_ids() {
    let mut id = [0x11; 16];
    id[9..].copy_from_slice(&[0, 0, 0, 0, 0, 0, 7]);
    let plain = TraceBuilder::new().trace_id(id).span("root").build();
    assert_eq!(plain.randomness(), 7);
    let explicit = TraceBuilder::new()
        .trace_id(id)
        .span("root")
        .trace_state("vendor=x,ot=th:8;rv:0123456789abcd")
        .build();
    assert_eq!(explicit.randomness(), 0x0001_2345_6789_abcd);
    // Not 14 hex digits: ignored.
    let bad = TraceBuilder::new()
        .trace_id(id)
        .span("root")
        .trace_state("ot=rv:123")
        .build();
    assert_eq!(bad.randomness(), 7);
}

/// Declares itself summary-only, then reads a span name.
struct Liar;

impl Policy for Liar {
    type Config = NoConfig;
    const SUMMARY_ONLY: bool = true;

    fn init(_: NoConfig) -> Result<Self, String> {
        Ok(Liar)
    }

    fn decide(&mut self, t: &Trace) -> Verdict {
        if t.root().is_some_and(|r| r.name() == "x") {
            Verdict::keep("x")
        } else {
            Verdict::abstain()
        }
    }
}

#[test]
#[should_panic(expected = "a SUMMARY_ONLY policy read span data")]
fn a_summary_only_policy_reading_span_data_fails_its_native_test() {
    let t = TraceBuilder::new().span("x").build();
    testing::decide(&mut testing::init::<Liar>("{}").unwrap(), &t);
}

/// Summary-only, with a random draw per trace.
struct Dice;

impl Policy for Dice {
    type Config = NoConfig;
    const SUMMARY_ONLY: bool = true;

    fn init(_: NoConfig) -> Result<Self, String> {
        Ok(Dice)
    }

    fn decide(&mut self, t: &Trace) -> Verdict {
        // Two draws: the first seeds the trace's stream, the second continues it.
        let draw = tailgate_plugin_sdk::random_u64() ^ tailgate_plugin_sdk::random_u64();
        if t.span_count() > 1 && draw.is_multiple_of(2) {
            Verdict::keep("even")
        } else {
            Verdict::abstain()
        }
    }
}

#[test]
fn a_summary_only_policy_reads_the_summary_and_draws_the_hosts_stream() {
    testing::set_seed(42);
    let mut dice = testing::init::<Dice>("{}").unwrap();
    for n in 0..64u8 {
        let id = [n; 16];
        let t = TraceBuilder::new()
            .trace_id(id)
            .span("root")
            .span("child")
            .child_of(0)
            .build();
        let v = testing::decide(&mut dice, &t);
        // The trace's first two numbers, as the host (and the SDK in a
        // `decide-summaries` batch) computes them.
        let mut stream = TraceStream::new(42, &id);
        let draw = stream.next_u64() ^ stream.next_u64();
        assert_eq!(v.is_keep(), draw.is_multiple_of(2), "trace {n}");
    }
}

#[test]
fn a_reused_facts_trace_reads_each_traces_own_facts() {
    let summary = |errors| Summary {
        span_count: 4,
        error_count: errors,
        ..Summary::default()
    };
    let mut t = testing::facts_trace(summary(1), [1; 16], 7);
    assert_eq!(
        (t.error_count(), t.trace_id(), t.randomness()),
        (1, [1; 16], 7)
    );
    testing::set_facts(&mut t, summary(0), [2; 16], 9);
    assert_eq!(
        (t.error_count(), t.trace_id(), t.randomness()),
        (0, [2; 16], 9)
    );
}

#[test]
#[should_panic(expected = "set_facts takes a facts_trace")]
fn set_facts_refuses_a_trace_with_span_data() {
    let mut t = TraceBuilder::new().span("root").build();
    testing::set_facts(&mut t, Summary::default(), [0; 16], 0);
}
