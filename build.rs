//! Records the git commit the binary is built from, for the metric `bus_build_info`:
//! `BUS_COMMIT` from the build's environment if set (a Docker build, which has no `.git`),
//! else `git rev-parse --short=12 HEAD`, else `unknown` (a crate unpacked from a package,
//! no git installed). Cheap: one git command, re-run only when HEAD moves.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=BUS_COMMIT");
    let commit = std::env::var("BUS_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=BUS_COMMIT={}", commit.trim());

    // Re-run when HEAD moves: a commit, a checkout (HEAD, and the branch it points to,
    // logged in logs/HEAD). Only files that exist are named: naming a missing one would
    // re-run this script on every build.
    let mut watched = false;
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        for file in ["HEAD", "logs/HEAD"] {
            let path = Path::new(dir.trim()).join(file);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
                watched = true;
            }
        }
    }
    if !watched {
        println!("cargo:rerun-if-changed=build.rs");
    }
}

/// What `git args` prints, if git is there and succeeds.
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8(output.stdout)
        .ok()
        .filter(|text| !text.trim().is_empty())
}
