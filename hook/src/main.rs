//! The `clockcarry` command.

use clap::Parser;

/// Keep a KVM guest's clock continuous across pause/resume, live update,
/// live migration and snapshot/restore.
#[derive(Parser, Debug)]
#[command(name = "clockcarry", version, about, long_about = None)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
