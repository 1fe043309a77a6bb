//! The device bundle: built by `cross/bundle.sh`, installed into a scratch root with its own
//! `install.sh --root`, as onto a mounted SD card.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use starling_tests::Pki;

const TARGET: &str = "aarch64-unknown-linux-musl";

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .expect("installed")
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn bundle_installs_into_a_scratch_root() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let device_bin = repo.join("target").join(TARGET).join("device/mesh-node");
    assert!(
        device_bin.exists(),
        "{} is missing: run cross/build.sh first (scripts/test.sh does)",
        device_bin.display()
    );

    let pki = Pki::new();
    let conf = pki.config(
        "dev-1",
        "[[services]]\nname = \"health\"\nupstream = \"builtin:health\"\n",
    );
    let node_dir = conf.parent().expect("dir");
    let out = pki.dir.path().join("dist");
    let made = Command::new(repo.join("cross/bundle.sh"))
        .args(["--target", TARGET, "--config"])
        .arg(&conf)
        .arg("--certs")
        .arg(node_dir.join("certs"))
        .arg("--out")
        .arg(&out)
        .output()
        .expect("bundle.sh");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let tarball = out.join(format!("starling-dev-1-{TARGET}.tar.gz"));
    assert_eq!(mode(&tarball), 0o600, "the bundle holds a private key");

    let unpack = pki.dir.path().join("unpack");
    std::fs::create_dir(&unpack).expect("mkdir");
    let tar = Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&unpack)
        .status()
        .expect("tar");
    assert!(tar.success());
    let root = pki.dir.path().join("sdcard");
    std::fs::create_dir(&root).expect("mkdir");
    let installed = Command::new(unpack.join("starling-dev-1/install.sh"))
        .arg("--root")
        .arg(&root)
        .output()
        .expect("install.sh");
    assert!(
        installed.status.success(),
        "{}",
        String::from_utf8_lossy(&installed.stderr)
    );

    let bin = root.join("usr/local/bin/mesh-node");
    assert_eq!(mode(&bin), 0o755);
    let elf = std::fs::read(&bin).expect("binary");
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(
        u16::from_le_bytes([elf[18], elf[19]]),
        0xb7,
        "not an aarch64 binary"
    );
    assert_eq!(mode(&root.join("etc/starling/certs/node.key")), 0o600);
    assert_eq!(mode(&root.join("etc/starling/node.toml")), 0o640);
    assert_eq!(mode(&root.join("etc/starling")), 0o750);
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/starling-node.service"))
        .expect("unit");
    for line in [
        "ExecStart=/usr/local/bin/mesh-node run --config /etc/starling/node.toml",
        "Restart=on-failure",
        "User=starling",
        "StateDirectory=starling",
    ] {
        assert!(unit.contains(line), "unit lacks {line:?}");
    }
    assert!(
        root.join("etc/systemd/system/multi-user.target.wants/starling-node.service")
            .is_symlink()
    );
    let sysusers =
        std::fs::read_to_string(root.join("usr/lib/sysusers.d/starling.conf")).expect("sysusers");
    assert!(sysusers.starts_with("u starling "));
    let tmpfiles =
        std::fs::read_to_string(root.join("usr/lib/tmpfiles.d/starling.conf")).expect("tmpfiles");
    assert!(tmpfiles.contains("z /etc/starling/certs/node.key 0600 starling starling"));
    // Renewal writes the new certificate in place: the folder is the node's, and writable.
    assert!(tmpfiles.contains("z /etc/starling/certs 0750 starling starling"));
    assert!(unit.contains("ReadWritePaths=/etc/starling/certs"));

    // The installed config and credentials are what a node accepts.
    let check = Command::new(starling_tests::bin("mesh-node"))
        .arg("check-config")
        .arg(root.join("etc/starling/node.toml"))
        .output()
        .expect("check-config");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // systemd-analyze checks the unit (scripts/setup.sh installs systemd). ExecStart must exist,
    // so it points at the scratch root's binary for the check.
    {
        let copy = pki.dir.path().join("starling-node.service");
        std::fs::write(
            &copy,
            unit.replace("/usr/local/bin/mesh-node", bin.to_str().expect("utf-8")),
        )
        .expect("unit");
        let verify = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .expect("systemd-analyze");
        assert!(
            verify.status.success() && verify.stderr.is_empty(),
            "systemd-analyze verify: {}",
            String::from_utf8_lossy(&verify.stderr)
        );
        // Hardened: systemd's own exposure score at 2.5 or less (a plain unit scores 9.6, ours
        // was 6.0).
        let security = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&copy)
            .output()
            .expect("systemd-analyze");
        let report = String::from_utf8_lossy(&security.stdout);
        let score: f64 = report
            .lines()
            .find_map(|l| l.split("starling-node.service: ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no score in: {report}"));
        assert!(score <= 2.5, "exposure {score}:\n{report}");
    }
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "UMask=0077",
        "DevicePolicy=closed",
        "SystemCallFilter=@system-service",
    ] {
        assert!(unit.contains(line), "unit lacks {line:?}");
    }
    let devices = std::fs::read_to_string(
        root.join("etc/systemd/system/starling-node.service.d/devices.conf"),
    )
    .expect("the devices drop-in");
    assert!(
        devices.contains("[Service]") && !devices.contains("DeviceAllow"),
        "{devices}"
    );

    // A node with a microcontroller on a serial line may open that line and nothing else.
    let toml = unpack.join("starling-dev-1/etc/starling/node.toml");
    let mut src = std::fs::read_to_string(&toml).expect("node.toml");
    src.push_str(
        "[[services]]\nname = \"pump\"\nupstream = \"serial:///dev/ttyACM0?baud=115200\"\n\
         [[services]]\nname = \"valve\"\nupstream = \"serial:///dev/ttyACM0?baud=115200\"\n",
    );
    std::fs::write(&toml, src).expect("node.toml");
    let root2 = pki.dir.path().join("sdcard2");
    std::fs::create_dir(&root2).expect("mkdir");
    let installed = Command::new(unpack.join("starling-dev-1/install.sh"))
        .arg("--root")
        .arg(&root2)
        .output()
        .expect("install.sh");
    assert!(installed.status.success());
    let devices = std::fs::read_to_string(
        root2.join("etc/systemd/system/starling-node.service.d/devices.conf"),
    )
    .expect("the devices drop-in");
    assert_eq!(
        devices
            .lines()
            .filter(|l| l.starts_with("DeviceAllow="))
            .collect::<Vec<_>>(),
        ["DeviceAllow=char-ttyACM rw"],
        "{devices}"
    );
    // The scratch root has no group file: no dialout group to join (the unit would not start).
    assert!(!devices.contains("SupplementaryGroups"), "{devices}");
}
