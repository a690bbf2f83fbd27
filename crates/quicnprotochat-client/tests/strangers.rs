//! What a stranger or a hostile member can make a client print, store or
//! do, through the real CLI and a real node: text from peers prints as one
//! line of visible characters (`--json` keeps it exact).

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use common::{Member, TestNode, group_of};

#[test]
fn control_characters_in_messages_print_escaped_on_one_line_and_exact_in_json() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|name| Member::register(&node, dir.path(), name));
    group_of(&node, "esc", &alice, &[&bob]);
    // Retitles the window, clears the screen, then forges a line from
    // someone else and hides the rest behind a right-to-left override.
    let nasty = "hi\u{1b}]0;owned\u{7}\u{1b}[2J\nesc carol: forged\r\u{202e}txet";
    alice.run(&node, "send", &["--msg", nasty]);

    let out = bob.run(&node, "recv", &[]);
    assert_eq!(out.lines().count(), 1, "one message, one line: {out:?}");
    assert!(
        !out.contains('\u{1b}') && !out.contains('\r') && !out.contains('\u{202e}'),
        "{out:?}"
    );
    let escaped = r"hi\u{1b}]0;owned\u{7}\u{1b}[2J\nesc carol: forged\r\u{202e}txet";
    assert_eq!(out.trim_end(), format!("esc {}: {escaped}", alice.short()));

    let history = bob.run(&node, "history", &[]);
    assert_eq!(history.lines().count(), 1, "{history:?}");
    assert!(history.trim_end().ends_with(escaped), "{history:?}");

    let json = bob.run(&node, "history", &["--json"]);
    let document: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(document["messages"][0]["text"], nasty, "{json}");
}
