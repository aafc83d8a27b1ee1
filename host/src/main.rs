//! The `tailgate` binary; everything it does is in the library's [`tailgate::cli`].

/// mimalloc rather than glibc's malloc. A span lives as a few small allocations (its bytes, its
/// place in a shard's message, in its trace's vector and in an export batch) made on a receiver
/// thread and freed on a worker or the exporter's, so most frees cross threads; in profiles at
/// 50,000 spans/s glibc's allocator (`_int_malloc`, `malloc_consolidate`, `free`) took about a
/// tenth of the collector's CPU. The load harness's CPU per span with and without it is in
/// benches/results/structure-before-after.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tailgate::cli::main()
}
