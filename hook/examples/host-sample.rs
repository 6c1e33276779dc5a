//! Prints one host (TSC, TAI) sample, the TSC rate used and the host
//! identity as JSON:
//!
//!     cargo run -p clockcarry --example host-sample [tries]

use std::process::ExitCode;

use clockcarry::host;

fn run() -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let tries = match std::env::args().nth(1) {
        Some(arg) => arg.parse::<u32>()?,
        None => host::DEFAULT_TRIES,
    };
    let tsc = host::host_tsc_khz()?;
    let sample = host::sample(tries, tsc.khz)?;
    let identity = host::identity(tsc.khz)?;
    Ok(serde_json::json!({
        "tries": tries,
        "tsc_khz": tsc,
        "sample": sample,
        "identity": identity,
    }))
}

fn main() -> ExitCode {
    match run().and_then(|v| Ok(serde_json::to_string_pretty(&v)?)) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("host-sample: {e}");
            ExitCode::FAILURE
        }
    }
}
