//! `mesh-gateway`: the mesh CA and the demo.
fn main() -> std::process::ExitCode {
    mesh_gateway::cli::main()
}
