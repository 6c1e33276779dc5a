//! The exchange's real-time guard: SCHED_FIFO 1 while held, the previous
//! policy back when dropped; refused without the privilege, thread unchanged.

use clockcarry::peer::sched::RealTime;

fn policy() -> (i32, i32) {
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is this thread; `param` is valid and writable.
    let rc = unsafe { libc::sched_getparam(0, &mut param) };
    assert_eq!(rc, 0, "sched_getparam");
    // SAFETY: no pointer argument; pid 0 is this thread.
    let p = unsafe { libc::sched_getscheduler(0) };
    assert!(p >= 0, "sched_getscheduler");
    (p, param.sched_priority)
}

#[test]
fn realtime_is_held_then_restored() {
    let before = policy();
    match RealTime::enter() {
        Ok(rt) => {
            assert_eq!(
                policy(),
                (libc::SCHED_FIFO, 1),
                "not SCHED_FIFO 1 while held"
            );
            drop(rt);
            assert_eq!(policy(), before, "policy not restored");
        }
        Err(e) => {
            println!("SKIP: SCHED_FIFO refused here ({e}); checking the thread is unchanged");
            assert_eq!(policy(), before, "a refused enter changed the thread");
        }
    }
}
