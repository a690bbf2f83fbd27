//! `completions`: each shell's script is printed by the real binary,
//! without a node or a state file.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

/// Runs `completions SHELL` and returns its script, failing unless it
/// exits 0 with a non-empty script that knows a few subcommands.
fn script(shell: &str) -> String {
    let output = common::run_client(&["completions", shell]);
    assert!(
        output.status.success(),
        "completions {shell}: {}",
        common::stderr(&output)
    );
    let script = String::from_utf8(output.stdout).expect("UTF-8 script");
    assert!(!script.trim().is_empty(), "empty {shell} script");
    for command in ["register-state", "devices", "chat", "recv"] {
        assert!(script.contains(command), "{shell} script lacks {command}");
    }
    script
}

#[test]
fn bash_completions_register_a_completion_function() {
    let script = script("bash");
    assert!(script.contains("complete -F"), "{script}");
    assert!(script.contains("quicnprotochat-client"));
}

#[test]
fn zsh_completions_are_a_compdef_script() {
    assert!(script("zsh").starts_with("#compdef quicnprotochat-client"));
}

#[test]
fn fish_completions_complete_the_client_command() {
    assert!(script("fish").contains("complete -c quicnprotochat-client"));
}

#[test]
fn an_unknown_shell_is_refused_with_the_choices() {
    let output = common::run_client(&["completions", "tcsh"]);
    assert!(!output.status.success());
    let stderr = common::stderr(&output);
    assert!(stderr.contains("bash") && stderr.contains("fish"), "{stderr}");
}
