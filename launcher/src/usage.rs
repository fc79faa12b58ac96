//! `docs/usage.md`, the options reference, is generated from the CLI definition by
//! `clap-markdown`; this test fails when the file differs from what the definition generates.
//! Regenerate it with `SID_WRITE_USAGE=1 cargo test -p sid-launch usage`.

use std::path::PathBuf;

/// The command line as `sid-launch` builds it.
fn command() -> clap::Command {
    crate::args::Cli::command_with_resume_help()
}

/// The whole of `docs/usage.md`.
fn markdown() -> String {
    let options = clap_markdown::MarkdownOptions::new()
        .title("sid-launch: every option".to_string())
        .show_footer(false);
    let body = clap_markdown::help_markdown_command_custom(&command(), &options);
    format!(
        "<!-- Generated from launcher/src/args.rs by clap-markdown; do not edit. Regenerate with\n     \
         SID_WRITE_USAGE=1 cargo test -p sid-launch usage -->\n\n{body}"
    )
}

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/usage.md")
}

#[test]
fn docs_usage_md_is_generated_from_the_cli_definition() {
    let want = markdown();
    if std::env::var_os("SID_WRITE_USAGE").is_some() {
        std::fs::write(path(), &want).expect("writes docs/usage.md");
        return;
    }
    let have = std::fs::read_to_string(path()).unwrap_or_default();
    if have != want {
        let line = have
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| have.lines().count().min(want.lines().count()))
            + 1;
        panic!(
            "docs/usage.md differs from what the CLI definition generates (first at line {line}: \
             {:?} should be {:?}); regenerate it with\n    SID_WRITE_USAGE=1 cargo test -p sid-launch usage",
            have.lines().nth(line - 1).unwrap_or(""),
            want.lines().nth(line - 1).unwrap_or("")
        );
    }
}

/// The reference documents every flag `--help` lists, the hidden ones excepted.
#[test]
fn docs_usage_md_names_every_visible_flag() {
    let text = markdown();
    for arg in command().get_arguments().filter(|a| !a.is_hide_set()) {
        if let Some(long) = arg.get_long() {
            assert!(text.contains(&format!("--{long}")), "--{long} is missing");
        }
    }
    assert!(!text.contains("--inject-fault"));
}
