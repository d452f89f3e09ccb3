//! The `shop` program, built inside this package so its tests can start real node processes
//! (`CARGO_BIN_EXE_shop-node`): the same code as `examples`' `shop` binary.

// A node allocates many small, short-lived buffers (sled nodes, codec records, tonic frames);
// glibc's malloc spent ~20 % of a node's CPU on them under the cluster bench.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    fetter_examples::shop::main()
}
