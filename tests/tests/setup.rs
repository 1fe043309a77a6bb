//! `scripts/setup.sh` names everything a fresh machine needs (issue 9: a cross compiler's C
//! headers were only a Recommends, present on the developer's machine by chance, and the README's
//! test command failed on a fresh one). These tests run after `scripts/setup.sh`, as
//! `scripts/test.sh` does.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo")
        .to_owned()
}

fn check(scripts: &Path) -> (i32, String) {
    let out = Command::new("bash")
        .arg(scripts.join("setup.sh"))
        .arg("--check")
        .output()
        .expect("run setup.sh --check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn after_setup_nothing_is_missing_or_present_by_chance() {
    let (code, text) = check(&repo().join("scripts"));
    assert_eq!(code, 0, "setup.sh --check found problems:\n{text}");
    assert!(text.contains("every package, probe, target and component is in place"));
}

/// The mistake of issue 9, made again on purpose: a copy of setup.sh that forgets the aarch64 C
/// headers. On this machine they are installed (setup.sh installed them), so the build would pass
/// here and fail on a fresh machine; `--check` must say so.
#[test]
fn a_package_present_only_as_a_recommends_is_flagged() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let scripts = scratch.path().join("scripts");
    std::fs::create_dir_all(&scripts).expect("mkdir");
    let original = std::fs::read_to_string(repo().join("scripts/setup.sh")).expect("setup.sh");
    assert!(original.contains("libc6-dev-arm64-cross"));
    let forgetful: String = original
        .lines()
        .filter(|l| !l.contains("libc6-dev-arm64-cross"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(scripts.join("setup.sh"), forgetful).expect("write");
    std::fs::copy(
        repo().join("scripts/debian-base.txt"),
        scripts.join("debian-base.txt"),
    )
    .expect("copy");
    let (code, text) = check(&scripts);
    assert_eq!(code, 1, "the forgotten package went unnoticed:\n{text}");
    assert!(
        text.contains("a fresh machine would lack it") && text.contains("libc6-dev-arm64-cross"),
        "{text}"
    );
}

/// The cross compilers can build C that includes the C library's headers: what ring's build
/// script does for the device targets, and what failed on a fresh machine.
#[test]
fn each_cross_compiler_finds_its_c_library_headers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("probe.c");
    std::fs::write(
        &src,
        "#include <stdint.h>\n#include <stdlib.h>\nint f(void) { return (int)sizeof(uint64_t); }\n",
    )
    .expect("write");
    for cc in ["aarch64-linux-gnu-gcc", "arm-linux-gnueabihf-gcc"] {
        let out = Command::new(cc)
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(dir.path().join(format!("{cc}.o")))
            .output()
            .unwrap_or_else(|e| panic!("{cc}: {e} (scripts/setup.sh installs it)"));
        assert!(
            out.status.success(),
            "{cc} cannot build C with <stdint.h>: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
