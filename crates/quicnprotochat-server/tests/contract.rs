//! The wire contract states one protocol version in three places: the
//! protocol document a client author reads (docs/protocol.md), the schema
//! they generate code from, and what a running node reports in `ping`. All
//! three must be the code's.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod node;

use std::path::{Path, PathBuf};

use node::TestNode;
use quicnprotochat_proto::PROTOCOL_VERSION;

/// The heading of docs/protocol.md's section on outcomes, which names the
/// protocol version it describes.
const DOCS_HEADING: &str = "## Outcomes and errors (protocol version ";

/// How `NodeInfo.protocolVersion`'s comment in `schemas/node.capnp` names
/// the current version.
const SCHEMA_MARKER: &str = "Currently ";

/// The repository's root, two levels above this crate.
fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The number at the start of `text`, up to the first non-digit.
fn leading_number(text: &str) -> Option<u16> {
    let end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    text[..end].parse().ok()
}

/// The protocol version in docs/protocol.md's outcomes heading.
fn docs_version(docs: &str) -> u16 {
    let headings: Vec<&str> = docs
        .lines()
        .filter_map(|line| line.strip_prefix(DOCS_HEADING))
        .collect();
    let [heading] = headings.as_slice() else {
        panic!(
            "docs/protocol.md has {} headings \"{DOCS_HEADING}N)\", not one",
            headings.len()
        );
    };
    heading
        .strip_suffix(')')
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("docs/protocol.md: no version in \"{DOCS_HEADING}{heading}\""))
}

/// The version `NodeInfo.protocolVersion`'s comment calls current.
fn schema_version(schema: &str) -> u16 {
    let comment: String = schema
        .lines()
        .take_while(|line| !line.contains("protocolVersion @"))
        .collect::<Vec<_>>()
        .join("\n");
    let after = comment
        .rfind(SCHEMA_MARKER)
        .map(|at| &comment[at + SCHEMA_MARKER.len()..])
        .unwrap_or_else(|| panic!("schemas/node.capnp: no \"{SCHEMA_MARKER}N\" before protocolVersion"));
    leading_number(after).unwrap_or_else(|| panic!("schemas/node.capnp: no number after \"{SCHEMA_MARKER}\""))
}

#[tokio::test]
async fn docs_schema_and_running_node_state_the_code_protocol_version() {
    let root = repository();
    let docs = std::fs::read_to_string(root.join("docs/protocol.md")).unwrap();
    let schema = std::fs::read_to_string(root.join("schemas/node.capnp")).unwrap();
    let node = TestNode::start(|_| {}).await;
    let pinged = node.pinged_protocol().await;
    node.stop().await;

    let stated = [
        ("docs/protocol.md", docs_version(&docs)),
        ("schemas/node.capnp", schema_version(&schema)),
        ("a running node's ping", pinged),
    ];
    let wrong: Vec<String> = stated
        .iter()
        .filter(|(_, version)| *version != PROTOCOL_VERSION)
        .map(|(source, version)| format!("{source} states {version}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "the code's PROTOCOL_VERSION is {PROTOCOL_VERSION}, but {}",
        wrong.join(", ")
    );
}
