//! The VMM clock API client: `GET` / `PUT /api/v1/vm.clock` over HTTP/1.1 on
//! the VMM's Unix socket (Cloud Hypervisor's `--api-socket`), with ureq 3.
//!
//! Feature `http` (enabled by `cli`). The wire types and the checks on a
//! `GET` answer live in [`crate::vmclock_api`] (no HTTP dependency, what a
//! VMM implementing the endpoint shares) and are re-exported here.
//!
//! Every failure is an [`ApiError`] that says what to do about it: the socket
//! is missing, access is denied, nobody listens, the VMM did not answer in
//! time, the VMM answered with an error (its JSON array of strings, joined),
//! or it answered something this client cannot accept (the field is named).
//! [`ApiError::request_sent`] tells whether the VMM may have seen the request:
//! after a failed `PUT` that matters.

pub mod unix;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::model::VmClock;
use crate::unixsock::PathFailure;
pub use crate::vmclock_api::*;

/// Path of the VMM liveness endpoint.
pub const VMM_PING_ENDPOINT: &str = "/api/v1/vmm.ping";
/// The requests an armed clock rides in (docs/armed.md).
pub const VM_RESTORE_ENDPOINT: &str = "/api/v1/vm.restore";
pub const VM_RECEIVE_MIGRATION_ENDPOINT: &str = "/api/v1/vm.receive-migration";

/// Which request carries an armed clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArmedRequest {
    /// `vm.restore`, answered once the VM is restored (and resumed).
    Restore,
    /// `vm.receive-migration`, answered once the migration completed.
    ReceiveMigration,
}

impl ArmedRequest {
    pub fn endpoint(self) -> &'static str {
        match self {
            ArmedRequest::Restore => VM_RESTORE_ENDPOINT,
            ArmedRequest::ReceiveMigration => VM_RECEIVE_MIGRATION_ENDPOINT,
        }
    }
}

/// Largest response body read, in bytes (Cloud Hypervisor's own limit).
pub const MAX_RESPONSE_BYTES: u64 = 4 << 20;
/// Default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default budget for one request, connect to last byte of the answer.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a call to the VMM API failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "VMM API socket {} does not exist: is the VMM running, with --api-socket at that path?",
        path.display()
    )]
    SocketMissing { path: PathBuf },
    #[error(
        "permission denied on VMM API socket {}: run clockcarry as root or as the VMM's user",
        path.display()
    )]
    PermissionDenied { path: PathBuf },
    #[error("{} is not a Unix socket: give the VMM's --api-socket path", path.display())]
    NotASocket { path: PathBuf },
    #[error(
        "nobody listens on VMM API socket {} (connection refused): the VMM has exited or is restarting",
        path.display()
    )]
    ConnectionRefused { path: PathBuf },
    #[error("VMM API {method} {endpoint}: no answer within {timeout_ms} ms ({stage})")]
    Timeout {
        method: &'static str,
        endpoint: &'static str,
        stage: &'static str,
        timeout_ms: u64,
        request_sent: bool,
    },
    #[error("VMM API {method} {endpoint}: {msg}")]
    Transport {
        method: &'static str,
        endpoint: &'static str,
        msg: String,
        request_sent: bool,
    },
    #[error("VMM API {method} {endpoint} failed with HTTP {status}: {}", join_messages(.messages))]
    Vmm {
        method: &'static str,
        endpoint: &'static str,
        status: u16,
        /// The VMM's error strings (Cloud Hypervisor: a JSON array of strings).
        messages: Vec<String>,
        /// The typed failure of a `PUT vm.clock` (`None`: the VMM gave none).
        failure: Option<Box<PutFailure>>,
    },
    #[error("VMM API {method} {endpoint}: unacceptable answer: {reason}")]
    BadResponse {
        method: &'static str,
        endpoint: &'static str,
        reason: String,
    },
}

fn join_messages(messages: &[String]) -> String {
    if messages.is_empty() {
        "(no error text)".to_string()
    } else {
        messages.join(": ")
    }
}

impl ApiError {
    /// Whether the VMM may have received (and acted on) the request. False
    /// only when the connection was never made.
    pub fn request_sent(&self) -> bool {
        match self {
            ApiError::SocketMissing { .. }
            | ApiError::PermissionDenied { .. }
            | ApiError::NotASocket { .. }
            | ApiError::ConnectionRefused { .. } => false,
            ApiError::Timeout { request_sent, .. } | ApiError::Transport { request_sent, .. } => {
                *request_sent
            }
            ApiError::Vmm { .. } | ApiError::BadResponse { .. } => true,
        }
    }

    /// The HTTP status the VMM answered with, when it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Vmm { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Timeouts of the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiOptions {
    pub connect_timeout: Duration,
    /// Whole request: connect, send, wait, read.
    pub request_timeout: Duration,
}

impl Default for ApiOptions {
    fn default() -> Self {
        ApiOptions {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// A client of one VMM's API socket. Each request uses its own connection
/// (nothing is pooled), so a VMM that closes after every answer is fine.
pub struct ApiClient {
    agent: ureq::Agent,
    socket: PathBuf,
    options: ApiOptions,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("socket", &self.socket)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// A client of the socket at `socket`. Connects nothing yet.
    pub fn new(socket: &Path, options: ApiOptions) -> ApiClient {
        let config = ureq::config::Config::builder()
            .http_status_as_error(false)
            .proxy(None)
            .max_redirects(0)
            .max_idle_connections(0)
            .max_idle_connections_per_host(0)
            .user_agent(concat!("clockcarry/", env!("CARGO_PKG_VERSION")))
            .accept("application/json")
            .input_buffer_size(64 * 1024)
            .output_buffer_size(64 * 1024)
            .timeout_global(Some(options.request_timeout))
            .timeout_connect(Some(options.connect_timeout))
            .build();
        let connector = unix::UnixConnector::new(socket, options.connect_timeout);
        let agent = ureq::Agent::with_parts(config, connector, unix::NoResolver);
        ApiClient {
            agent,
            socket: socket.to_path_buf(),
            options,
        }
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /api/v1/vmm.ping`: the VMM answers at all.
    pub fn ping(&self) -> Result<(), ApiError> {
        let (status, body) = self.call("GET", VMM_PING_ENDPOINT, None)?;
        self.expect_success("GET", VMM_PING_ENDPOINT, status, &body)
    }

    /// `GET /api/v1/vm.clock`, parsed and checked ([`parse_vm_clock`]).
    pub fn get_vm_clock(&self) -> Result<VmClock, ApiError> {
        let (status, body) = self.call("GET", VM_CLOCK_ENDPOINT, None)?;
        self.expect_success("GET", VM_CLOCK_ENDPOINT, status, &body)?;
        parse_vm_clock(&body).map_err(|e| ApiError::BadResponse {
            method: "GET",
            endpoint: VM_CLOCK_ENDPOINT,
            reason: e.to_string(),
        })
    }

    /// `PUT /api/v1/vm.clock` with `put`. A 2xx answer is a success; its
    /// body, if any, must be JSON.
    pub fn put_vm_clock(&self, put: &ClockPut) -> Result<PutAnswer, ApiError> {
        let bytes = serde_json::to_vec(put).map_err(|e| ApiError::Transport {
            method: "PUT",
            endpoint: VM_CLOCK_ENDPOINT,
            msg: format!("cannot encode the request: {e}"),
            request_sent: false,
        })?;
        let (status, body) = self.call("PUT", VM_CLOCK_ENDPOINT, Some(&bytes))?;
        self.expect_success("PUT", VM_CLOCK_ENDPOINT, status, &body)?;
        let (reply, value) = parse_put_applied(&body).map_err(|e| ApiError::BadResponse {
            method: "PUT",
            endpoint: VM_CLOCK_ENDPOINT,
            reason: e.to_string(),
        })?;
        Ok(PutAnswer {
            status,
            reply,
            body: value,
        })
    }

    /// `PUT vm.restore` / `vm.receive-migration` with `body`, a request
    /// carrying an armed `clock`. Success is a 2xx with the typed reply
    /// (`outcome: applied`): a VMM that answers 204, or without that reply,
    /// did not apply the clock (it does not know `clock`) and the error
    /// says so. A refusal comes back as [`ApiError::Vmm`] with the typed
    /// failure.
    pub fn put_armed(&self, which: ArmedRequest, body: &[u8]) -> Result<PutAnswer, ApiError> {
        let endpoint = which.endpoint();
        let (status, answer) = self.call("PUT", endpoint, Some(body))?;
        self.expect_success("PUT", endpoint, status, &answer)?;
        let not_applied = |reason: String| ApiError::BadResponse {
            method: "PUT",
            endpoint,
            reason: format!(
                "{reason}: the VMM did not report the armed clock applied (a VMM without the \
                 armed clock ignores it and restores with its own clock handling)"
            ),
        };
        let (reply, value) = parse_put_applied(&answer).map_err(|e| not_applied(e.to_string()))?;
        if reply.is_none() {
            return Err(not_applied(format!("HTTP {status} without a typed reply")));
        }
        Ok(PutAnswer {
            status,
            reply,
            body: value,
        })
    }

    fn expect_success(
        &self,
        method: &'static str,
        endpoint: &'static str,
        status: u16,
        body: &[u8],
    ) -> Result<(), ApiError> {
        if (200..300).contains(&status) {
            return Ok(());
        }
        let typed = [
            VM_CLOCK_ENDPOINT,
            VM_RESTORE_ENDPOINT,
            VM_RECEIVE_MIGRATION_ENDPOINT,
        ];
        let failure = (method == "PUT" && typed.contains(&endpoint))
            .then(|| parse_put_failure(body).map(Box::new))
            .flatten();
        Err(ApiError::Vmm {
            method,
            endpoint,
            status,
            messages: error_messages(body),
            failure,
        })
    }

    /// One request; answers (status, body).
    fn call(
        &self,
        method: &'static str,
        endpoint: &'static str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), ApiError> {
        let url = format!("http://localhost{endpoint}");
        let result = match (method, body) {
            ("PUT", Some(bytes)) => self
                .agent
                .put(&url)
                .header("Content-Type", "application/json")
                .send(bytes),
            ("PUT", None) => self.agent.put(&url).send_empty(),
            _ => self.agent.get(&url).call(),
        };
        let mut response = result.map_err(|e| self.map_error(method, endpoint, e))?;
        let status = response.status().as_u16();
        let bytes = response
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BYTES)
            .read_to_vec()
            .map_err(|e| self.map_error(method, endpoint, e))?;
        Ok((status, bytes))
    }

    fn map_error(
        &self,
        method: &'static str,
        endpoint: &'static str,
        err: ureq::Error,
    ) -> ApiError {
        let path = self.socket.clone();
        match err {
            ureq::Error::Io(e) if e.get_ref().is_some_and(|i| i.is::<unix::NotAccepted>()) => {
                ApiError::Timeout {
                    method,
                    endpoint,
                    stage: "connecting: the VMM took neither the connection nor the request \
                            (it accepts nothing: stopped, or its API thread is stuck)",
                    timeout_ms: u64::try_from(self.options.connect_timeout.as_millis())
                        .unwrap_or(u64::MAX),
                    // The request lies unread in the socket: a VMM that
                    // wakes up could still read it and act on it.
                    request_sent: true,
                }
            }
            ureq::Error::Io(e) => match crate::unixsock::path_failure(&self.socket, &e) {
                Some(PathFailure::Missing) => ApiError::SocketMissing { path },
                Some(PathFailure::Denied) => ApiError::PermissionDenied { path },
                Some(PathFailure::NotASocket) => ApiError::NotASocket { path },
                Some(PathFailure::Refused) => ApiError::ConnectionRefused { path },
                None => ApiError::Transport {
                    method,
                    endpoint,
                    msg: format!(
                        "I/O error on {}: {e} (the VMM closed the connection?)",
                        self.socket.display()
                    ),
                    request_sent: true,
                },
            },
            ureq::Error::Timeout(t) => {
                let connect = matches!(t, ureq::Timeout::Connect);
                let timeout = if connect {
                    self.options.connect_timeout
                } else {
                    self.options.request_timeout
                };
                ApiError::Timeout {
                    method,
                    endpoint,
                    stage: if connect {
                        "connecting: the VMM's API thread is busy or stuck"
                    } else {
                        "waiting for the VMM's answer"
                    },
                    timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                    request_sent: !connect,
                }
            }
            ureq::Error::BodyExceedsLimit(limit) => ApiError::BadResponse {
                method,
                endpoint,
                reason: format!("the body is larger than {limit} bytes"),
            },
            other => ApiError::Transport {
                method,
                endpoint,
                msg: format!("HTTP exchange failed: {other}"),
                request_sent: true,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmclock_api::text::clip;

    #[test]
    fn error_bodies_are_joined() {
        assert_eq!(
            error_messages(br#"["Error from API", "The VM is not paused"]"#),
            vec!["Error from API", "The VM is not paused"]
        );
        assert_eq!(error_messages(b"  "), Vec::<String>::new());
        assert_eq!(error_messages(b"\"oops\""), vec!["oops"]);
        assert_eq!(error_messages(b"plain text"), vec!["\"plain text\""]);
        let long = "x".repeat(1000);
        assert!(error_messages(long.as_bytes())[0].len() < 400);
    }

    #[test]
    fn clip_respects_boundaries_and_controls() {
        let s = "é".repeat(400);
        assert!(clip(&s).ends_with("..."));
        assert_eq!(clip("a\nb"), "a b");
    }
}
