//! Guest RAM: one memfd-backed shared mapping at guest physical 0, held as
//! rust-vmm's [`GuestMemoryMmap`] (one region, `MmapRegion::from_file`:
//! read/write, `MAP_SHARED | MAP_NORESERVE`), accessed through vm-memory's
//! bounds-checked, volatile [`Bytes`].
//!
//! memfd so that a local migration (live update) can hand the very same
//! memory to the next VMM process over a Unix socket (SCM_RIGHTS), as Cloud
//! Hypervisor does with `local=on`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use nix::sys::memfd::{memfd_create, MFdFlags};
use vm_memory::mmap::MmapRegionError;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Largest guest RAM accepted, bytes (the probe needs 2 MiB).
pub const MAX_RAM_BYTES: u64 = 1 << 30;

/// Bytes moved at a time between guest RAM and a stream (save, load).
const CHUNK_BYTES: usize = 1 << 20;

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
    #[error("mapping guest RAM failed: {0}")]
    Map(#[source] MmapRegionError),
    #[error("guest memory access at {gpa:#x} (+{len}) is out of bounds")]
    OutOfBounds { gpa: u64, len: usize },
}

fn os(op: &'static str) -> impl FnOnce(std::io::Error) -> MemoryError {
    move |source| MemoryError::Os { op, source }
}

/// Guest RAM: `size` bytes of the memfd `file`, mapped shared at guest
/// physical 0.
#[derive(Debug)]
pub struct GuestRam {
    /// The memfd; the mapping holds it too (its `FileOffset`).
    file: Arc<File>,
    mem: GuestMemoryMmap,
    /// Host virtual address of guest physical 0.
    host_addr: u64,
    size: usize,
}

impl GuestRam {
    /// Fresh zeroed RAM of `size` bytes in a new memfd.
    pub fn new(size: u64) -> Result<GuestRam, MemoryError> {
        check_size(size)?;
        let fd = memfd_create(c"clockcarry-guest-ram", MFdFlags::MFD_CLOEXEC)
            .map_err(|e| os("memfd_create")(e.into()))?;
        let file = File::from(fd);
        // std's set_len is ftruncate(2).
        file.set_len(size).map_err(os("ftruncate"))?;
        GuestRam::map(file, size)
    }

    /// Maps RAM received from another process (local migration).
    pub fn from_fd(fd: OwnedFd, size: u64) -> Result<GuestRam, MemoryError> {
        check_size(size)?;
        let file = File::from(fd);
        // std's metadata is fstat(2) (statx where the kernel has it).
        let len = file.metadata().map_err(os("fstat"))?.len();
        if len < size {
            return Err(MemoryError::BadSize(size));
        }
        GuestRam::map(file, size)
    }

    fn map(file: File, size: u64) -> Result<GuestRam, MemoryError> {
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        let file = Arc::new(file);
        let region = MmapRegion::from_file(FileOffset::from_arc(file.clone(), 0), len)
            .map_err(MemoryError::Map)?;
        let host_addr = region.as_ptr() as u64;
        let region =
            GuestRegionMmap::new(region, GuestAddress(0)).ok_or(MemoryError::BadSize(size))?;
        let mem =
            GuestMemoryMmap::from_regions(vec![region]).map_err(|_| MemoryError::BadSize(size))?;
        Ok(GuestRam {
            file,
            mem,
            host_addr,
            size: len,
        })
    }

    pub fn size(&self) -> u64 {
        self.size as u64
    }

    /// Host virtual address of guest physical 0 (for KVM_SET_USER_MEMORY_REGION).
    pub fn host_addr(&self) -> u64 {
        self.host_addr
    }

    /// The memfd, to pass to another process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// `gpa` when `[gpa, gpa + len)` lies inside RAM (checked before any
    /// byte is copied, so a refused access leaves the buffer alone).
    fn range(&self, gpa: u64, len: usize) -> Result<GuestAddress, MemoryError> {
        let end = usize::try_from(gpa).ok().and_then(|s| s.checked_add(len));
        match end {
            Some(end) if end <= self.size => Ok(GuestAddress(gpa)),
            _ => Err(MemoryError::OutOfBounds { gpa, len }),
        }
    }

    /// Copies guest memory at `gpa` into `buf` (volatile: a vCPU may be
    /// writing it).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let len = buf.len();
        let at = self.range(gpa, len)?;
        self.mem
            .read_slice(buf, at)
            .map_err(|_| MemoryError::OutOfBounds { gpa, len })
    }

    /// Writes `data` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let len = data.len();
        let at = self.range(gpa, len)?;
        self.mem
            .write_slice(data, at)
            .map_err(|_| MemoryError::OutOfBounds { gpa, len })
    }

    /// The 32 bytes at `gpa` (a PVTI reader for the library's capture,
    /// which applies the pvclock version protocol over two reads).
    pub fn read_32(&self, gpa: u64) -> Option<[u8; 32]> {
        let at = self.range(gpa, 32).ok()?;
        self.mem.read_obj::<[u8; 32]>(at).ok()
    }

    /// Writes all of guest RAM to `out`. The vCPUs must be stopped.
    pub fn save_to(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let mut buf = vec![0u8; CHUNK_BYTES.min(self.size)];
        let mut gpa = 0;
        while gpa < self.size {
            let n = buf.len().min(self.size - gpa);
            self.mem
                .read_slice(&mut buf[..n], GuestAddress(gpa as u64))
                .map_err(std::io::Error::other)?;
            out.write_all(&buf[..n])?;
            gpa += n;
        }
        Ok(())
    }

    /// Fills all of guest RAM from `input`. The vCPUs must not run.
    pub fn load_from(&self, input: &mut dyn Read) -> std::io::Result<()> {
        let mut buf = vec![0u8; CHUNK_BYTES.min(self.size)];
        let mut gpa = 0;
        while gpa < self.size {
            let n = buf.len().min(self.size - gpa);
            input.read_exact(&mut buf[..n])?;
            self.mem
                .write_slice(&buf[..n], GuestAddress(gpa as u64))
                .map_err(std::io::Error::other)?;
            gpa += n;
        }
        Ok(())
    }

    /// Fills guest RAM from a file of exactly `size` bytes (read(2) straight
    /// into guest memory).
    pub fn load_file(&self, file: &mut File) -> std::io::Result<()> {
        let len = file.metadata()?.len();
        if len != self.size() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("memory file has {len} bytes, the VM has {}", self.size()),
            ));
        }
        self.mem
            .read_exact_volatile_from(GuestAddress(0), file, self.size)
            .map_err(std::io::Error::other)
    }
}

fn check_size(size: u64) -> Result<(), MemoryError> {
    if size == 0 || size % 4096 != 0 || size > MAX_RAM_BYTES {
        return Err(MemoryError::BadSize(size));
    }
    Ok(())
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
        let dup = ram.fd().try_clone_to_owned().expect("dup");
        let again = GuestRam::from_fd(dup, 4096).expect("map again");
        let mut b = [0u8; 1];
        again.read(100, &mut b).expect("read");
        assert_eq!(b, [42]);
        ram.write(4095, &[9]).expect("write");
        again.read(4095, &mut b).expect("read");
        assert_eq!(b, [9], "one memfd, two mappings");
    }

    #[test]
    fn refuses_a_short_memfd() {
        let ram = GuestRam::new(4096).expect("memfd");
        let dup = ram.fd().try_clone_to_owned().expect("dup");
        assert!(matches!(
            GuestRam::from_fd(dup, 8192),
            Err(MemoryError::BadSize(8192))
        ));
    }

    #[test]
    fn pvti_reads_up_to_the_last_byte() {
        let ram = GuestRam::new(4096).expect("memfd");
        let page: Vec<u8> = (0..32).collect();
        ram.write(4096 - 32, &page).expect("write");
        assert_eq!(ram.read_32(4096 - 32).map(|b| b.to_vec()), Some(page));
        assert!(ram.read_32(4096 - 31).is_none());
        let mut b = [7u8; 2];
        assert!(matches!(
            ram.read(4095, &mut b),
            Err(MemoryError::OutOfBounds { gpa: 4095, len: 2 })
        ));
        assert_eq!(b, [7, 7], "a refused read copies nothing");
    }

    #[test]
    fn save_and_load_span_chunks() {
        // Larger than one chunk and not a multiple of it.
        let size = (CHUNK_BYTES + 8192) as u64;
        let ram = GuestRam::new(size).expect("memfd");
        ram.write(0, &[1]).expect("write");
        ram.write(CHUNK_BYTES as u64 - 1, &[2, 3]).expect("write");
        ram.write(size - 1, &[4]).expect("write");
        let mut saved = Vec::new();
        ram.save_to(&mut saved).expect("save");
        assert_eq!(saved.len() as u64, size);
        assert_eq!(
            (saved[0], saved[CHUNK_BYTES - 1], saved[CHUNK_BYTES]),
            (1, 2, 3)
        );
        assert_eq!(saved.last(), Some(&4));

        let other = GuestRam::new(size).expect("memfd");
        other.load_from(&mut saved.as_slice()).expect("load");
        let mut back = Vec::new();
        other.save_to(&mut back).expect("save");
        assert!(back == saved);
        // A stream shorter than RAM is an error.
        let third = GuestRam::new(size).expect("memfd");
        let short = &saved[..saved.len() - 1];
        assert!(third.load_from(&mut &short[..]).is_err());

        let path = std::env::temp_dir().join(format!("refvmm-mem-{}", std::process::id()));
        std::fs::write(&path, &saved).expect("write file");
        let mut file = File::open(&path).expect("open");
        let fourth = GuestRam::new(size).expect("memfd");
        fourth.load_file(&mut file).expect("load file");
        let mut b = [0u8; 1];
        fourth.read(size - 1, &mut b).expect("read");
        assert_eq!(b, [4]);
        let small = GuestRam::new(4096).expect("memfd");
        let mut file = File::open(&path).expect("open");
        assert!(small.load_file(&mut file).is_err());
        let _ = std::fs::remove_file(&path);
    }
}
