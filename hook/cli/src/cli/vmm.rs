//! The VMM clockcarry talks to: Cloud Hypervisor's API (`--api-socket`,
//! `GET`/`PUT vm.clock`) or QEMU's QMP (`--qmp-socket`, the qemu-patch
//! series' `x-query-guest-clock`/`x-set-guest-clock`). Both answer with the
//! same [`VmClock`] and [`PutAnswer`], and fail with a [`VmmError`] that
//! says whether the request may have been seen and what the VMM's typed
//! outcome was, so capture and restore decide the same way on either.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use clockcarry::api::{ApiClient, ApiError, ClockPut, PutAnswer, PutFailure};
use clockcarry::model::VmClock;
use clockcarry::qmp::{self, QmpError, QmpOptions, QmpSession};

/// A failed call to either VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{0}")]
    Api(#[from] ApiError),
    #[error("{error}")]
    Qmp {
        error: QmpError,
        /// The outcome QEMU recorded for a failed `x-set-guest-clock`.
        failure: Option<Box<PutFailure>>,
    },
}

impl From<QmpError> for VmmError {
    fn from(error: QmpError) -> Self {
        VmmError::Qmp {
            error,
            failure: None,
        }
    }
}

impl VmmError {
    /// Whether the VMM may have received (and acted on) the request.
    pub fn request_sent(&self) -> bool {
        match self {
            VmmError::Api(e) => e.request_sent(),
            VmmError::Qmp { error, .. } => error.request_sent(),
        }
    }

    /// The VMM's typed failure of a clock write, when it gave one.
    pub fn put_failure(&self) -> Option<&PutFailure> {
        match self {
            VmmError::Api(ApiError::Vmm { failure, .. }) => failure.as_deref(),
            VmmError::Api(_) => None,
            VmmError::Qmp { failure, .. } => failure.as_deref(),
        }
    }

    /// The VMM answered (with an error), as opposed to a transport failure.
    pub fn answered(&self) -> bool {
        match self {
            VmmError::Api(e) => matches!(e, ApiError::Vmm { .. }),
            VmmError::Qmp { error, .. } => matches!(error, QmpError::Command { .. }),
        }
    }
}

/// QEMU over QMP: one session, opened at the first call and kept for the
/// next ones (QEMU serves one client per QMP socket at a time, and every
/// new session costs a greeting and a negotiation inside the blackout).
pub struct QmpVmm {
    path: PathBuf,
    options: QmpOptions,
    session: RefCell<Option<QmpSession>>,
}

impl QmpVmm {
    fn with_session<T>(
        &self,
        f: impl FnOnce(&mut QmpSession) -> Result<T, VmmError>,
    ) -> Result<T, VmmError> {
        let mut slot = self.session.borrow_mut();
        if slot.is_none() {
            *slot = Some(QmpSession::connect(&self.path, self.options)?);
        }
        let Some(session) = slot.as_mut() else {
            return Err(VmmError::from(QmpError::Connect {
                path: self.path.clone(),
                msg: "no session".into(),
            }));
        };
        let result = f(session);
        if matches!(
            &result,
            Err(VmmError::Qmp { error, .. }) if !matches!(error, QmpError::Command { .. } | QmpError::MissingCommand { .. })
        ) {
            // A broken exchange leaves the stream out of step: start over.
            *slot = None;
        }
        result
    }
}

/// The VMM of one command line.
pub enum Vmm {
    Api(ApiClient),
    Qmp(Box<QmpVmm>),
}

impl Vmm {
    /// QEMU at the QMP socket `path`.
    pub fn qmp(path: &Path, options: QmpOptions) -> Vmm {
        Vmm::Qmp(Box::new(QmpVmm {
            path: path.to_path_buf(),
            options,
            session: RefCell::new(None),
        }))
    }

    /// The VM's clock state.
    pub fn get_vm_clock(&self) -> Result<VmClock, VmmError> {
        match self {
            Vmm::Api(c) => Ok(c.get_vm_clock()?),
            Vmm::Qmp(q) => q.with_session(|s| Ok(qmp::clock::query(s)?.0)),
        }
    }

    /// Applies `put` (paused VM only).
    pub fn put_vm_clock(&self, put: &ClockPut) -> Result<PutAnswer, VmmError> {
        match self {
            Vmm::Api(c) => Ok(c.put_vm_clock(put)?),
            Vmm::Qmp(q) => q.with_session(|s| {
                qmp::clock::set(s, put).map_err(|f| {
                    let f = *f;
                    VmmError::Qmp {
                        error: f.error,
                        failure: f.failure.map(Box::new),
                    }
                })
            }),
        }
    }
}
