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
        } else if name.starts_with("gateway") {
            let config = mesh_gateway::GatewayConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
            let policy = config.policy.expect("the example names a policy file");
            let text = std::fs::read_to_string(&policy.value).expect("policy file");
            mesh_core::policy::Policy::parse(&text, &name).unwrap_or_else(|e| panic!("{e}"));
            // A node refuses the gateway's keys, naming the first.
            let err =
                mesh_node::NodeConfig::load(&path).expect_err("gateway keys in a node config");
            assert!(
                err.to_string()
                    .contains("admin: not a key of a node's config (a gateway's key?"),
                "{err}"
            );
        } else if name.starts_with("policy") {
            let text = std::fs::read_to_string(&path).expect("read");
            mesh_core::policy::Policy::parse(&text, &name).unwrap_or_else(|e| panic!("{e}"));
        } else {
            panic!(
                "{name}: no parser knows this kind of config; name it node*, gateway* or policy*"
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 2,
        "only {checked} config files found in {}",
        dir.display()
    );
}
