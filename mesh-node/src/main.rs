//! `mesh-node`: run a node, call through a node's ingress, check a config file.
fn main() -> std::process::ExitCode {
    mesh_node::cli::main()
}
