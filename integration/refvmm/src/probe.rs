//! The probe guest (integration/probe/probe.s): the embedded PVH ELF, the
//! constants it shares with the VMM, and its two report formats (the binary
//! record the reference VMM reads, the text line other VMMs' serial files
//! get).

use clockcarry::model::Pvti;
use clockcarry::pvclock::pvclock_read;
use serde::{Deserialize, Serialize};

/// The probe guest, as built by build.rs.
pub static PROBE_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.elf"));

/// Port of the binary reports (OUT: record address) and the magic (IN).
pub const REPORT_PORT: u16 = 0x0cc0;
/// What the reference VMM answers on `in REPORT_PORT` to select port mode.
pub const REF_MAGIC: u32 = 0x4b43_4350;
/// First word of every record ("CCR1").
pub const RECORD_MAGIC: u32 = 0x3152_4343;
/// Size of a record, bytes.
pub const RECORD_BYTES: usize = 64;
/// vCPUs the probe has slots for.
pub const MAX_VCPUS: u32 = 64;

/// The PVTI fields as the guest copied them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedPvti {
    pub version: u32,
    pub tsc_timestamp: u64,
    pub system_time: u64,
    pub tsc_to_system_mul: u32,
    pub tsc_shift: i8,
    pub flags: u8,
}

impl ReportedPvti {
    /// The line, or `None` while KVM has not filled the page (mul 0).
    pub fn line(&self) -> Option<Pvti> {
        (self.tsc_to_system_mul != 0).then_some(Pvti {
            tsc_timestamp: self.tsc_timestamp,
            system_time: self.system_time,
            tsc_to_system_mul: self.tsc_to_system_mul,
            tsc_shift: self.tsc_shift,
            flags: self.flags,
        })
    }
}

/// One report of the guest: its TSC and the PVTI it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestReport {
    pub vcpu: u32,
    /// Per-vCPU report counter (text lines carry its low 32 bits).
    pub seq: u64,
    /// The guest's rdtsc, cycles.
    pub tsc: u64,
    pub pvti: ReportedPvti,
}

impl GuestReport {
    /// kvm-clock as the guest computes it from this report, ns.
    pub fn kvmclock_ns(&self) -> Option<u64> {
        self.pvti.line().map(|p| pvclock_read(&p, self.tsc))
    }

    /// Parses a 64-byte record (layout in probe.s). `None` when the magic
    /// is wrong.
    pub fn from_record(b: &[u8; RECORD_BYTES]) -> Option<GuestReport> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
        if u32_at(0) != RECORD_MAGIC {
            return None;
        }
        Some(GuestReport {
            vcpu: u32_at(4),
            seq: u64_at(8),
            tsc: u64_at(16),
            pvti: ReportedPvti {
                version: u32_at(24),
                tsc_timestamp: u64_at(32),
                system_time: u64_at(40),
                tsc_to_system_mul: u32_at(48),
                tsc_shift: i8::from_le_bytes([b[52]]),
                flags: b[53],
            },
        })
    }

    /// Parses a text line `CC <vcpu> <seq> <tsc> <version> <tsc_timestamp>
    /// <system_time> <mul> <shift> <flags>` (hex fields). Anything else
    /// (banners, other output) gives `None`.
    pub fn from_text_line(line: &str) -> Option<GuestReport> {
        let mut f = line.trim_end_matches(['\r', '\n']).split(' ');
        if f.next()? != "CC" {
            return None;
        }
        let mut hex = |digits: usize| -> Option<u64> {
            let s = f.next()?;
            if s.len() != digits {
                return None;
            }
            u64::from_str_radix(s, 16).ok()
        };
        let vcpu = u32::try_from(hex(8)?).ok()?;
        let seq = hex(8)?;
        let tsc = hex(16)?;
        let version = u32::try_from(hex(8)?).ok()?;
        let tsc_timestamp = hex(16)?;
        let system_time = hex(16)?;
        let mul = u32::try_from(hex(8)?).ok()?;
        let shift = u8::try_from(hex(2)?).ok()?;
        let flags = u8::try_from(hex(2)?).ok()?;
        if f.next().is_some() {
            return None;
        }
        Some(GuestReport {
            vcpu,
            seq,
            tsc,
            pvti: ReportedPvti {
                version,
                tsc_timestamp,
                system_time,
                tsc_to_system_mul: mul,
                tsc_shift: i8::from_le_bytes([shift]),
                flags,
            },
        })
    }

    /// The text line the probe prints for this report (without newline).
    pub fn to_text_line(&self) -> String {
        format!(
            "CC {:08x} {:08x} {:016x} {:08x} {:016x} {:016x} {:08x} {:02x} {:02x}",
            self.vcpu,
            self.seq & 0xffff_ffff,
            self.tsc,
            self.pvti.version,
            self.pvti.tsc_timestamp,
            self.pvti.system_time,
            self.pvti.tsc_to_system_mul,
            self.pvti.tsc_shift.to_le_bytes()[0],
            self.pvti.flags
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GuestReport {
        GuestReport {
            vcpu: 1,
            seq: 7,
            tsc: 0x0102_0304_0506_0708,
            pvti: ReportedPvti {
                version: 4,
                tsc_timestamp: 0x0102_0000_0000_0000,
                system_time: 123_456_789,
                tsc_to_system_mul: 3_308_087_296,
                tsc_shift: -1,
                flags: 3,
            },
        }
    }

    #[test]
    fn text_round_trip() {
        let r = sample();
        let line = r.to_text_line();
        assert_eq!(GuestReport::from_text_line(&line), Some(r));
        assert_eq!(GuestReport::from_text_line(&format!("{line}\r\n")), Some(r));
        assert_eq!(
            GuestReport::from_text_line("clockcarry-probe 1 vcpu 00 text"),
            None
        );
        assert_eq!(GuestReport::from_text_line(&line[..line.len() - 1]), None);
        assert_eq!(GuestReport::from_text_line(&format!("{line} 00")), None);
    }

    #[test]
    fn record_layout() {
        let mut b = [0u8; RECORD_BYTES];
        b[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&2u32.to_le_bytes());
        b[8..16].copy_from_slice(&9u64.to_le_bytes());
        b[16..24].copy_from_slice(&1000u64.to_le_bytes());
        b[24..28].copy_from_slice(&6u32.to_le_bytes());
        b[32..40].copy_from_slice(&900u64.to_le_bytes());
        b[40..48].copy_from_slice(&5u64.to_le_bytes());
        b[48..52].copy_from_slice(&0x8000_0000u32.to_le_bytes());
        b[52] = 0xff;
        b[53] = 1;
        let r = GuestReport::from_record(&b).expect("magic");
        assert_eq!((r.vcpu, r.seq, r.tsc), (2, 9, 1000));
        assert_eq!(r.pvti.tsc_shift, -1);
        // (1000 - 900) >> 1 = 50 cycles, times 1/2 = 25 ns.
        assert_eq!(r.kvmclock_ns(), Some(5 + 25));
        b[0] = 0;
        assert_eq!(GuestReport::from_record(&b), None);
    }

    #[test]
    fn embedded_elf_is_a_pvh_image() {
        let img = crate::elf::parse(PROBE_ELF).expect("probe ELF parses");
        assert_eq!(img.entry, 0x0010_0000);
        assert!(img.end() < 0x0020_0000, "image fits below 2 MiB");
    }
}
