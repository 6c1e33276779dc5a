//! One QMP connection: greeting, `qmp_capabilities`, then commands.
//!
//! Invariants: at most one command is outstanding; every answer read is
//! matched to it by `id` (an answer with another `id` is a protocol error,
//! never taken for ours); events are set aside, at most
//! [`super::QmpOptions::max_events`] per answer; no message longer than
//! [`super::QmpOptions::max_message_bytes`] is buffered; no wait outlasts
//! the command timeout, measured from the moment the command was sent.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::{QmpError, QmpOptions};
use crate::vmclock_api::text::clip;

/// What QEMU said when the connection opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub major: u64,
    pub minor: u64,
    pub micro: u64,
    /// `version.package` (e.g. Debian's package version), clipped.
    pub package: String,
    /// The capabilities QEMU offers (`oob`); none is enabled.
    pub capabilities: Vec<String>,
}

impl Greeting {
    /// "7.2.0 (Debian 1:7.2+dfsg-7+deb12u18)".
    pub fn version(&self) -> String {
        let mut v = format!("{}.{}.{}", self.major, self.minor, self.micro);
        if !self.package.trim().is_empty() {
            v.push_str(&format!(" ({})", self.package.trim()));
        }
        v
    }
}

/// An open, negotiated QMP connection.
pub struct QmpSession {
    stream: UnixStream,
    path: PathBuf,
    options: QmpOptions,
    buf: Vec<u8>,
    next_id: u64,
    greeting: Greeting,
    commands: Option<BTreeSet<String>>,
    events: Vec<String>,
}

impl std::fmt::Debug for QmpSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpSession")
            .field("path", &self.path)
            .field("greeting", &self.greeting)
            .finish_non_exhaustive()
    }
}

/// Reading stops at the end of one JSON value.
enum Frame {
    Message(Value),
    /// More bytes are needed.
    Incomplete,
}

impl QmpSession {
    /// Connects to the QMP socket at `path`, reads the greeting and leaves
    /// capabilities negotiation mode (no capability enabled).
    pub fn connect(path: &Path, options: QmpOptions) -> Result<QmpSession, QmpError> {
        let stream = crate::unixsock::connect(path, options.connect_timeout)
            .map_err(|e| connect_error(path, &e, options.connect_timeout))?;
        let mut session = QmpSession {
            stream,
            path: path.to_path_buf(),
            options,
            buf: Vec::new(),
            next_id: 1,
            greeting: Greeting {
                major: 0,
                minor: 0,
                micro: 0,
                package: String::new(),
                capabilities: Vec::new(),
            },
            commands: None,
            events: Vec::new(),
        };
        let deadline = Instant::now() + options.command_timeout;
        let first = session.read_message("greeting", deadline, false, true)?;
        session.greeting = parse_greeting(&first).map_err(|reason| QmpError::Protocol {
            stage: "greeting".into(),
            reason,
            request_sent: false,
        })?;
        let answer = session.execute("qmp_capabilities", None)?;
        if !answer.as_object().is_some_and(Map::is_empty) {
            return Err(QmpError::BadAnswer {
                command: "qmp_capabilities".into(),
                reason: format!("`return` is {}, not {{}}", clip(&answer.to_string())),
            });
        }
        Ok(session)
    }

    /// The greeting.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The names of the events seen so far (QEMU's, e.g. `STOP`), oldest
    /// first, at most the last 64.
    pub fn events(&self) -> &[String] {
        &self.events
    }

    /// Runs `command` with `arguments` (an object, or none) and returns its
    /// `return` member. An `error` answer is [`QmpError::Command`].
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id = self.next_id.saturating_add(1);
        let mut request = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            if !args.is_object() {
                return Err(QmpError::BadAnswer {
                    command: command.into(),
                    reason: "arguments must be a JSON object".into(),
                });
            }
            request["arguments"] = args;
        }
        let mut bytes = serde_json::to_vec(&request).map_err(|e| QmpError::Io {
            stage: command.into(),
            msg: format!("cannot encode the command: {e}"),
            request_sent: false,
        })?;
        bytes.extend_from_slice(b"\r\n");
        let deadline = Instant::now() + self.options.command_timeout;
        self.write_all(command, &bytes, deadline)?;
        let mut events = 0usize;
        loop {
            let message = self.read_message(command, deadline, true, false)?;
            let Some(object) = message.as_object() else {
                return Err(protocol(command, "a message that is not a JSON object"));
            };
            if let Some(event) = object.get("event") {
                events += 1;
                if events > self.options.max_events {
                    return Err(protocol(
                        command,
                        &format!(
                            "more than {} events before the answer",
                            self.options.max_events
                        ),
                    ));
                }
                self.note_event(event);
                continue;
            }
            match object.get("id") {
                Some(got) if *got == json!(id) => {}
                // QEMU answers a request it could not parse without an id.
                None if object.contains_key("error") => {}
                Some(got) => {
                    return Err(protocol(
                        command,
                        &format!(
                            "an answer for id {} while waiting for id {id}",
                            clip(&got.to_string())
                        ),
                    ))
                }
                None => return Err(protocol(command, "an answer without an id")),
            }
            if let Some(error) = object.get("error") {
                return Err(command_error(command, error));
            }
            return match object.get("return") {
                Some(value) => Ok(value.clone()),
                None => Err(protocol(
                    command,
                    "an answer with neither `return` nor `error`",
                )),
            };
        }
    }

    /// Fails with [`QmpError::MissingCommand`] unless QEMU has `command`
    /// (asked once per session with `query-commands`).
    pub fn require(&mut self, command: &str) -> Result<(), QmpError> {
        if self.commands.is_none() {
            let list = self.execute("query-commands", None)?;
            let names = list
                .as_array()
                .ok_or_else(|| QmpError::BadAnswer {
                    command: "query-commands".into(),
                    reason: "`return` is not an array".into(),
                })?
                .iter()
                .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_string))
                .collect();
            self.commands = Some(names);
        }
        if self.commands.as_ref().is_some_and(|c| c.contains(command)) {
            Ok(())
        } else {
            Err(QmpError::MissingCommand {
                command: command.into(),
                version: self.greeting.version(),
            })
        }
    }

    fn note_event(&mut self, event: &Value) {
        if self.events.len() >= 64 {
            self.events.remove(0);
        }
        self.events
            .push(clip(event.as_str().unwrap_or("(not a string)")));
    }

    fn write_all(&mut self, stage: &str, bytes: &[u8], deadline: Instant) -> Result<(), QmpError> {
        let mut written = 0;
        while written < bytes.len() {
            let left =
                remaining(deadline).ok_or_else(|| self.timeout(stage, written > 0, false))?;
            self.stream
                .set_write_timeout(Some(left))
                .map_err(|e| io_error(stage, &e, written > 0))?;
            match self.stream.write(&bytes[written..]) {
                Ok(0) => {
                    return Err(QmpError::Closed {
                        stage: stage.into(),
                        request_sent: written > 0,
                    })
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if timed_out(&e) => return Err(self.timeout(stage, written > 0, false)),
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                    return Err(QmpError::Closed {
                        stage: stage.into(),
                        request_sent: written > 0,
                    })
                }
                Err(e) => return Err(io_error(stage, &e, written > 0)),
            }
        }
        Ok(())
    }

    /// The next whole JSON value from QEMU.
    fn read_message(
        &mut self,
        stage: &str,
        deadline: Instant,
        sent: bool,
        greeting: bool,
    ) -> Result<Value, QmpError> {
        loop {
            match self.take_frame(stage, sent)? {
                Frame::Message(v) => return Ok(v),
                Frame::Incomplete => {}
            }
            if self.buf.len() >= self.options.max_message_bytes {
                return Err(QmpError::Protocol {
                    stage: stage.into(),
                    reason: format!(
                        "a message longer than {} bytes",
                        self.options.max_message_bytes
                    ),
                    request_sent: sent,
                });
            }
            let left = remaining(deadline).ok_or_else(|| self.timeout(stage, sent, greeting))?;
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| io_error(stage, &e, sent))?;
            let room = self.options.max_message_bytes - self.buf.len();
            let mut chunk = vec![0u8; room.min(64 * 1024)];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(QmpError::Closed {
                        stage: stage.into(),
                        request_sent: sent,
                    })
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if timed_out(&e) => return Err(self.timeout(stage, sent, greeting)),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(QmpError::Closed {
                        stage: stage.into(),
                        request_sent: sent,
                    })
                }
                Err(e) => return Err(io_error(stage, &e, sent)),
            }
        }
    }

    /// One value off the front of the buffer, if a whole one is there.
    fn take_frame(&mut self, stage: &str, sent: bool) -> Result<Frame, QmpError> {
        let start = self
            .buf
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(self.buf.len());
        self.buf.drain(..start);
        if self.buf.is_empty() {
            return Ok(Frame::Incomplete);
        }
        if self.buf[0] != b'{' {
            return Err(QmpError::Protocol {
                stage: stage.into(),
                reason: format!(
                    "bytes that do not start a JSON object: {}",
                    crate::vmclock_api::text::quote_bytes(&self.buf[..self.buf.len().min(64)])
                ),
                request_sent: sent,
            });
        }
        let mut stream = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
        match stream.next() {
            Some(Ok(value)) => {
                let used = stream.byte_offset();
                self.buf.drain(..used);
                Ok(Frame::Message(value))
            }
            Some(Err(e)) if e.is_eof() => Ok(Frame::Incomplete),
            Some(Err(e)) => Err(QmpError::Protocol {
                stage: stage.into(),
                reason: format!("not JSON: {e}"),
                request_sent: sent,
            }),
            None => Ok(Frame::Incomplete),
        }
    }

    fn timeout(&self, stage: &str, sent: bool, greeting: bool) -> QmpError {
        QmpError::Timeout {
            stage: stage.into(),
            timeout_ms: u64::try_from(self.options.command_timeout.as_millis()).unwrap_or(u64::MAX),
            greeting,
            request_sent: sent,
        }
    }
}

fn remaining(deadline: Instant) -> Option<Duration> {
    let left = deadline.checked_duration_since(Instant::now())?;
    (!left.is_zero()).then_some(left)
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn protocol(stage: &str, reason: &str) -> QmpError {
    QmpError::Protocol {
        stage: stage.into(),
        reason: reason.into(),
        request_sent: true,
    }
}

fn io_error(stage: &str, e: &io::Error, sent: bool) -> QmpError {
    QmpError::Io {
        stage: stage.into(),
        msg: e.to_string(),
        request_sent: sent,
    }
}

fn connect_error(path: &Path, e: &io::Error, timeout: Duration) -> QmpError {
    use crate::unixsock::{path_failure, PathFailure};
    let path = path.to_path_buf();
    match path_failure(&path, e) {
        Some(PathFailure::Missing) => QmpError::SocketMissing { path },
        Some(PathFailure::Denied) => QmpError::PermissionDenied { path },
        Some(PathFailure::NotASocket) => QmpError::NotASocket { path },
        Some(PathFailure::Refused) => QmpError::ConnectionRefused { path },
        None if e.kind() == io::ErrorKind::TimedOut => QmpError::Timeout {
            stage: format!("connect to {}", path.display()),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            greeting: true,
            request_sent: false,
        },
        None => QmpError::Connect {
            path,
            msg: e.to_string(),
        },
    }
}

fn command_error(command: &str, error: &Value) -> QmpError {
    let class = error
        .get("class")
        .and_then(Value::as_str)
        .map(clip)
        .unwrap_or_else(|| "(no class)".into());
    let desc = error
        .get("desc")
        .and_then(Value::as_str)
        .map(clip)
        .unwrap_or_else(|| "(no description)".into());
    QmpError::Command {
        command: command.into(),
        class,
        desc,
    }
}

/// `{"QMP": {"version": {"qemu": {"major", "minor", "micro"}, "package"},
/// "capabilities": [...]}}`.
fn parse_greeting(message: &Value) -> Result<Greeting, String> {
    let qmp = message
        .get("QMP")
        .ok_or("the first message is not a QMP greeting (no `QMP` member): is this QEMU's -qmp socket, not its HMP monitor?")?;
    let qemu = qmp
        .pointer("/version/qemu")
        .ok_or("the greeting has no `version.qemu`")?;
    let part = |name: &str| -> Result<u64, String> {
        qemu.get(name).and_then(Value::as_u64).ok_or(format!(
            "the greeting's `version.qemu.{name}` is not an unsigned integer"
        ))
    };
    let capabilities = qmp
        .get("capabilities")
        .and_then(Value::as_array)
        .ok_or("the greeting's `capabilities` is not an array")?
        .iter()
        .map(|c| c.as_str().map(clip).ok_or("a capability is not a string"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Greeting {
        major: part("major")?,
        minor: part("minor")?,
        micro: part("micro")?,
        package: qmp
            .pointer("/version/package")
            .and_then(Value::as_str)
            .map(clip)
            .unwrap_or_default(),
        capabilities,
    })
}
