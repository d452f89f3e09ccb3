//! The `shop` program, built inside this package so its tests can start real node processes
//! (`CARGO_BIN_EXE_shop-node`): the same code as `examples`' `shop` binary.

fn main() -> std::process::ExitCode {
    fetter_examples::shop::main()
}
