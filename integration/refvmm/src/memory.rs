//! Guest RAM: one memfd-backed shared mapping at guest physical 0.
//!
//! memfd so that a local migration (live update) can hand the very same
//! memory to the next VMM process over a Unix socket (SCM_RIGHTS), as Cloud
//! Hypervisor does with `local=on`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// Largest guest RAM accepted, bytes (the probe needs 2 MiB).
pub const MAX_RAM_BYTES: u64 = 1 << 30;

/// Why guest RAM could not be set up or accessed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest RAM size {0} bytes: must be a non-zero multiple of 4 KiB up to 1 GiB")]
    BadSize(u64),
    #[error("{op} failed: {source}")]
    Os {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("guest memory access at {gpa:#x} (+{len}) is out of bounds")]
    OutOfBounds { gpa: u64, len: usize },
}

fn os(op: &'static str) -> MemoryError {
    MemoryError::Os {
        op,
        source: std::io::Error::last_os_error(),
    }
}

/// Guest RAM: `size` bytes mapped shared from `fd`.
#[derive(Debug)]
pub struct GuestRam {
    fd: OwnedFd,
    addr: NonNull<u8>,
    size: usize,
}

// SAFETY: the mapping is owned by this value and lives until Drop; all
// access goes through bounds-checked copies. Concurrent access by vCPUs is
// the guest's own business (as on real hardware).
unsafe impl Send for GuestRam {}
// SAFETY: see Send; no method hands out references into the mapping.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Fresh zeroed RAM of `size` bytes in a new memfd.
    pub fn new(size: u64) -> Result<GuestRam, MemoryError> {
        check_size(size)?;
        let name = c"clockcarry-guest-ram";
        // SAFETY: `name` is a valid NUL-terminated string; the result is checked.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let len = libc::off_t::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        // SAFETY: ftruncate on a descriptor we own; the result is checked.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
            return Err(os("ftruncate"));
        }
        GuestRam::map(fd, size)
    }

    /// Maps RAM received from another process (local migration).
    pub fn from_fd(fd: OwnedFd, size: u64) -> Result<GuestRam, MemoryError> {
        check_size(size)?;
        // SAFETY: fstat on a descriptor we own into a zeroed stat; checked.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(os("fstat"));
        }
        if u64::try_from(st.st_size).unwrap_or(0) < size {
            return Err(MemoryError::BadSize(size));
        }
        GuestRam::map(fd, size)
    }

    fn map(fd: OwnedFd, size: u64) -> Result<GuestRam, MemoryError> {
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        // SAFETY: a shared mapping of `len` bytes of a file at least that
        // long, no address hint; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(os("mmap"));
        }
        let addr = NonNull::new(ptr.cast::<u8>()).ok_or(MemoryError::BadSize(size))?;
        Ok(GuestRam {
            fd,
            addr,
            size: len,
        })
    }

    pub fn size(&self) -> u64 {
        self.size as u64
    }

    /// Host virtual address of guest physical 0 (for KVM_SET_USER_MEMORY_REGION).
    pub fn host_addr(&self) -> u64 {
        self.addr.as_ptr() as u64
    }

    /// The memfd, to pass to another process.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    fn start(&self, gpa: u64, len: usize) -> Result<usize, MemoryError> {
        let start = usize::try_from(gpa).map_err(|_| MemoryError::OutOfBounds { gpa, len })?;
        match start.checked_add(len) {
            Some(end) if end <= self.size => Ok(start),
            _ => Err(MemoryError::OutOfBounds { gpa, len }),
        }
    }

    /// Copies guest memory at `gpa` into `buf` (volatile: a vCPU may be
    /// writing it).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let start = self.start(gpa, buf.len())?;
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: start + i < size (checked) and the mapping lives as long as self.
            *b = unsafe { self.addr.as_ptr().add(start + i).read_volatile() };
        }
        Ok(())
    }

    /// Writes `data` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let start = self.start(gpa, data.len())?;
        for (i, b) in data.iter().enumerate() {
            // SAFETY: start + i < size (checked) and the mapping lives as long as self.
            unsafe { self.addr.as_ptr().add(start + i).write_volatile(*b) };
        }
        Ok(())
    }

    /// The 32 bytes at `gpa` (a PVTI reader for the library's capture).
    pub fn read_32(&self, gpa: u64) -> Option<[u8; 32]> {
        let mut b = [0u8; 32];
        self.read(gpa, &mut b).ok().map(|_| b)
    }

    /// Writes all of guest RAM to `out`. The vCPUs must be stopped.
    pub fn save_to(&self, out: &mut dyn Write) -> std::io::Result<()> {
        // SAFETY: the whole mapping is valid for `size` bytes; the vCPUs are
        // parked, so nothing writes it while the slice exists.
        let all = unsafe { std::slice::from_raw_parts(self.addr.as_ptr(), self.size) };
        out.write_all(all)
    }

    /// Fills all of guest RAM from `input`. The vCPUs must not run.
    pub fn load_from(&self, input: &mut dyn Read) -> std::io::Result<()> {
        // SAFETY: the whole mapping is valid for `size` bytes and no vCPU
        // runs yet, so this is the only access while the slice exists.
        let all = unsafe { std::slice::from_raw_parts_mut(self.addr.as_ptr(), self.size) };
        input.read_exact(all)
    }

    /// Fills guest RAM from a file of exactly `size` bytes.
    pub fn load_file(&self, file: &mut File) -> std::io::Result<()> {
        let len = file.metadata()?.len();
        if len != self.size() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("memory file has {len} bytes, the VM has {}", self.size()),
            ));
        }
        self.load_from(file)
    }
}

fn check_size(size: u64) -> Result<(), MemoryError> {
    if size == 0 || size % 4096 != 0 || size > MAX_RAM_BYTES {
        return Err(MemoryError::BadSize(size));
    }
    Ok(())
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `map`; nothing uses it afterwards.
        unsafe {
            libc::munmap(self.addr.as_ptr().cast(), self.size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_round_trip() {
        let ram = GuestRam::new(8192).expect("memfd");
        ram.write(8188, &[1, 2, 3, 4]).expect("in bounds");
        assert!(ram.write(8189, &[1, 2, 3, 4]).is_err());
        assert!(ram.read_32(u64::MAX).is_none());
        let mut saved = Vec::new();
        ram.save_to(&mut saved).expect("save");
        assert_eq!(saved.len(), 8192);
        let other = GuestRam::new(8192).expect("memfd");
        other.load_from(&mut saved.as_slice()).expect("load");
        let mut b = [0u8; 4];
        other.read(8188, &mut b).expect("read");
        assert_eq!(b, [1, 2, 3, 4]);
    }

    #[test]
    fn refuses_bad_sizes() {
        assert!(GuestRam::new(0).is_err());
        assert!(GuestRam::new(4097).is_err());
        assert!(GuestRam::new(MAX_RAM_BYTES + 4096).is_err());
    }

    #[test]
    fn shared_through_the_fd() {
        let ram = GuestRam::new(4096).expect("memfd");
        ram.write(100, &[42]).expect("write");
        let dup = ram.fd().try_clone().expect("dup");
        let again = GuestRam::from_fd(dup, 4096).expect("map again");
        let mut b = [0u8; 1];
        again.read(100, &mut b).expect("read");
        assert_eq!(b, [42]);
    }
}
