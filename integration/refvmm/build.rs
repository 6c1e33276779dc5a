//! Assembles the probe guest (integration/probe/probe.s) into a PVH ELF with
//! GNU binutils: `as --64` (the code itself is `.code32`) and `ld -m
//! elf_x86_64` with integration/probe/probe.ld. The result is embedded in
//! the crate (`OUT_DIR/probe.elf`).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command, what: &str) {
    let status = match cmd.status() {
        Ok(s) => s,
        Err(e) => panic!(
            "cannot run {what} ({e}): the probe guest is built with GNU binutils \
             (`apt-get install binutils`)"
        ),
    };
    assert!(status.success(), "{what} failed with {status}");
}

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let probe_dir = manifest.join("../probe");
    let source = probe_dir.join("probe.s");
    let script = probe_dir.join("probe.ld");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let object = out.join("probe.o");
    let elf = out.join("probe.elf");
    println!("cargo:rerun-if-changed={}", source.display());
    println!("cargo:rerun-if-changed={}", script.display());

    run(
        Command::new("as")
            .arg("--64")
            .arg("-o")
            .arg(&object)
            .arg(&source),
        "as",
    );
    run(
        Command::new("ld")
            .args([
                "-m",
                "elf_x86_64",
                "--build-id=none",
                "-nostdlib",
                "-static",
            ])
            .args([
                "-z",
                "noexecstack",
                "-z",
                "max-page-size=0x1000",
                "--no-warn-rwx-segments",
            ])
            .arg("-T")
            .arg(&script)
            .arg("-o")
            .arg(&elf)
            .arg(&object),
        "ld",
    );
    assert!(Path::new(&elf).exists(), "ld produced no {}", elf.display());
}
