//! `--boot-refvmm BIN`: the suite prepares its own VM with the reference
//! VMM. One process boots the embedded probe guest, runs it ~100 ms,
//! pauses and snapshots it; a second process restores it paused
//! (`vm.restore` with `resume: false`), the state in which PUT vm.clock is
//! allowed. Both processes are this program's children, stopped by their
//! own handles (`vmm.shutdown`, then a kill of that child only).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::http::{self, clip_text};

/// How long the probe guest runs before the pause, ms.
pub const RUN_BEFORE_SNAPSHOT_MS: u64 = 100;
/// How long a started VMM has to answer vmm.ping.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long vmm.shutdown may take before the child is killed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Budget of one setup call (a restore reads the whole memory file).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// One VMM process started by the suite.
struct Vmm {
    name: String,
    socket: PathBuf,
    stderr_path: PathBuf,
    child: Child,
}

impl Vmm {
    fn start(bin: &Path, dir: &Path, name: &str, args: &[&str]) -> Result<Vmm, String> {
        let socket = dir.join(format!("{name}.sock"));
        let stderr_path = dir.join(format!("{name}.stderr"));
        let stderr = std::fs::File::create(&stderr_path)
            .map_err(|e| format!("{}: {e}", stderr_path.display()))?;
        let child = Command::new(bin)
            .arg("--api-socket")
            .arg(&socket)
            .arg("--name")
            .arg(name)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut vmm = Vmm {
            name: name.to_string(),
            socket,
            stderr_path,
            child,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(a) = http::request(
                &vmm.socket,
                "GET",
                "/api/v1/vmm.ping",
                None,
                Duration::from_secs(2),
            ) {
                if a.status == 200 {
                    return Ok(vmm);
                }
            }
            if let Ok(Some(status)) = vmm.child.try_wait() {
                return Err(format!(
                    "{name}: the VMM exited at start ({status}){}",
                    vmm.stderr_tail()
                ));
            }
            if Instant::now() > deadline {
                let tail = vmm.stderr_tail();
                vmm.kill();
                return Err(format!(
                    "{name}: the VMM did not answer vmm.ping within {} s{tail}",
                    START_TIMEOUT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `PUT endpoint` that must answer 2xx.
    fn put(&self, endpoint: &str, body: Option<&str>) -> Result<(), String> {
        let a = http::request(
            &self.socket,
            "PUT",
            &format!("/api/v1/{endpoint}"),
            body.map(str::as_bytes),
            CALL_TIMEOUT,
        )
        .map_err(|e| format!("{}: {e}", self.name))?;
        if (200..300).contains(&a.status) {
            Ok(())
        } else {
            Err(format!(
                "{}: PUT {endpoint}: HTTP {}: {}{}",
                self.name,
                a.status,
                a.body_text(),
                self.stderr_tail()
            ))
        }
    }

    /// The last line of the VMM's stderr, for an error message.
    fn stderr_tail(&self) -> String {
        std::fs::read_to_string(&self.stderr_path)
            .ok()
            .and_then(|s| s.lines().last().map(clip_text))
            .map(|l| format!("; its stderr ends: {l}"))
            .unwrap_or_default()
    }

    fn shutdown(&mut self) {
        let _ = http::request(
            &self.socket,
            "PUT",
            "/api/v1/vmm.shutdown",
            None,
            Duration::from_secs(2),
        );
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.shutdown();
        }
    }
}

/// A restored, paused VM in a reference VMM process; stopped and its
/// directory removed when dropped.
pub struct Restored {
    dir: PathBuf,
    vmm: Option<Vmm>,
    pub socket: PathBuf,
    pub cpus: u32,
    /// Boot, run, snapshot and restore, ms.
    pub setup_ms: u64,
}

impl Drop for Restored {
    fn drop(&mut self) {
        if let Some(mut v) = self.vmm.take() {
            v.shutdown();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Boots the probe in `bin` with `cpus` vCPUs, snapshots it and restores it
/// paused in a second process.
pub fn restored_refvmm(bin: &Path, cpus: u32) -> Result<Restored, String> {
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("clockcarry-conformance-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // From here on the directory goes with `restored` (or with this guard).
    let mut restored = Restored {
        dir: dir.clone(),
        vmm: None,
        socket: PathBuf::new(),
        cpus,
        setup_ms: 0,
    };
    let cpus_text = cpus.to_string();
    let mut src = Vmm::start(
        bin,
        &dir,
        "source",
        &["--kernel", "probe", "--cpus", &cpus_text],
    )?;
    std::thread::sleep(Duration::from_millis(RUN_BEFORE_SNAPSHOT_MS));
    src.put("vm.pause", None)?;
    let snap = dir.join("snapshot");
    let url = format!("file://{}", snap.display());
    src.put(
        "vm.snapshot",
        Some(&json!({ "destination_url": url }).to_string()),
    )?;
    src.shutdown();
    let dst = Vmm::start(bin, &dir, "restored", &[])?;
    dst.put(
        "vm.restore",
        Some(&json!({ "source_url": url, "resume": false }).to_string()),
    )?;
    restored.socket = dst.socket.clone();
    restored.vmm = Some(dst);
    restored.setup_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(restored)
}
