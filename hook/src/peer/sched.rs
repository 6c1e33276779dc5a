//! Real-time scheduling for the measurement rounds only.
//!
//! A round's delay includes the time between a reply arriving and the
//! process reading it. On a host whose CPUs are busy (a guest's vCPU
//! threads, a build) a woken time-sharing process can wait a whole
//! scheduler slice, a millisecond or more, in every round: the best round
//! trip then carries it and the bound widens with it (the two-host lab
//! measured 2.4 ms round trips instead of 0.8 ms with a 4-vCPU guest on a
//! one-CPU host). As NTP daemons do, the rounds therefore run with the
//! calling thread at `SCHED_FIFO` priority 1, the lowest real-time one:
//! it preempts time-sharing tasks when woken and yields to every other
//! real-time task. The thread sleeps in the socket read nearly all the
//! time, the rounds are few and bounded (at most `MAX_ROUNDS`, each within
//! its timeout), and the previous policy is restored when the guard drops.
//!
//! Without the privilege (not root, or an RT budget of 0 in a cgroup) the
//! rounds run as before; [`RealTime::enter`] says why, for the log.

use std::io;

/// The calling thread's scheduling policy before [`RealTime::enter`].
#[derive(Debug)]
pub struct RealTime {
    policy: libc::c_int,
    param: libc::sched_param,
}

impl RealTime {
    /// Moves the calling thread to `SCHED_FIFO` priority 1, or says why it
    /// could not (the thread is then unchanged).
    pub fn enter() -> Result<RealTime, io::Error> {
        // SAFETY: sched_getscheduler takes no pointer; pid 0 is this thread.
        let policy = unsafe { libc::sched_getscheduler(0) };
        if policy < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid, writable sched_param for the call.
        if unsafe { libc::sched_getparam(0, &mut param) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let fifo = libc::sched_param { sched_priority: 1 };
        // SAFETY: `fifo` is a valid sched_param that outlives the call.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &fifo) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RealTime { policy, param })
    }
}

impl Drop for RealTime {
    fn drop(&mut self) {
        // SAFETY: `self.param` is the valid sched_param read in `enter`.
        let rc = unsafe { libc::sched_setscheduler(0, self.policy, &self.param) };
        if rc != 0 {
            log::warn!(
                "could not restore the scheduling policy after the exchange: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// [`RealTime::enter`], logging (not failing) when it is refused.
pub fn enter_logged(side: &str) -> Option<RealTime> {
    match RealTime::enter() {
        Ok(rt) => Some(rt),
        Err(e) => {
            log::info!("{side}: exchange rounds at normal priority (SCHED_FIFO refused: {e})");
            None
        }
    }
}
