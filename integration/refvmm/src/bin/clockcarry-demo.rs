//! The side-by-side demo (the README's main command):
//! `cargo run --release --bin clockcarry-demo` (as root). `--help` for options.

fn main() {
    let code = clockcarry_refvmm::demo::table::main_with(std::env::args().skip(1).collect());
    std::process::exit(code);
}
