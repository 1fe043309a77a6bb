//! `mesh-gateway`: the mesh CA and the demo.

/// mimalloc in the musl builds (a gateway on a device), for the reasons mesh-node's `main.rs`
/// gives. With 10,000 nodes it also held less memory than musl's allocator: 481 MiB against 529
/// (glibc's: 474; the goal, 500 MB, is 476.8 MiB; docs/PERFORMANCE.md, ninth slice).
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    mesh_gateway::cli::main()
}
