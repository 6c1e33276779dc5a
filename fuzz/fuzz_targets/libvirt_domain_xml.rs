//! The domain XML the libvirt hook reads on stdin: `domain_xml::read_xml`
//! on the raw bytes (size limit, UTF-8), then `parse_domain_xml` (roxmltree
//! without DTDs, node limit; `<domain>` root, one `<name>`, one `<uuid>`,
//! clockcarry's `<metadata>` element).
//!
//! Properties beyond "no panic":
//! - `read_xml` accepts exactly the UTF-8 inputs within `MAX_XML_BYTES`,
//!   unchanged;
//! - an accepted domain has a name that `DomainName::parse` accepts as is, a
//!   UUID of 36 lowercase characters, and a type of at most 32 ASCII letters
//!   and digits.

#![no_main]

use std::ffi::OsStr;

use clockcarry_libvirt::domain_xml::{read_xml, MAX_XML_BYTES};
use clockcarry_libvirt::{parse_domain_xml, DomainName};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let read = read_xml(&mut input);
    let valid = data.len() <= MAX_XML_BYTES && std::str::from_utf8(data).is_ok();
    assert_eq!(read.is_ok(), valid);
    let Ok(xml) = read else {
        return;
    };
    assert_eq!(xml.as_bytes(), data);

    match parse_domain_xml(&xml) {
        Ok(info) => {
            let name = DomainName::parse(OsStr::new(info.name.as_str()))
                .expect("an accepted name parses again");
            assert_eq!(name, info.name);
            let uuid = info.uuid.as_str();
            assert_eq!(uuid.len(), 36, "{uuid:?}");
            assert!(
                uuid.bytes()
                    .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{uuid:?}"
            );
            assert!(info.domain_type.len() <= 32, "{:?}", info.domain_type);
            assert!(info.domain_type.bytes().all(|b| b.is_ascii_alphanumeric()));
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
