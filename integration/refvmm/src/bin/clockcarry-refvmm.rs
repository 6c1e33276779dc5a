//! The reference VMM. `clockcarry-refvmm --help` for the options.

fn main() {
    let code = clockcarry_refvmm::cli::main_with(std::env::args().skip(1).collect());
    std::process::exit(code);
}
