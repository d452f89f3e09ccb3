//! `shop`: a fetter application with the example flows (see `fetter_examples::shop`).

fn main() -> std::process::ExitCode {
    fetter_examples::shop::main()
}
