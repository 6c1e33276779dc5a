//! A PVH ELF loader: the loadable segments of an ELF64 x86-64 image and the
//! 32-bit entry point from its Xen note (type 18, XEN_ELFNOTE_PHYS32_ENTRY).
//! Every offset and size is checked against the file: no panic on any input.

/// Xen ELF note type giving the 32-bit PVH entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const EM_X86_64: u16 = 62;

/// Why an image cannot be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("unsupported ELF: {0} (need ELF64, little endian, x86-64)")]
    Unsupported(&'static str),
    #[error("ELF {what} at offset {offset} (+{len}) lies outside the {file_len}-byte file")]
    Truncated {
        what: &'static str,
        offset: u64,
        len: u64,
        file_len: usize,
    },
    #[error("no PVH entry note (Xen note type 18) in the image")]
    NoPvhNote,
    #[error("segment at {paddr:#x} has file size {filesz} above its memory size {memsz}")]
    BadSegment { paddr: u64, filesz: u64, memsz: u64 },
}

/// One PT_LOAD segment: `data` goes to guest physical `paddr`, followed by
/// `memsz - data.len()` zero bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub paddr: u64,
    pub data: Vec<u8>,
    pub memsz: u64,
}

/// A PVH image ready to copy into guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvhImage {
    /// 32-bit protected-mode entry point (from the Xen note).
    pub entry: u32,
    pub segments: Vec<Segment>,
}

impl PvhImage {
    /// Highest guest physical address the image occupies (exclusive).
    pub fn end(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.paddr.saturating_add(s.memsz))
            .max()
            .unwrap_or(0)
    }
}

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn slice(&self, what: &'static str, offset: u64, len: u64) -> Result<&[u8], ElfError> {
        let err = || ElfError::Truncated {
            what,
            offset,
            len,
            file_len: self.0.len(),
        };
        let start = usize::try_from(offset).map_err(|_| err())?;
        let n = usize::try_from(len).map_err(|_| err())?;
        let end = start.checked_add(n).ok_or_else(err)?;
        self.0.get(start..end).ok_or_else(err)
    }

    fn u16(&self, what: &'static str, offset: u64) -> Result<u16, ElfError> {
        let b = self.slice(what, offset, 2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&self, what: &'static str, offset: u64) -> Result<u32, ElfError> {
        let b = self.slice(what, offset, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&self, what: &'static str, offset: u64) -> Result<u64, ElfError> {
        let b = self.slice(what, offset, 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

/// Parses an ELF64 PVH image.
pub fn parse(file: &[u8]) -> Result<PvhImage, ElfError> {
    let f = Bytes(file);
    if file.get(0..4) != Some(b"\x7fELF".as_slice()) {
        return Err(ElfError::NotElf);
    }
    if file.get(4) != Some(&2) {
        return Err(ElfError::Unsupported("not ELF64"));
    }
    if file.get(5) != Some(&1) {
        return Err(ElfError::Unsupported("not little endian"));
    }
    if f.u16("e_machine", 18)? != EM_X86_64 {
        return Err(ElfError::Unsupported("not x86-64"));
    }
    let phoff = f.u64("e_phoff", 32)?;
    let phentsize = u64::from(f.u16("e_phentsize", 54)?);
    let phnum = u64::from(f.u16("e_phnum", 56)?);
    if phentsize < 56 {
        return Err(ElfError::Unsupported(
            "program header entries below 56 bytes",
        ));
    }
    let mut segments = Vec::new();
    let mut entry = None;
    for i in 0..phnum {
        let ph = phoff.saturating_add(i.saturating_mul(phentsize));
        f.slice("program header", ph, 56)?;
        let p_type = f.u32("p_type", ph)?;
        let offset = f.u64("p_offset", ph + 8)?;
        let paddr = f.u64("p_paddr", ph + 24)?;
        let filesz = f.u64("p_filesz", ph + 32)?;
        let memsz = f.u64("p_memsz", ph + 40)?;
        match p_type {
            PT_LOAD => {
                if filesz > memsz {
                    return Err(ElfError::BadSegment {
                        paddr,
                        filesz,
                        memsz,
                    });
                }
                let data = f.slice("segment", offset, filesz)?.to_vec();
                segments.push(Segment { paddr, data, memsz });
            }
            PT_NOTE => {
                let notes = f.slice("note segment", offset, filesz)?;
                if let Some(e) = pvh_entry(notes) {
                    entry = Some(e);
                }
            }
            _ => {}
        }
    }
    Ok(PvhImage {
        entry: entry.ok_or(ElfError::NoPvhNote)?,
        segments,
    })
}

fn align4(n: u64) -> u64 {
    n.saturating_add(3) & !3
}

/// The entry point in a note segment's "Xen" note of type 18, if any.
fn pvh_entry(notes: &[u8]) -> Option<u32> {
    let n = Bytes(notes);
    let mut at = 0u64;
    while at.saturating_add(12) <= notes.len() as u64 {
        let namesz = u64::from(n.u32("note", at).ok()?);
        let descsz = u64::from(n.u32("note", at + 4).ok()?);
        let kind = n.u32("note", at + 8).ok()?;
        let name_at = at + 12;
        let desc_at = name_at.saturating_add(align4(namesz));
        let name = n.slice("note name", name_at, namesz).ok()?;
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && name.starts_with(b"Xen") && descsz >= 4 {
            return n.u32("note desc", desc_at).ok();
        }
        at = desc_at.saturating_add(align4(descsz));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_garbage_without_panicking() {
        assert_eq!(parse(b""), Err(ElfError::NotElf));
        assert_eq!(parse(b"\x7fELF"), Err(ElfError::Unsupported("not ELF64")));
        let mut h = vec![0u8; 64];
        h[0..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[18] = 62;
        h[32] = 0xff; // e_phoff far away
        h[54] = 56;
        h[56] = 1;
        assert!(matches!(parse(&h), Err(ElfError::Truncated { .. })));
        for len in 0..h.len() {
            let _ = parse(&h[..len]);
        }
    }

    #[test]
    fn note_parsing() {
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&18u32.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&0x0010_0000u32.to_le_bytes());
        assert_eq!(pvh_entry(&note), Some(0x0010_0000));
        assert_eq!(pvh_entry(&note[..note.len() - 1]), None);
    }
}
