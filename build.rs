//! Build script: stamps the git revision into `--version`, and writes the
//! shell completions and man pages into `OUT_DIR` from the very clap
//! definitions the binary parses with (`src/cli/args.rs`), so they cannot
//! drift from the real command line. `packaging/build-deb.sh` finds them
//! through cargo's `build-script-executed` message.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;

/// `src/cli/args.rs` names `crate::config::LogFormat`. The real one lives
/// in `src/config.rs`, which needs most of the crate's dependencies; the
/// script only needs a type that clap can hold, because it never parses.
/// The accepted spellings come from `args::LOG_FORMATS`, which a unit test
/// in `src/cli/mod.rs` holds equal to what the real `LogFormat` accepts.
mod config {
    #[derive(Debug, Clone)]
    pub struct LogFormat;

    impl std::str::FromStr for LogFormat {
        type Err = String;
        fn from_str(_: &str) -> Result<LogFormat, String> {
            Ok(LogFormat)
        }
    }
}

// A module file, not `include!`: `include!` refuses the file's `//!` doc.
#[allow(dead_code)]
#[path = "src/cli/args.rs"]
mod args;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/cli/args.rs");

    let version = format!("{} (rev {})", env!("CARGO_PKG_VERSION"), git_revision());
    // Not SCAIWAVE_*: cargo also puts this variable in the environment of
    // `cargo test` and `cargo run`, and the server refuses SCAIWAVE_*
    // variables that are not configuration keys.
    println!("cargo:rustc-env=BUILD_VERSION_WITH_REV={version}");

    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let version: &'static str = Box::leak(version.into_boxed_str());
    let mut cli = args::Cli::command().version(version);
    let completions = out.join("completions");
    let man = out.join("man");
    for dir in [&completions, &man] {
        std::fs::create_dir_all(dir).expect("create a directory in OUT_DIR");
    }
    use clap_complete::Shell;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cli, "scaiwave", &completions)
            .expect("write a completion script");
    }
    // scaiwave.1, and one page per command (scaiwave-admin.1, …).
    cli.build();
    man_pages(&cli, &man);
}

/// A page for `cmd` and each of its subcommands. Not
/// `clap_mangen::generate_to`, which also writes a page for every
/// `help` subcommand at every level (`scaiwave-admin-help-tenant-list.1`…).
fn man_pages(cmd: &clap::Command, dir: &Path) {
    clap_mangen::Man::new(cmd.clone())
        .generate_to(dir)
        .expect("write a man page");
    for sub in cmd.get_subcommands() {
        if sub.get_name() != "help" && !sub.is_hide_set() {
            man_pages(sub, dir);
        }
    }
}

/// The checkout's commit (12 hex digits), or "unknown" when built outside
/// git (a source tarball, `cargo package`). It tells cargo to run this
/// script again when HEAD moves: HEAD itself for a branch switch, the
/// branch's ref file for a commit, and packed-refs for a ref packed away.
fn git_revision() -> String {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").args(args).output().ok()?;
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8(out.stdout).ok()?;
        Some(text.trim().to_string()).filter(|t| !t.is_empty())
    };
    let Some(rev) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".to_string();
    };
    let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        // --git-path: in a worktree, HEAD is the worktree's own and refs
        // are in the common dir; it knows which is where.
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            // Cargo reruns a script whose watched file is missing on every
            // build, so only files that exist are named.
            if Path::new(&path).exists() {
                let path = std::fs::canonicalize(&path).unwrap_or(PathBuf::from(path));
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    rev
}
