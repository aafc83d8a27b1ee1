//! Memory: bytes the buffer really retains per buffered span, against the span's OTLP wire
//! size, measured with a counting allocator (every live allocation at its usable size, so
//! malloc's rounding is included).
//!
//! 2,000 loadgen agent traces (60,000 spans, 10 traces per request) go through the real
//! ingest path into two buffer shards and stay there, undecided. Reported:
//! - retained bytes per span: live heap after ingest minus before, request bodies freed;
//! - wire bytes per span, two ways: the span message alone, and the whole request divided by
//!   its spans (resource and scope headers included);
//! - the ratio, and the index bytes per span beyond the span's own bytes (the target is at
//!   most 1.2× wire size plus 64 bytes of index);
//! - the buffer's own accounting (`buffer_bytes`), which the memory budget enforces, so an
//!   undercount would show here.
//!
//! Not a criterion bench: a size is not a time. Run: `cargo bench -p tailgate --bench memory`.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use tailgate::bench::BufferConfig;
use tailgate::bench::ShardMsg;
use tailgate::bench::{BufferedSpan, Timings, TraceBuffer};

/// Counts live heap bytes at their usable size.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

fn usable(ptr: *mut u8) -> isize {
    // SAFETY: `ptr` was returned by the system allocator and is still live.
    unsafe { libc::malloc_usable_size(ptr.cast()) as isize }
}

// SAFETY: every call is forwarded to `System`; the counter only observes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(usable(p), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(usable(ptr), Ordering::Relaxed);
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let before = usable(ptr);
        // SAFETY: forwarded with the caller's pointer, layout and size.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(usable(p) - before, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const TRACES: usize = 2_000;

fn main() {
    // `cargo bench` passes `--bench` and criterion's options; a filter that names another
    // bench skips this one.
    if std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-') && a.parse::<f64>().is_err())
        .any(|a| !"memory".contains(a.as_str()))
    {
        return;
    }
    let requests = common::requests(TRACES / common::TRACES_PER_REQUEST);
    let request_bytes: usize = requests.iter().map(Vec::len).sum();
    let (ingest, rxs) = common::ingest(2);
    let timings = Timings::from_config(&BufferConfig::default());
    let mut buffers: Vec<TraceBuffer> = (0..2).map(|_| TraceBuffer::new(timings)).collect();

    let before = LIVE.load(Ordering::Relaxed);
    let mut span_bytes = 0usize;
    let mut spans = 0usize;
    for (i, body) in requests.iter().enumerate() {
        ingest.accept_unlogged(body, "bench").expect("accepted");
        for (rx, buffer) in rxs.iter().zip(&mut buffers) {
            while let Ok(ShardMsg::Spans { spans: batch, .. }) = rx.try_recv() {
                for s in batch {
                    span_bytes += s.span.bytes.len();
                    spans += 1;
                    buffer.insert(s.trace_id, s.span, s.cost, i as u64);
                }
            }
        }
    }
    let retained = (LIVE.load(Ordering::Relaxed) - before) as f64;
    let accounted: usize = buffers.iter().map(TraceBuffer::cost).sum();

    let per_span = retained / spans as f64;
    let wire_span = span_bytes as f64 / spans as f64;
    let wire_request = request_bytes as f64 / spans as f64;
    println!("memory: {TRACES} agent traces, {spans} spans buffered in 2 shards");
    println!("  retained per span          {per_span:8.1} B (live heap, malloc usable sizes)");
    println!("  wire size per span         {wire_span:8.1} B (the Span message)");
    println!("  request bytes per span     {wire_request:8.1} B (headers shared)");
    println!("  retained / span wire size  {:8.3}", per_span / wire_span);
    println!(
        "  retained / request share   {:8.3}",
        per_span / wire_request
    );
    println!(
        "  index beyond the span bytes {:7.1} B per span (BufferedSpan is {} B)",
        per_span - wire_span,
        std::mem::size_of::<BufferedSpan>()
    );
    println!(
        "  accounted by the buffer    {:8.1} B per span ({:.3} of retained)",
        accounted as f64 / spans as f64,
        accounted as f64 / retained
    );
    drop(buffers);
}
