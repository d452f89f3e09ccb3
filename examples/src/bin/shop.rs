//! `shop`: a fetter application with the example flows (see `fetter_examples::shop`).

// A node allocates many small, short-lived buffers (sled nodes, codec records, tonic frames);
// glibc's malloc spent ~20 % of a node's CPU on them under the cluster bench.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    fetter_examples::shop::main()
}
