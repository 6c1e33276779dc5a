//! The PUT vm.clock body the clockcarry client sends is exactly the one the
//! reference VMM parses (no /dev/kvm needed).

use clockcarry::api::{
    ClockPut as LibPut, FollowPvti as LibFollow, KvmClockPut as LibKvm, SetClockPut,
};
use clockcarry_refvmm::clockapi::ClockPut;

#[test]
fn library_bodies_parse_in_the_vmm() {
    let bodies = [
        LibPut {
            tsc_khz: Some(2_445_411),
            tsc_offsets: vec![-26_566_304_618, -26_566_304_618],
            kvmclock: Some(LibKvm::FollowPvti(LibFollow {
                tsc_timestamp: 1,
                system_time: 2,
                tsc_to_system_mul: 3_512_675_207,
                tsc_shift: -1,
                flags: 1,
                max_error_ns: 50,
            })),
        },
        LibPut {
            tsc_khz: None,
            tsc_offsets: vec![0],
            kvmclock: Some(LibKvm::SetClock(SetClockPut {
                clock: 5,
                realtime: 6,
                flags: 4,
            })),
        },
        LibPut {
            tsc_khz: None,
            tsc_offsets: vec![7],
            kvmclock: None,
        },
    ];
    for lib in bodies {
        let json = serde_json::to_string(&lib).expect("serialise");
        let ours: ClockPut = serde_json::from_str(&json).expect("the VMM parses it");
        assert_eq!(serde_json::to_string(&ours).expect("serialise"), json);
    }
}
