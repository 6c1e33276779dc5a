//! The domain XML libvirt writes to the hook's stdin: bounded, parsed with
//! roxmltree (read-only, no DTD, node-count limit), and reduced to what the
//! hook needs: name, UUID, domain type and the clockcarry policy from
//! `<metadata>`.

use std::io::Read;

use super::args::{clip, DomainName, DomainUuid};
use super::config::Policy;
use super::LibvirtError;

/// Largest domain XML accepted, in bytes. A domain with hundreds of devices
/// is well under 100 KiB.
pub const MAX_XML_BYTES: usize = 1 << 20;
/// Most XML nodes accepted (elements, attributes' parents, text, comments).
pub const MAX_XML_NODES: u32 = 100_000;
/// The namespace of clockcarry's element in `<metadata>`.
pub const METADATA_NS: &str = "https://clockcarry.dev/libvirt/1";
/// The local name of clockcarry's element in `<metadata>`.
pub const METADATA_ELEMENT: &str = "clock";

/// What the hook takes from a domain's XML.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainInfo {
    pub name: DomainName,
    pub uuid: DomainUuid,
    /// The `type` attribute of `<domain>`: `kvm`, `qemu`, ...
    pub domain_type: String,
    /// The policy set in `<metadata>`, if any.
    pub policy: Option<Policy>,
}

/// Reads the XML from `input`, refusing more than [`MAX_XML_BYTES`] (the
/// read stops one byte past the limit).
pub fn read_xml(input: &mut dyn Read) -> Result<String, LibvirtError> {
    let limit = u64::try_from(MAX_XML_BYTES).unwrap_or(u64::MAX);
    let mut bytes = Vec::new();
    input
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| LibvirtError::Xml(format!("reading the domain XML from stdin: {e}")))?;
    if bytes.len() > MAX_XML_BYTES {
        return Err(LibvirtError::Xml(format!(
            "the domain XML is larger than {MAX_XML_BYTES} bytes"
        )));
    }
    String::from_utf8(bytes).map_err(|_| LibvirtError::Xml("the domain XML is not UTF-8".into()))
}

/// Parses a domain XML document (as libvirt formats it for hooks).
///
/// Requires a `<domain>` root (no namespace) with one `<name>` and one
/// `<uuid>` child. The clockcarry element is
/// `<clockcarry:clock xmlns:clockcarry="https://clockcarry.dev/libvirt/1"
/// policy="off|resync"/>` directly under `<metadata>`; any prefix works, the
/// namespace decides. More than one such element, or an unknown policy, is
/// an error (the hook then does nothing rather than guess).
pub fn parse_domain_xml(xml: &str) -> Result<DomainInfo, LibvirtError> {
    if xml.len() > MAX_XML_BYTES {
        return Err(LibvirtError::Xml(format!(
            "the domain XML is larger than {MAX_XML_BYTES} bytes"
        )));
    }
    let opts = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_XML_NODES,
        ..roxmltree::ParsingOptions::default()
    };
    let doc = roxmltree::Document::parse_with_options(xml, opts)
        .map_err(|e| LibvirtError::Xml(format!("domain XML: {e}")))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" || root.tag_name().namespace().is_some() {
        return Err(LibvirtError::Xml(format!(
            "domain XML: the root element is <{}>, not <domain>",
            clip(root.tag_name().name(), 40)
        )));
    }
    let domain_type = root.attribute("type").unwrap_or("").to_owned();
    if domain_type.len() > 32 || !domain_type.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(LibvirtError::Xml(format!(
            "domain XML: domain type {:?} is not a short word",
            clip(&domain_type, 40)
        )));
    }

    let only_child = |tag: &str| -> Result<Option<roxmltree::Node<'_, '_>>, LibvirtError> {
        let mut found = root.children().filter(|n| {
            n.is_element() && n.has_tag_name(tag) && n.tag_name().namespace().is_none()
        });
        let first = found.next();
        if found.next().is_some() {
            return Err(LibvirtError::Xml(format!(
                "domain XML: more than one <{tag}>"
            )));
        }
        Ok(first)
    };
    let name_node =
        only_child("name")?.ok_or_else(|| LibvirtError::Xml("domain XML: no <name>".into()))?;
    let name_text = element_text(name_node);
    let name = DomainName::parse(std::ffi::OsStr::new(name_text.trim()))?;
    let uuid_node =
        only_child("uuid")?.ok_or_else(|| LibvirtError::Xml("domain XML: no <uuid>".into()))?;
    let uuid = DomainUuid::parse(&element_text(uuid_node))?;

    let mut policy = None;
    if let Some(metadata) = only_child("metadata")? {
        let mut ours = metadata.children().filter(|n| {
            n.is_element()
                && n.tag_name().namespace() == Some(METADATA_NS)
                && n.tag_name().name() == METADATA_ELEMENT
        });
        if let Some(el) = ours.next() {
            if ours.next().is_some() {
                return Err(LibvirtError::Xml(format!(
                    "domain XML: more than one <{METADATA_ELEMENT}> in namespace {METADATA_NS}"
                )));
            }
            let value = el.attribute("policy").ok_or_else(|| {
                LibvirtError::Xml(format!(
                    "domain XML: <{METADATA_ELEMENT}> in namespace {METADATA_NS} has no policy attribute"
                ))
            })?;
            policy = Some(Policy::parse(value).ok_or_else(|| {
                LibvirtError::Xml(format!(
                    "domain XML: metadata policy {:?} is not one of: off, resync",
                    clip(value, 40)
                ))
            })?);
        }
    }
    Ok(DomainInfo {
        name,
        uuid,
        domain_type,
        policy,
    })
}

/// The concatenated text children of an element (libvirt writes plain text;
/// CDATA and entity references are already resolved by the parser).
fn element_text(node: roxmltree::Node<'_, '_>) -> String {
    let mut text = String::new();
    for child in node.children() {
        if let Some(t) = child.text() {
            if child.is_text() {
                text.push_str(t);
            }
        }
    }
    text
}
