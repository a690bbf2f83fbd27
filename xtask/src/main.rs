//! Project chores.
//!
//! `cargo xtask codegen` regenerates the Rust code for `schemas/*.capnp` into
//! `crates/quicnprotochat-proto/src/generated/`. The output is committed so that
//! building the project needs no `capnp` binary; CI runs this and fails when the
//! committed code differs from what the schemas produce.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

const SCHEMAS: [&str; 3] = ["auth.capnp", "delivery.capnp", "node.capnp"];

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("codegen") => match codegen() {
            Ok(out) => {
                println!("generated Cap'n Proto code in {}", out.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "codegen failed: {e}\n(is the `capnp` tool installed? On Debian: apt-get install capnproto)"
                );
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!("usage: cargo xtask codegen");
            ExitCode::FAILURE
        }
    }
}

fn codegen() -> capnp::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let schemas = root.join("schemas");
    let out = root.join("crates/quicnprotochat-proto/src/generated");
    let mut command = capnpc::CompilerCommand::new();
    command
        .src_prefix(&schemas)
        .output_path(&out)
        .default_parent_module(vec!["generated".into()]);
    for schema in SCHEMAS {
        command.file(schemas.join(schema));
    }
    command.run()?;
    Ok(out)
}
