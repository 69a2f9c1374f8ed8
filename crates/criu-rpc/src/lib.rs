//! CRIU RPC client (placeholder until the crate lands).
