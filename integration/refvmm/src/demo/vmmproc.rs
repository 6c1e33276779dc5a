//! A reference VMM process driven over its API socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::progress;
use crate::http::{self, ClientResponse};

/// How long API calls may take (a restore reads the whole memory file).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A running VMM process.
pub struct VmmProcess {
    pub name: String,
    pub socket: PathBuf,
    child: Child,
}

/// What is wrong with a run (a message for the table's error column).
pub type DemoError = String;

impl VmmProcess {
    /// Starts `program args...` with `--api-socket DIR/NAME.sock` and waits
    /// until it answers vmm.ping.
    pub fn start(
        program: &Path,
        prefix: &[String],
        dir: &Path,
        name: &str,
        args: &[String],
    ) -> Result<VmmProcess, DemoError> {
        let socket = dir.join(format!("{name}.sock"));
        let stderr = std::fs::File::create(dir.join(format!("{name}.stderr")))
            .map_err(|e| format!("{name}: stderr file: {e}"))?;
        let child = Command::new(program)
            .args(prefix)
            .arg("--api-socket")
            .arg(&socket)
            .arg("--name")
            .arg(name)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("{name}: cannot start {}: {e}", program.display()))?;
        progress::add_child(child.id());
        let mut p = VmmProcess {
            name: name.to_string(),
            socket,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(r) = p.call("GET", "vmm.ping", None) {
                if r.status == 200 {
                    return Ok(p);
                }
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                return Err(format!("{name}: VMM exited at start ({status})"));
            }
            if Instant::now() > deadline {
                p.kill();
                return Err(format!("{name}: VMM did not answer within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// One API call; any transport failure is an error.
    pub fn call(
        &self,
        method: &str,
        endpoint: &str,
        body: Option<&str>,
    ) -> Result<ClientResponse, DemoError> {
        http::request(
            &self.socket,
            method,
            &format!("/api/v1/{endpoint}"),
            body,
            CALL_TIMEOUT,
        )
        .map_err(|e| format!("{}: {method} {endpoint}: {e}", self.name))
    }

    /// A call that must succeed with a 2xx status.
    pub fn ok(
        &self,
        method: &str,
        endpoint: &str,
        body: Option<&str>,
    ) -> Result<String, DemoError> {
        let r = self.call(method, endpoint, body)?;
        if (200..300).contains(&r.status) {
            Ok(r.body)
        } else {
            Err(format!(
                "{}: {method} {endpoint}: HTTP {} {}",
                self.name, r.status, r.body
            ))
        }
    }

    /// Waits for the process to exit (after a migration or shutdown).
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                progress::remove_child(self.child.id());
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// vmm.shutdown, then kill if it does not go.
    pub fn shutdown(mut self) {
        let _ = self.call("PUT", "vmm.shutdown", None);
        if !self.wait_exit(Duration::from_secs(5)) {
            self.kill();
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        progress::remove_child(self.child.id());
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}
