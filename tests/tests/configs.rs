//! Every file in `configs/` parses with the parser of its kind.

use std::path::Path;

#[test]
fn every_config_file_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("configs/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_owned();
        if name.starts_with("node") {
            let config = mesh_node::NodeConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(!config.name.as_str().is_empty());
        } else {
            panic!("{name}: no parser knows this kind of config; name it node*.toml or add one");
        }
        checked += 1;
    }
    assert!(
        checked >= 2,
        "only {checked} config files found in {}",
        dir.display()
    );
}
