//! Build script: records the commit the binary is built from, for `agora --version` and the
//! `agora_build_info` metric. `AGORA_COMMIT` (set by a build without a git checkout, such as
//! a container build) wins; else `git rev-parse`; else "unknown". Never fails the build.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=AGORA_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    let commit = std::env::var("AGORA_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=AGORA_COMMIT={commit}");
}
