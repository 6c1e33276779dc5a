//! The ivshmem-plain page the two lab hosts share: BAR 2 of the PCI device
//! 1af4:1110, mapped through sysfs. No network is involved: it is the same
//! file in the outer machine's /dev/shm behind both QEMU processes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};

const PCI_DEVICES: &str = "/sys/bus/pci/devices";
const IVSHMEM_VENDOR: &str = "0x1af4";
const IVSHMEM_DEVICE: &str = "0x1110";

/// Number of u64 words used (the rest of the page is left alone).
pub const WORDS: usize = 64;

/// A mapping of the shared page.
pub struct Shm {
    ptr: *mut u64,
    len: usize,
    _file: File,
}

fn read_trimmed(path: &Path) -> io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

/// The sysfs directory of the ivshmem device.
pub fn find_device() -> io::Result<PathBuf> {
    for entry in std::fs::read_dir(PCI_DEVICES)? {
        let dir = entry?.path();
        let vendor = read_trimmed(&dir.join("vendor")).unwrap_or_default();
        let device = read_trimmed(&dir.join("device")).unwrap_or_default();
        if vendor == IVSHMEM_VENDOR && device == IVSHMEM_DEVICE {
            return Ok(dir);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no ivshmem device ({IVSHMEM_VENDOR}:{IVSHMEM_DEVICE}) in {PCI_DEVICES}"),
    ))
}

impl Shm {
    /// Enables the device and maps its BAR 2.
    pub fn open() -> io::Result<Shm> {
        let dir = find_device()?;
        std::fs::write(dir.join("enable"), "1")
            .map_err(|e| io::Error::new(e.kind(), format!("{}/enable: {e}", dir.display())))?;
        let path = dir.join("resource2");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let len = usize::try_from(file.metadata()?.len()).unwrap_or(0);
        if len < WORDS * 8 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {len} bytes, need {}", path.display(), WORDS * 8),
            ));
        }
        // SAFETY: a fresh shared mapping of a file we hold open; the kernel
        // picks the address; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Shm {
            ptr: ptr.cast(),
            len,
            _file: file,
        })
    }

    /// Reads word `i` (0 beyond [`WORDS`]).
    pub fn load(&self, i: usize) -> u64 {
        if i >= WORDS {
            return 0;
        }
        // SAFETY: i < WORDS and the mapping holds at least WORDS words,
        // 8-byte aligned (page aligned base); another host writes it
        // concurrently, hence the volatile access of one aligned word.
        unsafe { std::ptr::read_volatile(self.ptr.add(i)) }
    }

    /// Writes word `i` (ignored beyond [`WORDS`]).
    pub fn store(&self, i: usize, value: u64) {
        if i >= WORDS {
            return;
        }
        // SAFETY: as in `load`.
        unsafe { std::ptr::write_volatile(self.ptr.add(i), value) }
        fence(Ordering::SeqCst);
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `open`.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}
