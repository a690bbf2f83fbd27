//! One person, several devices, through the real CLI and a real node: every
//! step is a separate client process with its own state file, as a user
//! would run it.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use common::{Member, TestNode, state};

/// `link` on a new state file: the one line it prints.
fn link(node: &TestNode, state: &str, extra: &[&str]) -> String {
    let mut args = vec!["link", "--state", state];
    args.extend_from_slice(extra);
    let out = node.cli_ok(&args);
    assert_eq!(out.lines().count(), 1, "one line: {out}");
    out.trim().to_owned()
}

/// A second device of `of`, linked with `devices add` and completed with
/// `recv` on the new device; returns it as a member (its key is the user's).
fn linked_device(node: &TestNode, dir: &std::path::Path, of: &Member, name: &str) -> (Member, String) {
    let path = state(dir, &format!("{name}.state"));
    let code = link(node, &path, &[]);
    of.run(node, "devices", &["add", &code]);
    let device = Member {
        name: name.to_owned(),
        state: path,
        key: of.key.clone(),
    };
    let (ok, _, err) = device.try_run(node, "recv", &[]);
    assert!(ok, "{err}");
    assert!(err.contains("linked: this device"), "{err}");
    (device, code)
}

fn device_key(node: &TestNode, member: &Member) -> String {
    member.run(node, "whoami", &["--device"]).trim().to_owned()
}

#[test]
fn a_user_with_two_devices_reads_and_writes_from_both_and_can_cut_one_off() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let phone = Member::register(&node, dir.path(), "alice-phone");
    let bob = Member::register(&node, dir.path(), "bob");
    // Alice joins a group with her only device first.
    bob.run(&node, "create-group", &["--group-id", "early"]);
    bob.run(
        &node,
        "invite",
        &["--group-id", "early", "--peer-key", &phone.key],
    );
    phone.run(&node, "join", &[]);

    // Her laptop becomes a second device; its first `recv` completes the
    // link and joins the group she was already in.
    let (laptop, code) = linked_device(&node, dir.path(), &phone, "alice-laptop");
    assert_eq!(laptop.run(&node, "whoami", &[]).trim(), phone.key);
    let laptop_device = device_key(&node, &laptop);
    let phone_device = device_key(&node, &phone);
    assert_ne!(laptop_device, phone_device);
    assert_eq!(laptop_device.len(), 64);
    assert_eq!(phone_device, phone.key, "a user's first device is the user key");
    // The code was used: a second `devices add` is refused.
    let (ok, _, err) = phone.try_run(&node, "devices", &["add", &code]);
    assert!(!ok);
    assert!(err.contains("already used"), "{err}");

    for (member, this) in [(&phone, &phone_device), (&laptop, &laptop_device)] {
        let listed = member.run(&node, "devices", &["list"]);
        let mut lines: Vec<&str> = listed.lines().collect();
        lines.sort();
        let mut expected = vec![phone_device.clone(), laptop_device.clone()];
        expected.sort();
        let expected: Vec<String> = expected
            .into_iter()
            .map(|key| {
                if key == **this {
                    format!("{key} (this device)")
                } else {
                    key
                }
            })
            .collect();
        assert_eq!(lines, expected);
    }

    // What Bob sends to the old group after the link reaches both devices.
    bob.run(&node, "recv", &[]);
    bob.run(&node, "send", &["--group-id", "early", "--msg", "after the link"]);
    for device in [&phone, &laptop] {
        let got = device.run(&node, "recv", &[]);
        assert!(
            got.contains(&format!("early {}: after the link", bob.short())),
            "{got}"
        );
    }

    // Inviting Alice by her user key adds both devices in one Commit.
    bob.run(&node, "create-group", &["--group-id", "g2"]);
    let (ok, _, err) = bob.try_run(&node, "invite", &["--group-id", "g2", "--peer-key", &phone.key]);
    assert!(ok, "{err}");
    assert!(err.contains("invited 1 (2 devices)"), "{err}");
    let members = bob.run(&node, "members", &["--group-id", "g2"]);
    assert!(members.contains(&format!("{} 2 devices", phone.key)), "{members}");
    assert!(
        members.contains(&format!("{} (you) 1 device", bob.key)),
        "{members}"
    );
    phone.run(&node, "recv", &[]);
    laptop.run(&node, "recv", &[]);

    // A message from either device is Alice's for Bob, and shows on her
    // other device as her own.
    laptop.run(&node, "send", &["--group-id", "g2", "--msg", "from the laptop"]);
    phone.run(&node, "send", &["--group-id", "g2", "--msg", "from the phone"]);
    let got = bob.run(&node, "recv", &[]);
    assert!(
        got.contains(&format!("g2 {}: from the laptop", phone.short())),
        "{got}"
    );
    assert!(
        got.contains(&format!("g2 {}: from the phone", phone.short())),
        "{got}"
    );
    let got = laptop.run(&node, "recv", &[]);
    assert!(got.contains("g2 me: from the phone"), "{got}");
    // (The phone printed the laptop's message while catching up to send.)
    let history = phone.run(&node, "history", &["--group-id", "g2"]);
    assert!(history.contains("from the laptop"), "{history}");

    // The phone cuts the laptop off: a new list without it, and its leaves
    // removed from both groups. What is sent afterwards, it cannot read.
    phone.run(&node, "devices", &["remove", &laptop_device]);
    let listed = phone.run(&node, "devices", &["list"]);
    assert_eq!(listed.trim(), format!("{phone_device} (this device)"));
    bob.run(&node, "recv", &[]);
    let members = bob.run(&node, "members", &["--group-id", "g2"]);
    assert!(members.contains(&format!("{} 1 device", phone.key)), "{members}");
    bob.run(&node, "send", &["--group-id", "g2", "--msg", "after the removal"]);
    let (_, got, err) = laptop.try_run(&node, "recv", &[]);
    assert!(!got.contains("after the removal"), "{got}");
    assert!(err.contains("you were removed"), "{err}");
    let got = phone.run(&node, "recv", &[]);
    assert!(
        got.contains(&format!("g2 {}: after the removal", bob.short())),
        "{got}"
    );
    // It still holds the user key, but the node no longer takes a list
    // from it: it cannot link itself another device.
    let spare = link(&node, &state(dir.path(), "spare.state"), &[]);
    let (ok, _, err) = laptop.try_run(&node, "devices", &["add", &spare]);
    assert!(!ok);
    assert!(err.contains("not in the user's current list"), "{err}");
}

#[test]
fn wrong_and_expired_link_codes_are_refused_clearly() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let phone = Member::register(&node, dir.path(), "phone");

    let code = link(&node, &state(dir.path(), "tablet.state"), &[]);
    let mut typo = code.clone().into_bytes();
    let last = typo.len() - 1;
    typo[last] = if typo[last] == b'0' { b'1' } else { b'0' };
    let typo = String::from_utf8(typo).unwrap();
    let (ok, _, err) = phone.try_run(&node, "devices", &["add", &typo]);
    assert!(!ok);
    assert!(err.contains("not a valid link code"), "{err}");

    let expiring = state(dir.path(), "old.state");
    let code = link(&node, &expiring, &["--valid-for", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(2_100));
    let (ok, _, err) = phone.try_run(&node, "devices", &["add", &code]);
    assert!(!ok);
    assert!(err.contains("expired"), "{err}");
    // Nothing was linked: the waiting device says what to do.
    let out = node.cli(&["recv", "--state", &expiring]);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("not linked yet"),
        "{}",
        common::stderr(&out)
    );
    let listed = phone.run(&node, "devices", &["list"]);
    assert_eq!(listed.lines().count(), 1, "{listed}");
}
