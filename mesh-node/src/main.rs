//! `mesh-node`: run a node, call through a node's ingress, check a config file.

/// The devices' builds are static musl, and musl's allocator is built for size, not speed: it
/// runs about five times the instructions of mimalloc for an allocation and its free, maps and
/// unmaps memory as calls come and go, and has one lock that every thread shares. Built for musl, a 64 B
/// call took 9% fewer instructions with mimalloc (callgrind, no lock waits); with the caller and
/// the callee on two threads, calls/s at 64 in flight rose by a fifth, to about the glibc
/// build's. Native builds keep the C library's allocator. docs/PERFORMANCE.md, ninth slice.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    mesh_node::cli::main()
}
