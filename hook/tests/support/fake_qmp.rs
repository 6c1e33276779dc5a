//! A scripted QMP server on a Unix socket, standing for QEMU in the QMP
//! client's tests (hook/tests/qmp_client.rs) and the CLI's
//! (hook/cli/tests/cli_qmp.rs). It plays its [`Step`]s in order on one
//! connection and hands back every request it read, so a test can check
//! what the client sent as well as what it made of the answers.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

/// Builds the bytes answering one request.
pub type Answer = Box<dyn FnOnce(&Value) -> Vec<u8> + Send>;

/// One move of the fake.
pub enum Step {
    /// Writes these bytes as they are.
    Raw(Vec<u8>),
    /// Writes the message, then "\r\n".
    Send(Value),
    /// Reads one request, checks that it executes `command`, and answers
    /// `{"return": value, "id": its id}`.
    Reply(&'static str, Value),
    /// Reads one request for `command` and answers an error of `class`.
    Error(&'static str, &'static str, &'static str),
    /// Reads one request for `command` and writes what `f(id)` gives.
    Custom(&'static str, Answer),
    /// Reads one request for `command` and writes nothing.
    Swallow(&'static str),
    Sleep(Duration),
    /// Closes the connection.
    Close,
}

/// The greeting of Debian's QEMU 7.2.
pub fn greeting() -> Value {
    json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                               "package": "Debian 1:7.2+dfsg-7+deb12u18"},
                   "capabilities": ["oob"]}})
}

/// `query-commands`' answer listing `names` plus a few stock commands.
pub fn commands(names: &[&str]) -> Value {
    let mut all = vec![
        "qmp_capabilities",
        "query-commands",
        "stop",
        "cont",
        "query-status",
    ];
    all.extend_from_slice(names);
    Value::Array(all.into_iter().map(|n| json!({ "name": n })).collect())
}

/// The greeting, the capabilities negotiation and `query-commands` with
/// the series' two commands: what a patched QEMU says first.
pub fn patched_start() -> Vec<Step> {
    vec![
        Step::Send(greeting()),
        Step::Reply("qmp_capabilities", json!({})),
        Step::Reply(
            "query-commands",
            commands(&["x-query-guest-clock", "x-set-guest-clock"]),
        ),
    ]
}

/// [`patched_start`], then `more`.
pub fn patched_then(more: Vec<Step>) -> Vec<Step> {
    let mut steps = patched_start();
    steps.extend(more);
    steps
}

/// A paused two-vCPU VM as `x-query-guest-clock` gives it.
pub fn guest_clock(settable: bool) -> Value {
    json!({
        "state": "paused", "tsc-khz": 2_000_000,
        "vcpus": [{"id": 0, "tsc-offset": -123_456_789}, {"id": 1, "tsc-offset": -123_456_789}],
        "kvmclock": {"clock": 5_000_000_000_u64, "flags": 14,
                     "realtime": 1_796_306_631_041_630_185_u64, "host-tsc": 138_242_420_139_004_u64},
        "pvti": {"tsc-timestamp": 138_241_147_376_000_u64, "system-time": 4_363_000_000_u64,
                 "tsc-to-system-mul": 2_147_483_648_u32, "tsc-shift": 0, "flags": 1},
        "pvti-source": "guest-memory",
        "capabilities": {"tsc-offset": true, "clock-guest": false, "tsc-scaling": false,
                         "adjust-clock": 14},
        "settable": settable
    })
}

/// A running fake: its socket and the thread that plays the script.
pub struct FakeQmp {
    pub socket: PathBuf,
    dir: PathBuf,
    thread: Option<JoinHandle<Result<Vec<Value>, String>>>,
}

impl FakeQmp {
    /// Listens in a fresh directory named after `tag` and plays `steps` on
    /// the first connection.
    pub fn start(tag: &str, steps: Vec<Step>) -> FakeQmp {
        let dir = std::env::temp_dir().join(format!("clockcarry-qmp-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        let socket = dir.join("qmp.sock");
        let listener = UnixListener::bind(&socket).expect("bind the fake QMP socket");
        let thread = std::thread::spawn(move || play(listener, steps));
        FakeQmp {
            socket,
            dir,
            thread: Some(thread),
        }
    }

    /// Waits for the script to end; the requests read, or why the script
    /// failed (a request other than the one expected, an early EOF).
    pub fn finish(mut self) -> Result<Vec<Value>, String> {
        let t = self.thread.take().expect("finish once");
        t.join().map_err(|_| "the fake panicked".to_string())?
    }
}

impl Drop for FakeQmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn play(listener: UnixListener, steps: Vec<Step>) -> Result<Vec<Value>, String> {
    let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut out = stream;
    let mut requests = Vec::new();
    let mut read = |expect: &str, requests: &mut Vec<Value>| -> Result<Value, String> {
        let mut line = String::new();
        let n = reader.read_line(&mut line).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("EOF while waiting for {expect}"));
        }
        let v: Value =
            serde_json::from_str(&line).map_err(|e| format!("bad request {line:?}: {e}"))?;
        if v["execute"] != json!(expect) {
            return Err(format!("expected {expect}, got {v}"));
        }
        requests.push(v.clone());
        Ok(v)
    };
    for step in steps {
        let bytes: Vec<u8> = match step {
            Step::Raw(b) => b,
            Step::Send(v) => line(&v),
            Step::Reply(cmd, ret) => {
                let req = read(cmd, &mut requests)?;
                line(&json!({"return": ret, "id": req["id"]}))
            }
            Step::Error(cmd, class, desc) => {
                let req = read(cmd, &mut requests)?;
                line(&json!({"error": {"class": class, "desc": desc}, "id": req["id"]}))
            }
            Step::Custom(cmd, f) => {
                let req = read(cmd, &mut requests)?;
                f(&req)
            }
            Step::Swallow(cmd) => {
                read(cmd, &mut requests)?;
                Vec::new()
            }
            Step::Sleep(d) => {
                std::thread::sleep(d);
                Vec::new()
            }
            Step::Close => return Ok(requests),
        };
        // A client that gave up may have closed: not the script's failure.
        if out.write_all(&bytes).is_err() {
            return Ok(requests);
        }
    }
    // Hold the connection until the client is done with it.
    let mut rest = String::new();
    let _ = reader.read_line(&mut rest);
    Ok(requests)
}

/// `v` as QEMU writes a message: compact JSON and "\r\n".
pub fn line(v: &Value) -> Vec<u8> {
    let mut b = serde_json::to_vec(v).expect("encode");
    b.extend_from_slice(b"\r\n");
    b
}
